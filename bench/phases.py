"""Where the agent's time goes on a deep narrow model: forward, backward and optimizer-step phases.

Process CPU time per phase (1 thread), without the agent, with it (at its steady activation cadence),
and with it but its forward hooks kept on between measured steps (no idle hooks), on the same model:

    python bench/phases.py                    # 500 x (Linear(64) + ReLU), 30 steps per measurement
    python bench/phases.py --blocks 50 --steps 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradflow_agent  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=300, help="steps for the overhead budget to settle")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(args.blocks):
        blocks += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*blocks)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)
    agent = None

    def phases(n: int) -> tuple[float, float, float]:
        f = b = o = 0.0
        for _ in range(n):
            t0 = time.process_time()
            loss = model(x).pow(2).mean()
            t1 = time.process_time()
            loss.backward()
            t2 = time.process_time()
            opt.step()
            opt.zero_grad()
            if agent is not None:
                agent.step(loss=loss)
            t3 = time.process_time()
            f, b, o = f + t1 - t0, b + t2 - t1, o + t3 - t2
        return f / n * 1e3, b / n * 1e3, o / n * 1e3

    phases(20)
    rows = [("without the agent", phases(args.steps))]
    agent = gradflow_agent.attach(model, {"exporters": {"prometheus": {"enabled": False}}}, optimizer=opt)
    phases(args.warmup)
    rows.append((f"agent, activations every {agent.activation_every}", phases(args.steps)))
    agent.hooks.idle(False)
    agent.hooks._never_idle = True
    rows.append(("agent, hooks kept on", phases(args.steps)))
    agent.detach()
    print(f"{2 * args.blocks} layers, ms per step (process CPU time, 1 thread)")
    print(f"{'':34} {'forward':>8} {'backward':>9} {'opt+agent':>10}")
    for name, (f, b, o) in rows:
        print(f"{name:34} {f:8.2f} {b:9.2f} {o:10.2f}")


if __name__ == "__main__":
    main()
