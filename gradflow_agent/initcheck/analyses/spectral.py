"""Singular values, spectral radius (largest singular value) and condition number of 2-D+ weights."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..context import ModuleContext
from ..result import AnalysisResult
from .common import per_matrix
from .linalg import as_matrix, condition_number, singular_values

ID = "spectral"
MAX_LISTED = 1024  # singular values kept in the result (the largest ones); the count is always given
MAX_EIG_SIZE = 1024  # a general eigendecomposition of larger square weights costs more than it tells


def spectrum(t: torch.Tensor) -> dict[str, Any]:
    """Spectral summary of the matrix view of one weight (conv kernels: out x in*k*k)."""
    s = singular_values(t)
    matrix = as_matrix(t)
    value: dict[str, Any] = {
        "shape": list(t.shape),
        "matrix_shape": list(matrix.shape),
        "n_singular_values": int(s.numel()),
        "singular_values": s[:MAX_LISTED].tolist(),
        "spectral_radius": float(s[0]),
        "sigma_min": float(s[-1]),
        "condition_number": condition_number(s),
    }
    if matrix.shape[0] == matrix.shape[1] <= MAX_EIG_SIZE:
        # For square matrices also the eigenvalue spectral radius, which never exceeds sigma_max.
        value["max_abs_eigenvalue"] = float(torch.linalg.eigvals(matrix).abs().max())
    return value


def judge(name: str, value: dict[str, Any], max_condition: float) -> AnalysisResult:
    full = f"{ID}.{name}"
    cond = value["condition_number"]
    head = (
        f"sigma_max {value['spectral_radius']:.4g}, sigma_min {value['sigma_min']:.4g}, condition {cond:.4g}"
    )
    if math.isinf(cond):
        return AnalysisResult(full, value, False, f"{head}: singular matrix", "warning", ID)
    if cond > max_condition:
        return AnalysisResult(
            full, value, False, f"{head}: ill-conditioned (> {max_condition:g})", "warning", ID
        )
    return AnalysisResult(full, value, True, f"{head} (healthy < {max_condition:g})", "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    def measure(name: str, p: torch.Tensor) -> AnalysisResult:
        return judge(name, spectrum(p), ctx.config.ranges.condition_number_max)

    return per_matrix(ctx, ID, "spectrum undefined", measure)
