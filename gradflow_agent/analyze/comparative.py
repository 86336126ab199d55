"""ComparativeAnalyzer (seed 004): compare analyses, models and checkpoint files; track training.

    comp = ComparativeAnalyzer()
    diff = comp.compare_checkpoints(model, "epoch1.pt", "epoch9.pt", x, y, loss_fn)
    diff.improved(), diff.degraded(), diff.resolved_issues, diff.new_issues
    comp.track_training(model, x, y, loss_fn, step=100); comp.get_health_evolution("fc1")

A layer counts as improved when its health score rose by at least `min_delta` (10) points, degraded when it
fell by as much; an issue is identified by (type, layer). Checkpoints are read with
`torch.load(path, map_location=<model device>, weights_only=True)` (no code runs from the file), as a
state dict or a dict holding one under "state_dict", "model_state_dict" or "model", and loaded into a copy
of the model: the model passed in is never modified. Analyses never step an optimizer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..report.flow_report import FlowReport, section, series, table
from .base import Analyzer, FlowIssue, LossFn, jsonable
from .core import FlowEngine
from .engine import NO_TARGET, batches_from, clone_model, contract_batches, model_device
from .flow import FlowAnalyzer


@dataclass(frozen=True)
class LayerDelta:
    layer: str
    health_a: float
    health_b: float
    pressure_a: float
    pressure_b: float
    verdict: str  # improved / degraded / unchanged / added / removed

    @property
    def health_delta(self) -> float:
        return self.health_b - self.health_a

    @property
    def pressure_ratio(self) -> float:
        if self.pressure_a > 0 and math.isfinite(self.pressure_b):
            return self.pressure_b / self.pressure_a
        return float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = jsonable(self.__dict__)
        d["health_delta"] = jsonable(self.health_delta)
        d["pressure_ratio"] = jsonable(self.pressure_ratio)
        return d


@dataclass(frozen=True)
class Comparison:
    """B relative to A, layer by layer and issue by issue."""

    name_a: str
    name_b: str
    overall_a: float
    overall_b: float
    layers: list[LayerDelta] = field(default_factory=list)
    resolved_issues: list[FlowIssue] = field(default_factory=list)  # in A, not in B
    new_issues: list[FlowIssue] = field(default_factory=list)  # in B, not in A
    persistent_issues: list[FlowIssue] = field(default_factory=list)  # in both (B's record)

    @property
    def overall_delta(self) -> float:
        return self.overall_b - self.overall_a

    @property
    def verdict(self) -> str:
        """improved / degraded / mixed / unchanged, from the layer verdicts and the issue sets."""
        up = bool(self.improved() or self.resolved_issues)
        down = bool(self.degraded() or self.new_issues)
        return "mixed" if up and down else "improved" if up else "degraded" if down else "unchanged"

    def improved(self) -> list[LayerDelta]:
        return [d for d in self.layers if d.verdict == "improved"]

    def degraded(self) -> list[LayerDelta]:
        return [d for d in self.layers if d.verdict == "degraded"]

    def to_dict(self) -> dict[str, Any]:
        return {"name_a": self.name_a, "name_b": self.name_b, "overall_a": jsonable(self.overall_a),
                "overall_b": jsonable(self.overall_b), "overall_delta": jsonable(self.overall_delta),
                "verdict": self.verdict, "layers": [d.to_dict() for d in self.layers],
                "resolved_issues": [i.to_dict() for i in self.resolved_issues],
                "new_issues": [i.to_dict() for i in self.new_issues],
                "persistent_issues": [i.to_dict() for i in self.persistent_issues]}

    def as_section(self) -> dict[str, Any]:
        rows = [[d.layer, d.health_a, d.health_b, d.health_delta, d.pressure_a, d.pressure_b, d.pressure_ratio,
                 d.verdict] for d in self.layers]
        issue_rows = [["resolved", i.issue_type.value, i.layer, i.message] for i in self.resolved_issues]
        issue_rows += [["new", i.issue_type.value, i.layer, i.message] for i in self.new_issues]
        issue_rows += [["persistent", i.issue_type.value, i.layer, i.message] for i in self.persistent_issues]
        return section(f"Comparison: {self.name_a} -> {self.name_b}",
                       summary={"verdict": self.verdict, f"overall health {self.name_a}": self.overall_a,
                                f"overall health {self.name_b}": self.overall_b, "delta": self.overall_delta},
                       tables=[table("Layers", ["layer", f"health {self.name_a}", f"health {self.name_b}", "delta",
                                                f"pressure {self.name_a}", f"pressure {self.name_b}", "ratio",
                                                "verdict"], rows),
                               table("Issues", ["change", "type", "layer", "message"], issue_rows)])

    def print(self, console: Any = None) -> None:
        from .._optional import require
        from ..report.console import ConsoleReporter
        console = console or require("rich.console", "report", "Comparison.print").Console()
        console.print(f"[bold]{self.name_a} -> {self.name_b}[/]: {self.verdict}, overall health "
                      f"{self.overall_a:.0f} -> {self.overall_b:.0f}")
        reporter = ConsoleReporter(console)
        fake = type("R", (), {"sections": {"c": self.as_section()}})()
        reporter.print_sections(fake)


def compare_reports(a: FlowReport, b: FlowReport, name_a: str = "a", name_b: str = "b",
                    min_delta: float = 10.0) -> Comparison:
    """Layer-by-layer and issue-by-issue comparison of two reports."""
    la = {m.layer: m for m in a.layers}
    lb = {m.layer: m for m in b.layers}
    deltas = []
    for name in list(la) + [n for n in lb if n not in la]:
        ha = a.health[name].score if name in a.health else float("nan")
        hb = b.health[name].score if name in b.health else float("nan")
        if name not in lb:
            verdict = "removed"
        elif name not in la:
            verdict = "added"
        elif hb - ha >= min_delta:
            verdict = "improved"
        elif ha - hb >= min_delta:
            verdict = "degraded"
        else:
            verdict = "unchanged"
        deltas.append(LayerDelta(name, ha, hb, la[name].mean_pressure if name in la else float("nan"),
                                 lb[name].mean_pressure if name in lb else float("nan"), verdict))
    key_a = {(i.issue_type, i.layer): i for i in a.issues}
    key_b = {(i.issue_type, i.layer): i for i in b.issues}
    return Comparison(name_a, name_b, a.overall_score, b.overall_score, deltas,
                      [i for k, i in key_a.items() if k not in key_b], [i for k, i in key_b.items() if k not in key_a],
                      [i for k, i in key_b.items() if k in key_a])


def load_state_dict(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file, read with weights_only=True (see the module docstring)."""
    obj = torch.load(path, map_location=device, weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(f"{path}: no state dict found (expected a mapping of tensors, or one under 'state_dict', "
                     "'model_state_dict' or 'model')")


class ComparativeAnalyzer(Analyzer):
    """Keeps named analyses and a training timeline; compares any two of them.

    `analyze(model, inputs, *, loss_fn, targets, steps, title)` is the contract: it analyses with the factory's
    analyzer (any FlowEngine) and keeps the report under `title`; the comparisons take those names."""

    analyzer_name = "ComparativeAnalyzer"

    def __init__(self, steps: int = 5, analyzer_factory: Callable[[nn.Module], FlowEngine] | None = None,
                 min_delta: float = 10.0) -> None:
        self.steps = steps
        self.default_steps = steps
        self.factory = analyzer_factory or (lambda m: FlowAnalyzer(m))
        self.min_delta = min_delta
        self.analyses: dict[str, FlowReport] = {}
        self.timeline: list[tuple[int, FlowReport]] = []

    def analyze(self, model: nn.Module | None = None, inputs: Any = None, *, loss_fn: LossFn | None = None,
                targets: Any = None, steps: int | None = None, title: str | None = None) -> FlowReport:
        """Analyse `model` (the contract) and keep the report under `title` (default: model_<n>)."""
        if model is None:
            raise TypeError("ComparativeAnalyzer.analyze() needs a model")
        return self._keep(model, contract_batches(inputs, targets), loss_fn, steps, title)

    def _keep(self, model: nn.Module, batch_fn: Callable[[], tuple[Any, Any]], loss_fn: LossFn | None,
              steps: int | None, name: str | None) -> FlowReport:
        name = name or f"model_{len(self.analyses)}"
        report = self.factory(model)._analyze(model, batch_fn, loss_fn, steps or self.steps, name)
        self.analyses[name] = report
        return report

    def analyze_model(self, model: nn.Module, x: Any, y: Any = NO_TARGET,
                      loss_fn: Callable[..., torch.Tensor] | None = None, name: str | None = None,
                      steps: int | None = None) -> FlowReport:
        """Seed 004's form: analyse model(x) with loss_fn(output, y) and keep the report under `name`."""
        return self._keep(model, batches_from(x=x, y=y), loss_fn, steps, name)

    def compare(self, a: str | FlowReport, b: str | FlowReport) -> Comparison:
        """Compare two stored analyses (by name) or two reports."""
        ra = self.analyses[a] if isinstance(a, str) else a
        rb = self.analyses[b] if isinstance(b, str) else b
        return compare_reports(ra, rb, a if isinstance(a, str) else ra.title, b if isinstance(b, str) else rb.title,
                               self.min_delta)

    def compare_models(self, model_a: nn.Module, model_b: nn.Module, x: Any, y: Any = NO_TARGET,
                       loss_fn: Callable[..., torch.Tensor] | None = None,
                       names: tuple[str, str] = ("model_a", "model_b")) -> Comparison:
        self.analyze_model(model_a, x, y, loss_fn, names[0])
        self.analyze_model(model_b, x, y, loss_fn, names[1])
        return self.compare(*names)

    def compare_checkpoints(self, model: nn.Module, path_a: str | os.PathLike, path_b: str | os.PathLike, x: Any,
                            y: Any = NO_TARGET, loss_fn: Callable[..., torch.Tensor] | None = None) -> Comparison:
        """Load each checkpoint into a copy of `model` (weights_only=True) and compare their analyses."""
        names = (os.path.basename(os.fspath(path_a)), os.path.basename(os.fspath(path_b)))
        if names[0] == names[1]:
            names = (os.fspath(path_a), os.fspath(path_b))
        device = model_device(model)
        for name, path in zip(names, (path_a, path_b)):
            copy = clone_model(model)
            copy.load_state_dict(load_state_dict(path, device))
            self.analyze_model(copy, x, y, loss_fn, name)
        return self.compare(*names)

    def track_training(self, model: nn.Module, x: Any, y: Any = NO_TARGET,
                       loss_fn: Callable[..., torch.Tensor] | None = None, step: int = 0) -> FlowReport:
        """Analyse the model as it is at training step `step` and add it to the timeline."""
        report = self.factory(model)._analyze(model, batches_from(x=x, y=y), loss_fn, self.steps, f"step {step}")
        self.timeline.append((int(step), report))
        self.timeline.sort(key=lambda t: t[0])
        return report

    def get_health_evolution(self, layer: str | None = None) -> list[tuple[int, float]]:
        """(step, health score) of one layer over the timeline; the overall score when layer is None."""
        out = []
        for step, r in self.timeline:
            if layer is None:
                out.append((step, r.overall_score))
            elif layer in r.health:
                out.append((step, r.health[layer].score))
        return out

    def get_pressure_evolution(self, layer: str) -> list[tuple[int, float]]:
        """(step, mean gradient pressure) of one layer over the timeline."""
        out = []
        for step, r in self.timeline:
            for m in r.layers:
                if m.layer == layer:
                    out.append((step, m.mean_pressure))
        return out

    def evolution_section(self, layers: list[str] | None = None) -> dict[str, Any]:
        """A report section with the health and pressure of `layers` (default: all) over the timeline."""
        if not self.timeline:
            return section("Training evolution", notes="no tracked steps")
        steps = [s for s, _ in self.timeline]
        names = layers or [m.layer for m in self.timeline[-1][1].layers if m.has_gradient]
        health = {"overall": [s for _, s in self.get_health_evolution()]}
        health.update({n: [v for _, v in self.get_health_evolution(n)] for n in names})
        pressure = {n: [v for _, v in self.get_pressure_evolution(n)] for n in names}
        return section("Training evolution", series=[
            series("Health over training", steps, health, xlabel="step", ylabel="health"),
            series("Gradient pressure over training", steps, pressure, xlabel="step", ylabel="pressure", log=True)])
