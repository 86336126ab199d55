"""Long runs keep memory flat: 100k training steps of a tiny model, and a 10k-call inference-only loop.

Python allocations are measured with tracemalloc and the process's peak resident size with getrusage
(torch allocates its tensors outside tracemalloc); the agent's own lists are checked to stay bounded.
"""

from __future__ import annotations

import resource
import tracemalloc

import torch
from torch import nn

import gradflow_agent
from tests.conftest import config


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_100k_steps_of_a_tiny_model_keep_memory_flat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    agent = gradflow_agent.attach(model, config(sampling={"export_every_n_steps": 500, "window": 50},
                                                stats={"parameters": {"every_n_steps": 10}}), optimizer=opt)
    x = torch.randn(4, 4)

    def train(steps: int) -> None:
        for _ in range(steps):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            agent.step(loss=loss)

    try:
        train(5_000)  # warm: every buffer and cache exists
        tracemalloc.start()
        rss0 = _rss_mib()
        before = tracemalloc.get_traced_memory()[0]
        train(95_000)
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert agent.steps == 100_000 and agent.latest.step == 100_000
        assert grown < 1 << 20, f"Python allocations grew by {grown} bytes over 95k steps"
        assert _rss_mib() - rss0 < 64
        assert agent.errors.total == 0
        assert len(agent._losses) < 500 and not agent.act._pending
    finally:
        agent.detach()


def test_an_inference_only_loop_keeps_memory_flat():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.Softmax(dim=-1))
    agent = gradflow_agent.attach(model, config())
    x = torch.randn(8, 16)
    try:
        with torch.no_grad():
            for _ in range(1_000):
                model(x)
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(10_000):
                model(x)
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
        assert grown < 1 << 20, f"Python allocations grew by {grown} bytes over 10k calls"
        assert len(agent.act._pending) <= 4096 * 9 and agent.steps == 0
        snap = agent.snapshot()
        assert snap.layer("3")["activation_saturation_ratio"] >= 0
    finally:
        agent.detach()
