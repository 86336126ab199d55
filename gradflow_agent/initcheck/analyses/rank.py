"""Effective rank (singular values above the storage-precision tolerance) and rank ratio of 2-D+ weights."""

from __future__ import annotations

from typing import Any

import torch

from ..config import HealthyRanges
from ..context import ModuleContext
from ..result import AnalysisResult
from .common import per_matrix
from .linalg import (
    as_matrix,
    effective_rank,
    entropy_effective_rank,
    rank_tolerance,
    singular_values,
)

ID = "rank"


def rank_summary(t: torch.Tensor) -> dict[str, Any]:
    s = singular_values(t)
    matrix_shape = tuple(as_matrix(t).shape)
    tol = rank_tolerance(s, matrix_shape, t.dtype)
    rank = effective_rank(s, tol)
    max_rank = min(matrix_shape)
    return {
        "shape": list(t.shape),
        "effective_rank": rank,
        "max_rank": max_rank,
        "rank_ratio": rank / max_rank if max_rank else 0.0,
        "tolerance": tol,
        "entropy_effective_rank": entropy_effective_rank(s),
    }


def judge(name: str, value: dict[str, Any], ranges: HealthyRanges) -> AnalysisResult:
    full = f"{ID}.{name}"
    ratio = value["rank_ratio"]
    head = f"rank {value['effective_rank']}/{value['max_rank']} ({ratio:.0%})"
    if ratio < ranges.rank_ratio_low:
        return AnalysisResult(
            full,
            value,
            False,
            f"{head}: low rank (< {ranges.rank_ratio_low:.0%}), degenerate init?",
            "warning",
            ID,
        )
    if ratio < ranges.rank_ratio_min:
        return AnalysisResult(
            full, value, False, f"{head}: below the healthy {ranges.rank_ratio_min:.0%}", "warning", ID
        )
    return AnalysisResult(full, value, True, f"{head} (healthy > {ranges.rank_ratio_min:.0%})", "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    return per_matrix(ctx, ID, "rank undefined", lambda name, p: judge(name, rank_summary(p), ctx.config.ranges))
