"""Weight distribution: mean, std, skewness and excess kurtosis of every parameter with >= 2 values."""

from __future__ import annotations

from typing import Any

from ..config import HealthyRanges
from ..context import ModuleContext
from ..result import AnalysisResult, skipped
from .linalg import is_finite, moments

ID = "weight_distribution"


def judge(name: str, value: dict[str, Any], ranges: HealthyRanges) -> AnalysisResult:
    full = f"{ID}.{name}"
    if value["skewness"] is None:
        msg = f"constant tensor (value {value['mean']:.4g}): skewness and kurtosis undefined"
        return AnalysisResult(full, value, True, msg, "info", ID)
    head = (
        f"mean {value['mean']:.3g}, std {value['std']:.3g}, skewness {value['skewness']:.3g}, "
        f"kurtosis {value['kurtosis']:.3g}"
    )
    problems = []
    if abs(value["skewness"]) > ranges.skewness_max:
        problems.append(f"|skewness| > {ranges.skewness_max:g} (asymmetric)")
    if value["kurtosis"] > ranges.excess_kurtosis_max:
        problems.append(f"excess kurtosis > {ranges.excess_kurtosis_max:g} (heavy tails)")
    if problems:
        return AnalysisResult(full, value, False, f"{head}: {', '.join(problems)}", "warning", ID)
    return AnalysisResult(full, value, True, head, "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    params = [(n, p) for n, p in ctx.named_parameters() if p.numel() >= 2]
    if not params:
        return [skipped(ID, "no parameter with at least two values")]
    results = []
    for name, p in params:
        if not is_finite(p):
            results.append(AnalysisResult(f"{ID}.{name}", None, False, "contains NaN/Inf", "error", ID))
            continue
        value = {"shape": list(p.shape), **moments(p)}
        results.append(judge(name, value, ctx.config.ranges))
    return results
