"""01 - A simple MLP: gradient pressure, health scores, and HTML/JSON reports.

    python examples/01_simple_mlp.py [--out DIR] [--steps N]

Pressure is the L2 norm of a layer's parameter gradient (mean over the analysed steps); the health score
(0-100) subtracts points for pressure outside [0.1, 10], for turbulence above 1 and for every issue
(docs/analyzers.md has the formula). Two 4-layer MLPs are analysed: a well-initialised ReLU network and
the same shape with sigmoids and a small initialisation, whose early layers barely receive a gradient.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.analyze import FlowAnalyzer


def mlp(act: type[nn.Module], gain: float = 1.0) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(20, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 64), act(),
                          nn.Linear(64, 5))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(gain)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="directory for the reports (default: a temporary directory)")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="gradflow-01-"))
    torch.manual_seed(0)
    x, y = torch.randn(128, 20), torch.randint(0, 5, (128,))

    for name, model in (("relu", mlp(nn.ReLU)), ("sigmoid-small-init", mlp(nn.Sigmoid, gain=0.3))):
        report = FlowAnalyzer(model).analyze(x, y, F.cross_entropy, steps=args.steps, title=f"01 simple MLP: {name}")
        report.print_summary()
        report.print_layers()
        report.print_issues()
        for h in report.get_worst_layers(2):
            print(f"  worst: {h.layer} score {h.score:.0f} ({h.status.value}) {dict(h.components)}")
        report.save_html(out / f"{name}.html")
        report.save_json(out / f"{name}.json")
    print(f"reports written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
