"""Parameter norms: Frobenius, operator (largest singular value), sup, std and mean per parameter."""

from __future__ import annotations

from typing import Any

import torch

from ..context import ModuleContext
from ..result import AnalysisResult, skipped
from .linalg import frobenius_norm, is_finite, operator_norm

ID = "parameter_norms"


def parameter_norms(t: torch.Tensor) -> dict[str, Any]:
    """The five norms/statistics of one tensor (population std; operator is NaN for a non-finite tensor)."""
    x = t.detach().to(torch.float64)
    finite = is_finite(x)
    return {
        "shape": list(t.shape),
        "frobenius": frobenius_norm(x),
        "operator": operator_norm(x) if finite else float("nan"),
        "sup": float(x.abs().max()) if x.numel() else 0.0,
        "std": float(x.std(unbiased=False)) if x.numel() else 0.0,
        "mean": float(x.mean()) if x.numel() else 0.0,
    }


def _judge(name: str, t: torch.Tensor, norms: dict[str, Any]) -> AnalysisResult:
    full = f"{ID}.{name}"
    if not is_finite(t):
        nan = int(torch.isnan(t.detach()).sum())
        inf = int(torch.isinf(t.detach()).sum())
        return AnalysisResult(full, norms, False, f"{nan} NaN and {inf} Inf values", "error", ID)
    if t.dim() >= 2 and norms["sup"] == 0.0:
        return AnalysisResult(
            full, norms, False, "all zeros: a degenerate initialization (rank 0)", "warning", ID
        )
    msg = (
        f"frobenius={norms['frobenius']:.4g} operator={norms['operator']:.4g} sup={norms['sup']:.4g} "
        f"std={norms['std']:.4g} mean={norms['mean']:.3g}"
    )
    return AnalysisResult(full, norms, True, msg, "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    params = list(ctx.named_parameters())
    if not params:
        return [skipped(ID, "the module has no parameters")]
    return [_judge(name, p, parameter_norms(p)) for name, p in params]
