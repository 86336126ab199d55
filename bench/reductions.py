"""Micro-timings behind choices in gradflow_agent/stats/activations.py and gradients.py (1 thread, CPU):

- exact zeros are counted as sign().abs_().sum(), not torch.count_nonzero, which branches per element
  and slows down several-fold on ReLU outputs (half zeros); on float32/float64 CPU tensors numpy's
  count over a bool array (`np.count_nonzero(a != 0)`, same memory) is faster still;
- the strided activation view is copied to a contiguous tensor before it is reduced: reductions over a
  row-strided view take several times longer than over the copy.

    python bench/reductions.py
"""

from __future__ import annotations

import time

import numpy as np
import torch


def per_call_us(fn, repeat: int = 500) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e6


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    relu = torch.relu(torch.randn(64, 1024))
    dense = torch.randn(64, 1024)
    assert torch.count_nonzero(relu).item() == torch.sign(relu).abs_().sum().item() == \
        np.count_nonzero(relu.numpy() != 0)
    print(f"{'64K elements':<44} {'us/call':>8}")
    rows = [
        ("count_nonzero, ReLU output (half zeros)", lambda: torch.count_nonzero(relu)),
        ("sign().abs_().sum(), ReLU output", lambda: torch.sign(relu).abs_().sum()),
        ("count_nonzero, Gaussian (no zeros)", lambda: torch.count_nonzero(dense)),
        ("np.count_nonzero(a != 0), ReLU output", lambda: np.count_nonzero(relu.numpy() != 0)),
    ]
    big = torch.randn(256, 1024)
    strided = big[::4]
    contiguous = strided.contiguous()
    rows += [
        ("vector_norm, row-strided view (256x1024)[::4]", lambda: torch.linalg.vector_norm(strided)),
        ("copy of that view to contiguous", lambda: strided.contiguous()),
        ("vector_norm, contiguous copy", lambda: torch.linalg.vector_norm(contiguous)),
    ]
    for name, fn in rows:
        print(f"{name:<44} {per_call_us(fn):>8.1f}")


if __name__ == "__main__":
    main()
