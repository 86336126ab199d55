"""StandardAnalyzer (seed 004): feedforward networks (MLPs, CNNs): depth profile, layer types, bottlenecks.

    report = StandardAnalyzer().analyze(cnn_model, x, y, loss_fn)
    StandardAnalyzer.get_layer_type_stats(), .get_depth_profile(), .get_bottlenecks()

Bottlenecks are found by effective rank (see detectors.bottleneck_issues): a layer whose output uses
`bottleneck_ratio` (6) times fewer dimensions than its input, followed by a layer that widens again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..report.flow_report import FlowReport, section, table
from .base import FlowIssue, IssueType, contract_call
from .core import FlowEngine
from .engine import NO_TARGET, batches_from


class StandardAnalyzer(FlowEngine):
    """Feedforward networks: adds a layer-type section. The contract (`analyze(model, inputs, *, loss_fn,
    targets, steps=10) -> FlowReport`), or seed 004's `analyze(model, x, y, loss_fn, steps=10) -> FlowReport`."""

    analyzer_name = "StandardAnalyzer"
    default_steps = 10

    def __init__(self, model: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)

    def analyze(self, *args: Any, **kwargs: Any) -> FlowReport:  # type: ignore[override]
        if contract_call(args, kwargs, frozenset({"x", "y"})):
            return super().analyze(*args, **kwargs)
        return self._seed004(*args, **kwargs)

    def _seed004(self, model: nn.Module | None = None, x: Any = None, y: Any = NO_TARGET,
                 loss_fn: Callable[..., torch.Tensor] | None = None, steps: int = 10, *,
                 title: str | None = None) -> FlowReport:
        return self._analyze(self._bind(model), batches_from(x=x, y=y), loss_fn, steps, title)

    def _finish(self, report: FlowReport, model: nn.Module) -> None:
        stats = self.get_layer_type_stats()
        report.sections["layer_types"] = section(
            "Layer types", tables=[table("Statistics by layer type",
                                         ["type", "layers", "mean pressure", "min pressure", "max pressure",
                                          "mean health", "issues"],
                                         [[t, s["count"], s["mean_pressure"], s["min_pressure"], s["max_pressure"],
                                           s["mean_health"], s["issues"]] for t, s in stats.items()])])
        report.results["layer_types"] = stats

    def get_layer_type_stats(self) -> dict[str, dict[str, float]]:
        """Per layer type: count, mean/min/max pressure (over layers with gradients), mean health, issues."""
        r = self.report
        out: dict[str, dict[str, float]] = {}
        for m in r.layers:
            out.setdefault(m.layer_type, {"count": 0, "_p": [], "_h": [], "issues": 0})
            s = out[m.layer_type]
            s["count"] += 1
            if m.has_gradient:
                s["_p"].append(m.mean_pressure)
            if m.layer in r.health:
                s["_h"].append(r.health[m.layer].score)
                s["issues"] += len(r.health[m.layer].issues)
        for s in out.values():
            p, h = s.pop("_p"), s.pop("_h")
            s["mean_pressure"] = float(np.mean(p)) if p else float("nan")
            s["min_pressure"] = float(np.min(p)) if p else float("nan")
            s["max_pressure"] = float(np.max(p)) if p else float("nan")
            s["mean_health"] = float(np.mean(h)) if h else float("nan")
        return out

    def get_depth_profile(self) -> list[dict[str, Any]]:
        """Parametric layers in forward order: depth index, name, type, pressure, health."""
        r = self.report
        layers = sorted((m for m in r.layers if m.has_gradient), key=lambda m: (m.depth < 0, m.depth))
        return [{"depth": k, "layer": m.layer, "type": m.layer_type, "pressure": m.mean_pressure,
                 "health": r.health[m.layer].score if m.layer in r.health else math.nan}
                for k, m in enumerate(layers)]

    def get_bottlenecks(self) -> list[FlowIssue]:
        return [i for i in self.report.issues if i.issue_type is IssueType.BOTTLENECK]
