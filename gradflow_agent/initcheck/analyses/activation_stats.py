"""Activation statistics (mean, std, max, zero fraction, dead units) of the root module and every leaf.

Collected with forward hooks in eval mode, so that dropout masks are not mistaken for dead units; only
outputs of modules called as modules are seen (a functional `F.relu` is part of its caller's output).
A unit is one output coordinate (the batch dimension, dim 0, pooled); it is dead when it is zero for
every sample of every pass. About half the activations of a healthy ReLU layer are zero, so the
"dead neurons" range of the documentation (healthy < 50 %, > 90 % dead) is applied to dead units, and
a zero fraction above 90 % is an error as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradflow_agent.hooks import add_module_hook

from ..config import HealthyRanges
from ..context import ModuleContext, primary_output
from ..result import AnalysisResult, skipped
from .common import eval_mode

ID = "activation_stats"
ROOT = "<root>"
MAX_PASSES = 10


@dataclass
class Accumulator:
    """Streaming moments (Chan's parallel update) and a fired-unit mask over all passes."""

    module_type: str
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    maximum: float = -math.inf
    zeros: int = 0
    nonfinite: int = 0
    fired: torch.Tensor | None = None
    units_consistent: bool = True

    def add(self, t: torch.Tensor) -> None:
        x = t.detach().to(torch.float64)
        units = (x != 0).any(dim=0) if x.dim() >= 2 else (x != 0).reshape(-1)
        if self.fired is None:
            self.fired = units
        elif self.fired.shape == units.shape:
            self.fired = self.fired | units
        else:  # called with outputs of different shapes: units are not comparable across calls
            self.units_consistent = False
        finite = torch.isfinite(x)
        self.nonfinite += int((~finite).sum())
        x = x[finite]
        n = x.numel()
        if n == 0:
            return
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total
        self.maximum = max(self.maximum, float(x.max()))
        self.zeros += int((x == 0).sum())

    def summary(self) -> dict[str, Any]:
        n = self.count
        dead = None
        if self.fired is not None and self.units_consistent and self.fired.numel():
            dead = float((~self.fired).double().mean())
        return {
            "module_type": self.module_type,
            "mean": self.mean if n else math.nan,
            "std": math.sqrt(self.m2 / n) if n else math.nan,
            "max": self.maximum if n else math.nan,
            "zero_fraction": self.zeros / n if n else math.nan,
            "dead_unit_fraction": dead,
            "units": int(self.fired.numel()) if self.fired is not None else 0,
            "numel": n,
            "nonfinite": self.nonfinite,
        }


def collect(ctx: ModuleContext, passes: int, seed_offset: int = 500) -> dict[str, dict[str, Any]]:
    """Forward `passes` normal batches with hooks on the root and all leaves; one summary per module."""
    targets: dict[str, nn.Module] = {ROOT: ctx.module}
    for name, m in ctx.module.named_modules():
        if name and not any(True for _ in m.children()):
            targets[name] = m
    accs = {name: Accumulator(type(m).__name__) for name, m in targets.items()}
    called: set[str] = set()

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            out = primary_output(output)
            if out is not None:
                accs[name].add(out)
                called.add(name)

        return hook

    handles = [add_module_hook(m, make_hook(name)) for name, m in targets.items()]  # the one hook mechanism
    gen = ctx.generator(seed_offset)
    try:
        with torch.no_grad(), eval_mode(ctx.module):
            for _ in range(passes):
                ctx.call(ctx.inputs("normal", gen))
    finally:
        for h in handles:
            h.remove()
    return {name: accs[name].summary() for name in targets if name in called}


def judge(name: str, value: dict[str, Any], ranges: HealthyRanges) -> AnalysisResult:
    full = f"{ID}.{name}"
    dead = value["dead_unit_fraction"]
    head = (
        f"mean {value['mean']:.3g}, std {value['std']:.3g}, max {value['max']:.3g}, "
        f"zeros {value['zero_fraction']:.0%}" + (f", dead units {dead:.0%}" if dead is not None else "")
    )
    if value["nonfinite"]:
        return AnalysisResult(full, value, False, f"{value['nonfinite']} NaN/Inf activations", "error", ID)
    worst = max(value["zero_fraction"], dead if dead is not None else 0.0)
    if worst > ranges.dead_fraction_error:
        msg = f"{head}: dead (> {ranges.dead_fraction_error:.0%})"
        return AnalysisResult(full, value, False, msg, "error", ID)
    if dead is not None and dead >= ranges.dead_fraction_max:
        msg = f"{head}: many dead units (healthy < {ranges.dead_fraction_max:.0%})"
        return AnalysisResult(full, value, False, msg, "warning", ID)
    return AnalysisResult(full, value, True, head, "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    stats = collect(ctx, passes=min(ctx.config.n_samples, MAX_PASSES))
    if not stats:
        return [skipped(ID, "no module produced a floating-point output")]
    return [judge(name, value, ctx.config.ranges) for name, value in stats.items()]
