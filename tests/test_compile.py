"""torch.compile: the agent's hooks trace into the user's graph (no graph break, no recompilation), give
the eager statistics, and work however the agent and torch.compile are ordered."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import gradflow_agent
from tests.conftest import config

KEYS = ("activation_mean", "activation_std", "activation_absmax", "activation_zero_ratio",
        "activation_saturation_ratio", "grad_pressure", "param_norm")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _run(model, forward, steps=6):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        forward(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _stats(agent) -> dict:
    snap = agent.snapshot()
    return {name: {k: snap.layer(name)[k] for k in KEYS} for name in snap.layers}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _eager_stats() -> dict:
    model = _model()
    agent = gradflow_agent.attach(model, config())
    _run(model, model)
    out = _stats(agent)
    agent.detach()
    return out


def _close(got: dict, want: dict) -> None:
    for layer, stats in want.items():
        for k, v in stats.items():
            assert got[layer][k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), (layer, k)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_attached_before_compiling_no_graph_break_and_eager_statistics(fullgraph):
    want = _eager_stats()
    torch._dynamo.reset()
    counters.clear()
    model = _model()
    agent = gradflow_agent.attach(model, config())
    compiled = torch.compile(model, fullgraph=fullgraph)
    _run(model, compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2  # forward (+ its backward), compiled once
    _close(_stats(agent), want)
    agent.detach()


@pytest.mark.parametrize("target", ["original", "compiled"])
def test_attached_after_the_first_compiled_call(target):
    want = _eager_stats()
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model)
    compiled(torch.randn(8, 16))  # compiled without the agent's hooks
    agent = gradflow_agent.attach(model if target == "original" else compiled, config())
    _run(model, compiled)
    got = _stats(agent)
    agent.detach()
    assert all(got[n]["activation_mean"] == got[n]["activation_mean"] for n in got), "a layer was not measured"
    _close(got, want)


def test_after_detach_the_compiled_graph_no_longer_feeds_the_agent():
    model = _model()
    agent = gradflow_agent.attach(model, config())
    compiled = torch.compile(model)
    _run(model, compiled, steps=2)
    agent.detach()
    before = agent.act.acc.clone()
    compiled(torch.randn(8, 16))
    assert torch.equal(agent.act.acc, before)


def test_a_stretched_activation_cadence_adds_one_graph_not_a_recompile_per_step():
    """The overhead budget turns activation measurement off on most steps: the compiled forward guards on
    that one flag, so there are two graphs (with and without the statistics), each compiled once."""
    model = _model()
    agent = gradflow_agent.attach(model, config(sampling={"overhead_budget": 1e-9}))
    compiled = torch.compile(model)
    _run(model, compiled, steps=160)
    calls = float(agent.act.traced_counts[0, 3])  # forward calls the compiled hooks measured (this interval)
    snap = agent.snapshot()
    agent.detach()
    assert agent.activation_every > 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])  # 2 forwards (+ their backwards)
    assert 32 <= calls < 160 - 32  # every step of the first 32, then every k-th
    assert snap.layer("0")["activation_std"] > 0
