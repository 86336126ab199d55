"""Empirical operator norm sup ||f(x)|| / ||x|| of the whole module over several input distributions."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import DISTRIBUTIONS
from ..context import ModuleContext
from ..result import AnalysisResult
from .common import eval_mode, joint_norm

ID = "operator_norm"


def gain_samples(ctx: ModuleContext, distribution: str, n: int, seed_offset: int) -> list[float]:
    """||f(x)|| / ||x|| for n independent draws (inputs of several names are measured jointly)."""
    gen = ctx.generator(seed_offset)
    gains: list[float] = []
    with torch.no_grad(), eval_mode(ctx.module):
        for _ in range(n):
            x = ctx.inputs(distribution, gen)
            x_norm = joint_norm(x.values())
            if x_norm == 0.0:
                continue
            gains.append(joint_norm([ctx.forward(x)]) / x_norm)
    return gains


def summarize(gains: list[float]) -> dict[str, Any]:
    if not gains:
        return {"max": float("nan"), "mean": float("nan"), "min": float("nan"), "n": 0}
    return {"max": max(gains), "mean": sum(gains) / len(gains), "min": min(gains), "n": len(gains)}


def _zero_input_output(ctx: ModuleContext) -> float:
    with torch.no_grad(), eval_mode(ctx.module):
        zeros = {k: torch.zeros_like(v) for k, v in ctx.inputs("normal", ctx.generator(0)).items()}
        return joint_norm([ctx.forward(zeros)])


def judge(name: str, stats: dict[str, Any], lo: float, hi: float, offset: float) -> AnalysisResult:
    full = f"{ID}.{name}"
    band = f"healthy {lo:g}-{hi:g}"
    if not all(math.isfinite(stats[k]) for k in ("max", "mean")):
        return AnalysisResult(full, stats, False, f"non-finite output/input ratio ({band})", "error", ID)
    head = f"max {stats['max']:.4g}, mean {stats['mean']:.4g}"
    if stats["max"] > hi:
        hint = (
            " (an output offset such as a bias dominates tiny inputs)"
            if name == "small_magnitude" and offset
            else ""
        )
        return AnalysisResult(
            full, stats, False, f"{head}: >> 1, may explode activations ({band}){hint}", "warning", ID
        )
    if stats["mean"] < lo:
        return AnalysisResult(full, stats, False, f"{head}: << 1, signals shrink ({band})", "warning", ID)
    return AnalysisResult(full, stats, True, f"{head} ({band})", "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    lo, hi = ctx.config.ranges.operator_norm
    offset = _zero_input_output(ctx)
    results = []
    for i, dist in enumerate(DISTRIBUTIONS):
        stats = summarize(gain_samples(ctx, dist, ctx.config.n_samples, 100 + i))
        stats["zero_input_output_norm"] = offset
        results.append(judge(dist, stats, lo, hi, offset))
    return results
