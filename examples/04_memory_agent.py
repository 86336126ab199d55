"""04 - Debugging a memory-augmented RL agent: a compression bottleneck that explodes gradients.

    python examples/04_memory_agent.py [--out DIR] [--steps N]

The agent encodes an observation (256 units), compresses it to a 4-dimensional memory key
(256 -> 64 -> 4), reads a slot memory by attention and acts with a policy and a value head. The naive
compression was initialised with unit-variance weights (a common slip: no 1/sqrt(fan_in)), so the
gradient flowing back through it is amplified about a hundredfold: the analyzer reports EXPLODING
gradients in the encoder and a BOTTLENECK whose layers amplify gradients. The fix of seed 004 keeps the
weights: damp the gradient entering the compression with `gradient_scale(x, 0.1)` and normalise its
output (LayerNorm on the key). ComparativeAnalyzer shows what the fix resolved; RLPolicyAnalyzer checks
that the fixed policy still explores (the naive one has collapsed: its logits are huge).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.analyze import SEED003, ComparativeAnalyzer, FlowAnalyzer, RLPolicyAnalyzer, gradient_scale


class Compression(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.compress_down = nn.Linear(256, 64)
        self.compress_proj = nn.Linear(64, 4)
        self.key_norm = nn.LayerNorm(4) if fixed else nn.Identity()
        for lin in (self.compress_down, self.compress_proj):  # the slip: unit-variance weights
            nn.init.normal_(lin.weight, 0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed:
            x = gradient_scale(x, 0.1)
        return self.key_norm(self.compress_proj(F.gelu(self.compress_down(x))))


class MemoryAgent(nn.Module):
    def __init__(self, fixed: bool = False, slots: int = 8, actions: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 256), nn.ReLU())
        self.compression = Compression(fixed)
        self.memory = nn.Parameter(0.5 * torch.randn(slots, 4))
        self.read = nn.Sequential(nn.Linear(4, 64), nn.ReLU())
        self.policy = nn.Linear(64, actions)
        self.value = nn.Linear(64, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.compression(self.encoder(obs))
        recalled = torch.softmax(key @ self.memory.T, dim=-1) @ self.memory
        z = self.read(key + recalled)
        return self.policy(z), self.value(z).squeeze(-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="gradflow-04-"))
    torch.manual_seed(0)
    obs = torch.randn(128, 32)
    actions, advantages, returns = torch.randint(0, 4, (128,)), torch.randn(128), 0.1 * torch.randn(128)

    def a2c_loss(out: tuple[torch.Tensor, torch.Tensor], _target: object = None) -> torch.Tensor:
        logits, value = out
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1).mean()
        pg = -(logp.gather(1, actions[:, None]).squeeze(1) * advantages).mean()
        return pg + 0.5 * F.mse_loss(value, returns) - 0.01 * entropy

    # seed 003's thresholds (exploding above a pressure of 10) for this debugging session
    comp = ComparativeAnalyzer(steps=args.steps, analyzer_factory=lambda m: FlowAnalyzer(m, thresholds=SEED003))
    for name, fixed in (("naive", False), ("fixed", True)):
        torch.manual_seed(1)  # the same weights in both versions
        report = comp.analyze_model(MemoryAgent(fixed), obs, None, a2c_loss, name=name)
        report.print_summary()
        report.print_issues()
        report.save_html(out / f"memory_agent_{name}.html")
    diff = comp.compare("naive", "fixed")
    diff.print()
    print(f"verdict: {diff.verdict}; resolved: {sorted({i.issue_type.value for i in diff.resolved_issues})}; "
          f"still open: {sorted({i.issue_type.value for i in diff.persistent_issues}) or '-'}")
    for d in diff.degraded():  # a fix can have side effects: the analyzer says where
        print(f"side effect: {d.layer} health {d.health_a:.0f} -> {d.health_b:.0f} "
              f"(pressure {d.pressure_a:.3g} -> {d.pressure_b:.3g})")

    for name, fixed in (("naive", False), ("fixed", True)):
        torch.manual_seed(1)
        _, stats = RLPolicyAnalyzer(MemoryAgent(fixed)).analyze(lambda: obs, a2c_loss, steps=2,
                                                                action_extractor=lambda o: (o[0], None, None, o[1]))
        print(f"{name}: policy entropy (normalised) {stats.discrete_entropy_normalized:.2f}, collapse risk "
              f"{stats.entropy_collapse_risk}, exploration {stats.exploration_adequacy}")
    print(f"reports written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
