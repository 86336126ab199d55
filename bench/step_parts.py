"""What the agent's fixed per-step work costs in place, on a small model: its parts taken out one at a time.

A monitored model and an unmonitored twin train side by side (blocks of steps alternate); each line
takes one more part of the agent out and prints the extra wall time per step over the twin (the
median of the rounds). The difference between two lines is what that part costs in place, where
caches are cold after the backward pass (a part timed alone, warm, looks about half as costly):

    python bench/step_parts.py                 # the tiny 4-layer 128-wide MLP of bench/overhead.py
    python bench/step_parts.py --rounds 8 --steps 2000
    python bench/step_parts.py --compile       # both copies torch.compile'd (attached first)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradflow_agent  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000, help="steps per block")
    parser.add_argument("--compile", action="store_true", help="torch.compile both copies")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    twin = copy.deepcopy(model)
    opt, opt_twin = torch.optim.Adam(model.parameters(), 1e-4), torch.optim.Adam(twin.parameters(), 1e-4)
    x, y = torch.randn(32, 128), torch.randint(0, 10, (32,))

    forward = {}  # model -> what its step calls (the compiled module with --compile)

    def block(m, o, agent) -> float:
        f = forward.get(id(m), m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = nn.functional.cross_entropy(f(x), y)
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            if agent is not None:
                agent.step(loss=loss)
        return (time.perf_counter() - t0) / args.steps * 1e6

    agent = gradflow_agent.attach(model, {"exporters": {"prometheus": {"enabled": False}}}, optimizer=opt)
    if args.compile:
        forward[id(model)], forward[id(twin)] = torch.compile(model), torch.compile(twin)
    block(model, opt, agent)  # the overhead budget settles
    print(f"activations every {agent.activation_every}, parameters every {agent.parameter_every} steps; "
          f"unmonitored step {block(twin, opt_twin, None):.0f} us")

    def extra(label: str, step_agent=agent) -> None:
        diffs = [block(model, opt, step_agent) - block(twin, opt_twin, None) for _ in range(args.rounds)]
        print(f"{label:<48} +{statistics.median(diffs):5.0f} us/step")

    extra("the whole agent")
    agent.grad.read = lambda *a, **k: None
    extra("without the gradient read")
    agent.forward_clock.remove()
    extra("  and without the forward clock")
    extra("  and without agent.step(loss)", None)
    agent.hooks.active = False
    agent._boundary = lambda: None
    extra("  and without the step boundary")
    for handle in list(agent.hooks._handles):
        handle.remove()
    extra("  and without any hook (the floor of the pair)", None)
    agent.detach()


if __name__ == "__main__":
    main()
