"""Small helpers shared by several analyses (mode switching, joint norms, non-finite counts, per-weight runs)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..context import ModuleContext
from ..result import AnalysisResult, skipped
from .linalg import is_finite


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate a deterministic function (dropout off, running statistics), then restore the mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def train_mode(module: nn.Module) -> Iterator[None]:
    """Behave as the first training step would (batch statistics), then restore the mode."""
    was_training = module.training
    module.train()
    try:
        yield
    finally:
        module.train(was_training)


def joint_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of several tensors taken as one vector, accumulated in float64."""
    total = 0.0
    for t in tensors:
        total += float(torch.linalg.vector_norm(t.detach().to(torch.float64)) ** 2)
    return total**0.5


def nonfinite_counts(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    nan = inf = 0
    for t in tensors:
        d = t.detach()
        nan += int(torch.isnan(d).sum())
        inf += int(torch.isinf(d).sum())
    return {"nan": nan, "inf": inf}


def abs_max(tensors: Iterable[torch.Tensor]) -> float:
    values = [float(t.detach().abs().max()) for t in tensors if t.numel()]
    return max(values) if values else 0.0


def per_matrix(
    ctx: ModuleContext, analysis_id: str, undefined: str, judge: Callable[[str, torch.Tensor], AnalysisResult]
) -> list[AnalysisResult]:
    """judge(name, weight) for every 2-D+ parameter; an error result, "contains NaN/Inf: {undefined}", for a
    non-finite one; a skipped result when the module has none."""
    matrices = ctx.matrices()
    if not matrices:
        return [skipped(analysis_id, "no parameter with two or more dimensions (no 2-D weight)")]
    results = []
    for name, p in matrices:
        if not is_finite(p):
            results.append(
                AnalysisResult(
                    f"{analysis_id}.{name}", None, False, f"contains NaN/Inf: {undefined}", "error", analysis_id
                )
            )
            continue
        results.append(judge(name, p))
    return results
