"""Two costs of the agent's step path, timed in place: the gradient read and the snapshot.

The gradient read (what the non-finite watch needs on every step) is timed right after each backward,
on the freshly allocated gradients, cold after the backward as they are in training, and then again on
the same, now warm, gradients; `torch._foreach_norm` over the same gradients is the reference. The
snapshot is timed after a whole export interval of steps (500 by default), with the part that folds
the interval's losses. The tiny 4-layer MLP and the 1000-layer model of bench/overhead.py, 1 thread:

    python bench/hot_path.py
    python bench/hot_path.py --steps 300 --interval 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradflow_agent  # noqa: E402


def _mlp(width: int, depth: int, d_in: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    return nn.Sequential(*layers, nn.Linear(d_in, 10))


MODELS = {"tiny": (lambda: _mlp(128, 4, 128), 128), "deep": (lambda: _mlp(64, 501, 64), 64)}


def read_costs(name: str, steps: int) -> dict:
    """Median microseconds of one gradient read: fresh (in place), warm, and by the torch path (fresh)."""
    torch.manual_seed(0)
    make, width = MODELS[name]
    model = make()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    agent = gradflow_agent.attach(model, {"exporters": {"prometheus": {"enabled": False}}}, optimizer=opt)
    x, y = torch.randn(32, width), torch.randint(0, 10, (32,))
    times: dict[str, list[float]] = {"fresh": [], "warm": [], "torch": []}
    chosen = "numpy" if agent.grad._numpy_first else "torch"
    for step in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        kind = ("fresh", "torch")[step % 2]  # each on fresh gradients, alternately
        agent.grad._numpy_first = kind == "fresh"  # the numpy path, or the torch path, whichever the agent chose
        t0 = time.perf_counter()
        agent.grad.read(False, agent.steps + 1)
        times[kind].append(time.perf_counter() - t0)
        if kind == "fresh":
            t0 = time.perf_counter()
            agent.grad.read(False, agent.steps + 1)
            times["warm"].append(time.perf_counter() - t0)
        with agent.paused():
            opt.step()  # the agent's own hooks still run: the interval is a real one
        opt.zero_grad(set_to_none=True)
    agent.detach()
    return {**{k: statistics.median(v) * 1e6 for k, v in times.items()}, "chosen": chosen}


def snapshot_costs(interval: int, rounds: int) -> tuple[float, float]:
    """Median milliseconds of a snapshot after `interval` steps of the tiny MLP, and of its loss fold."""
    torch.manual_seed(0)
    model = MODELS["tiny"][0]()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    agent = gradflow_agent.attach(model, {"exporters": {"prometheus": {"enabled": False}},
                                          "sampling": {"export_every_n_steps": 10 ** 6,
                                                       "export_every_seconds": 10 ** 6}}, optimizer=opt)
    x, y = torch.randn(32, 128), torch.randint(0, 10, (32,))
    snaps, folds = [], []
    for _ in range(rounds):
        for _ in range(interval):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            agent.step(loss=loss)
        losses = list(agent._losses)
        t0 = time.perf_counter()
        agent._loss_parts(losses)
        folds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        agent._snapshot()
        snaps.append(time.perf_counter() - t0)
    agent.detach()
    return statistics.median(snaps) * 1e3, statistics.median(folds) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="backward passes per model for the read")
    parser.add_argument("--interval", type=int, default=500, help="steps before each timed snapshot")
    parser.add_argument("--rounds", type=int, default=5, help="timed snapshots")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, gradflow_agent {gradflow_agent.__version__}")
    print(f"{'gradient read (us)':<22} {'numpy':>9} {'warm':>8} {'torch':>9} {'agent uses':>11}")
    for name, tensors in (("tiny", 8), ("deep", 1002)):
        c = read_costs(name, args.steps if name == "tiny" else max(20, args.steps // 10))
        label = f"{name} ({tensors} tensors)"
        print(f"{label:<22} {c['fresh']:>9.1f} {c['warm']:>8.1f} {c['torch']:>9.1f} {c['chosen']:>11}")
    snap, fold = snapshot_costs(args.interval, args.rounds)
    print(f"snapshot after {args.interval} steps: {snap:.2f} ms, of which the loss fold {fold:.2f} ms")


if __name__ == "__main__":
    main()
