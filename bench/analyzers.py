"""Analyzer run time, this tree against a baseline tree (e.g. the last commit), on a mid-sized model.

    git archive HEAD gradflow_agent | tar -x -C /tmp/baseline     # the "before"
    python bench/analyzers.py --baseline /tmp/baseline [--steps 6] [--repeat 3] [--device cpu|cuda]

Each tree runs in its own subprocess (same model, seed, inputs and call - the seed-003 call shape both
trees accept); the best of `--repeat` runs per analyzer is printed, then after/before ratios. Not a test:
a measurement to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[4]))
from gradflow_agent.analyze import GradientFlowAnalyzer, TransformerAnalyzer
from gradflow_agent.analyze import pathologies as P
steps, repeat, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
def model():  # mid-sized: 4 pre-norm blocks, d=256, 8 heads, FFN 1024 (~3.2 M parameters), 64 tokens x 16
    return P.TinyEncoder(layers=4, d=256, heads=8, ff=1024, vocab=1000, classes=10).to(device)
tok = torch.randint(0, 1000, (16, 64), device=device)
lab = torch.randint(0, 10, (16,), device=device)
loss = lambda out: F.cross_entropy(out, lab)
out = {}
for name, make in (("GradientFlowAnalyzer", lambda m: GradientFlowAnalyzer(m)),
                   ("GradientFlowAnalyzer+vector+jacobian",
                    lambda m: GradientFlowAnalyzer(m, enable_vector_analysis=True, enable_jacobian=True)),
                   ("TransformerAnalyzer", lambda m: TransformerAnalyzer(m))):
    best = float("inf")
    for _ in range(repeat + 1):  # the first run warms up (allocator, kernels, imports)
        m = model()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        make(m).analyze(lambda: tok, loss, steps=steps)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0) if _ else best
    out[name] = best
print(json.dumps(out))
"""


def run(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), str(args.repeat), args.device,
                          str(args.threads)], env=env, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="a tree holding the 'before' gradflow_agent/")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    before, after = run(args.baseline, args), run(HERE, args)
    print(f"{'analyzer':40s} {'before s':>9s} {'after s':>9s} {'after/before':>13s}")
    for name in before:
        print(f"{name:40s} {before[name]:9.3f} {after[name]:9.3f} {after[name] / before[name]:13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
