"""GradientFlowAnalyzer (seed 003) and FlowAnalyzer (seed 004): the general-purpose offline analyzers.

    analyzer = GradientFlowAnalyzer(model)
    issues = analyzer.analyze(input_fn=lambda: torch.randn(32, 784),
                              loss_fn=lambda out: F.cross_entropy(out, targets), steps=20)
    analyzer.print_summary(issues)

    report = FlowAnalyzer(model).analyze(x, y, loss_fn)    # loss_fn(output, y) -> FlowReport
    report.save_html("flow.html")

Both run the same engine: the agent is attached for `steps` forward/backward passes (one snapshot per
step), per-layer FlowMetrics are aggregated from the snapshots, the agent's detectors run on the
aggregate with the analyzer's thresholds, depth and bottleneck structure is checked, and optional
extensions (vector analysis, Jacobian spectra, recurrent/attention/policy analysis) add their own
measurements. Only the defaults differ: seed 003's thresholds (vanishing 1e-6, exploding 10) for
GradientFlowAnalyzer, seed 004's (0.01, 100) for FlowAnalyzer.

Compression (effective rank of a layer's input / of its output) is judged - BOTTLENECK - only on layers that
own parameters: a learned map from the features it receives to the features it returns. A parameterless
module's output need not be a function of the tensor its hook sees as input (a rotary embedding returns
cos/sin of the positions whatever the hidden states: a "compression" of 12x on a healthy model), and where
it is (activations, pooling, reshapes) its rank change is fixed by design or judged by the dead and
saturation detectors. Rotary embeddings (`*RotaryEmbedding*`, `*RoPE*` types) get no compression ratio at
all (their input rank is left NaN), whatever they own. With `enable_jacobian`, a recurrent module
(nn.RNN/LSTM/GRU) is judged on its recurrent weights weight_hh_l{k} (see recurrent.recurrent_weight_spectra),
not on its first parameter (the input weight weight_ih_l0).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..report.flow_report import FlowReport, section, series, table
from .base import (
    MODEL,
    SEED003,
    SEED004,
    FlowIssue,
    FlowThresholds,
    IssueSeverity,
    IssueType,
    filter_issues,
    sort_issues,
)
from .detectors import bottleneck_issues, depth_issues, depth_profile, scalar_issues
from .engine import NO_TARGET, AnalysisRun, Collector, batches_from, run_analysis
from .health import DEFAULT_POLICY, HealthPolicy, layer_health, overall_health
from .jacobian import jacobian_issues, layer_spectra
from .metrics import FlowMetrics, compute_metrics
from .vector import GradientDirections, vector_issues


@dataclass
class ExtensionResult:
    issues: list[FlowIssue] = field(default_factory=list)
    section: dict[str, Any] | None = None
    stats: Any = None


class Extension:
    """An add-on measurement of an analysis: its collectors, then issues and a report section from the run."""

    name = "extension"

    def collectors(self) -> list[Collector]:
        return []

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        raise NotImplementedError


class VectorExtension(Extension):
    name = "vector"

    def __init__(self, max_elements: int = 1 << 15) -> None:
        self.directions = GradientDirections(max_elements)

    def collectors(self) -> list[Collector]:
        return [self.directions]

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        vm = self.directions.metrics(run)
        rows = [[m.layer, m.coherence, m.turning_angle_deg, m.curl, np.degrees(m.rotation_rate),
                 np.degrees(m.total_rotation), m.plane_energy, m.divergence] for m in vm]
        sec = section("Vector analysis", summary={"layers": len(vm)},
                      tables=[table("Gradient directions per layer",
                                    ["layer", "coherence", "turning deg", "curl", "rotation deg/step",
                                     "total rotation deg", "plane energy", "divergence (nats)"], rows)],
                      notes="coherence = mean cos of successive gradients; curl = turning consistency in the "
                            "top-2 principal plane; divergence = ln backward gain of the layer.")
        return ExtensionResult(vector_issues(vm, th, run.history.steps[-1]), sec, {m.layer: m for m in vm})


_POSITIONAL = re.compile(r"Rotary|RoPE", re.IGNORECASE)


def positional_only(module: nn.Module) -> bool:
    """A rotary embedding: its output is a function of the positions, not of its input's features."""
    return bool(_POSITIONAL.search(type(module).__name__))


def judges_compression(module: nn.Module) -> bool:
    """Whether a layer's compression ratio means anything (see the module docstring): it owns parameters
    and is not a rotary embedding."""
    return not positional_only(module) and next(module.parameters(recurse=False), None) is not None


class JacobianExtension(Extension):
    name = "jacobian"

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        spectra = []
        for layer in run.layers:
            if isinstance(layer.module, nn.RNNBase):  # the recurrent weights, not weight_ih_l0
                from .recurrent import recurrent_weight_spectra
                spectra.extend(recurrent_weight_spectra(layer.name, layer.module))
            else:
                spectra.extend(layer_spectra([layer]))
        rows = [[s.layer, "x".join(map(str, s.shape)), s.spectral_norm, s.condition_number, s.effective_rank,
                 s.stable_rank, s.spectral_radius] for s in spectra]
        sec = section("Jacobian (weight spectra)", summary={"matrices": len(spectra)},
                      tables=[table("Weight spectra", ["layer", "shape", "spectral norm", "condition number",
                                                       "effective rank", "stable rank", "spectral radius"], rows)])
        return ExtensionResult(jacobian_issues(spectra, th, run.history.steps[-1]), sec,
                               {s.layer: s for s in spectra})


class FlowEngine:
    """The shared analysis engine (see the module docstring); analyzers are thin front ends to it."""

    default_thresholds: FlowThresholds = SEED003
    analyzer_name = "FlowEngine"

    def __init__(self, model: nn.Module | None = None, *, thresholds: FlowThresholds | None = None,
                 enable_jacobian: bool = False, enable_vector_analysis: bool = False,
                 optimizer: torch.optim.Optimizer | None = None, health_policy: HealthPolicy = DEFAULT_POLICY,
                 measure_rank: bool = True, **threshold_overrides: float) -> None:
        self.model = model
        self.thresholds = (thresholds or self.default_thresholds).replace(**threshold_overrides)
        self.enable_jacobian = enable_jacobian
        self.enable_vector_analysis = enable_vector_analysis
        self.optimizer = optimizer
        self.health_policy = health_policy
        self.measure_rank = measure_rank
        self.last_run: AnalysisRun | None = None
        self.last_report: FlowReport | None = None
        self.results: dict[str, Any] = {}

    # -- extension points --------------------------------------------------------------------------------
    def _extensions(self) -> list[Extension]:
        exts: list[Extension] = []
        if self.enable_vector_analysis:
            exts.append(VectorExtension())
        if self.enable_jacobian:
            exts.append(JacobianExtension())
        return exts

    def _bind(self, model: nn.Module | None, loss_fn: Callable[..., torch.Tensor] | None) -> nn.Module:
        """The model to analyse (the argument, else the constructor's), kept as self.model; both it and
        loss_fn are required."""
        model = model if model is not None else self.model
        if model is None or loss_fn is None:
            raise TypeError("analyze() needs a model and a loss_fn")
        self.model = model
        return model

    # -- the engine ----------------------------------------------------------------------------------------
    def _run(self, model: nn.Module, batch_fn: Callable[[], tuple[Any, Any]], loss_fn: Callable[..., torch.Tensor],
             steps: int, title: str | None = None) -> FlowReport:
        t0 = time.perf_counter()
        exts = self._extensions()
        collectors = [c for e in exts for c in e.collectors()]
        run = run_analysis(model, batch_fn, loss_fn, steps, optimizer=self.optimizer, collectors=collectors,
                           measure_rank=self.measure_rank)
        th = self.thresholds
        agg = run.history.aggregate()
        metrics = compute_metrics(run.history, agg, order=run.flow.order, rank_in=run.flow.effective_rank_in(),
                                  rank_out=run.flow.effective_rank_out(), log_gain=run.flow.log_gain(),
                                  width=run.flow.width)
        modules = {layer.name: layer.module for layer in run.layers}
        metrics = [dataclasses.replace(m, effective_rank_in=math.nan) if m.layer in modules and
                   positional_only(modules[m.layer]) else m for m in metrics]
        judged = {name for name, module in modules.items() if judges_compression(module)}
        step = int(run.history.steps[-1])
        profile = depth_profile(metrics)
        issues = scalar_issues(agg, th) + depth_issues(profile, th, step) + \
            [i for i in bottleneck_issues(metrics, th, step) if i.layer in judged]
        sections: dict[str, dict[str, Any]] = {}
        if profile is not None:
            sections["depth"] = section(
                "Depth profile", summary={"total decay (decades)": profile.total_decay,
                                          "slope (decades/layer)": profile.slope,
                                          "residual std (decades)": profile.residual_std},
                series=[series("log10 pressure by depth", list(range(len(profile.layers))),
                               {"log10 pressure": list(profile.log10_pressure),
                                "trend": [profile.intercept + profile.slope * d for d in range(len(profile.layers))]},
                               xlabel="parametric layer (forward order)", ylabel="log10 pressure",
                               labels=list(profile.layers))])
        self.results = {"depth_profile": profile}
        for ext in exts:
            res = ext.evaluate(run, metrics, th)
            issues.extend(res.issues)
            if res.section is not None:
                sections[ext.name] = res.section
            self.results[ext.name] = res.stats
        order = {m.layer: m.depth for m in metrics}
        issues = sort_issues(issues, order)
        health = {m.layer: layer_health(m.layer, m.mean_pressure, m.turbulence, issues, self.health_policy)
                  for m in metrics}
        model_issues = [i for i in issues if i.layer not in health]
        score, status = overall_health(health.values(), model_issues, self.health_policy)
        report = FlowReport(
            title=title or f"{self.analyzer_name}: {type(model).__name__}", layers=metrics, health=health,
            issues=issues, overall_score=score, overall_status=status.value,
            # the loop's own losses: with an optimizer the agent files a step's loss under the next interval
            history={"steps": run.history.steps.tolist(), "loss": list(run.losses),
                     "grad_norm": run.history.grad_norm.tolist()},
            sections=sections,
            meta={"analyzer": self.analyzer_name, "model": type(model).__name__, "steps": steps,
                  "thresholds": th.to_dict(), "elapsed_seconds": time.perf_counter() - t0,
                  "torch": torch.__version__, "device": str(run.device), "probe_errors": run.errors,
                  "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.last_run, self.last_report = run, report
        return report

    # -- queries -----------------------------------------------------------------------------------------------
    @property
    def report(self) -> FlowReport:
        """The report of the last analysis."""
        if self.last_report is None:
            raise RuntimeError("no analysis yet: call analyze() first")
        return self.last_report

    def get_layer_health(self, layer: str):
        return self.report.health[layer]


class GradientFlowAnalyzer(FlowEngine):
    """General-purpose gradient-flow analyzer with seed 003's options and defaults.

    Detects VANISHING (pressure < vanishing_threshold), EXPLODING (> exploding_threshold), DEAD (> dead_threshold
    of gradient elements or ReLU outputs exactly zero, or most units never firing), UNSTABLE (turbulence >
    unstable_cv_threshold), NUMERICAL (NaN/Inf), SATURATED, STALLED, and the architecture issues BOTTLENECK,
    DECAY/AMPLIFICATION, LAYER_VARIANCE; with `enable_vector_analysis` OSCILLATION and CIRCULATION, with
    `enable_jacobian` LOW_RANK; with `enable_rnn_analyzer` the recurrent issues of RecurrentAnalyzer.
    """

    analyzer_name = "GradientFlowAnalyzer"
    default_thresholds = SEED003

    def __init__(self, model: nn.Module, enable_rnn_analyzer: bool = False,
                 enable_circular_flow_analyser: bool = False, vanishing_threshold: float = SEED003.vanishing,
                 exploding_threshold: float = SEED003.exploding, dead_threshold: float = SEED003.dead,
                 unstable_cv_threshold: float = SEED003.unstable_cv, *, enable_jacobian: bool = False,
                 enable_vector_analysis: bool = False, optimizer: torch.optim.Optimizer | None = None,
                 thresholds: FlowThresholds | None = None, health_policy: HealthPolicy = DEFAULT_POLICY,
                 measure_rank: bool = True, **threshold_overrides: float) -> None:
        base = (thresholds or SEED003).replace(vanishing=vanishing_threshold, exploding=exploding_threshold,
                                               dead=dead_threshold, unstable_cv=unstable_cv_threshold)
        super().__init__(model, thresholds=base, enable_jacobian=enable_jacobian,
                         enable_vector_analysis=enable_vector_analysis or enable_circular_flow_analyser,
                         optimizer=optimizer, health_policy=health_policy, measure_rank=measure_rank,
                         **threshold_overrides)
        self.enable_rnn_analyzer = enable_rnn_analyzer
        self.enable_circular_flow_analyser = enable_circular_flow_analyser

    def _extensions(self) -> list[Extension]:
        exts = super()._extensions()
        if self.enable_rnn_analyzer:
            from .recurrent import RecurrentExtension
            exts.append(RecurrentExtension(jacobian=self.enable_jacobian))
        return exts

    def analyze(self, input_fn: Callable[[], Any], loss_fn: Callable[[Any], torch.Tensor], steps: int = 20, *,
                min_severity: IssueSeverity | str | None = None, issue_types: list[IssueType | str] | None = None,
                layer: str | None = None) -> list[FlowIssue]:
        """Run `steps` forward/backward passes on input_fn() and return the issues found (most severe first).

        input_fn() -> the model input (a tuple is unpacked, a dict passed as keywords); loss_fn(output) -> loss.
        The model's parameters are not changed unless an optimizer was given; its gradients are restored.
        """
        report = self._run(self.model, batches_from(input_fn), loss_fn, steps)
        return filter_issues(report.issues, min_severity=min_severity, types=issue_types, layer=layer)

    def print_summary(self, issues: list[FlowIssue] | None = None, console: Any = None) -> None:
        """Health, issue counts by severity and type, and the issues themselves."""
        self.report.print_summary(console=console)
        self.report.print_issues(issues if issues is not None else self.report.issues, console=console)


class FlowAnalyzer(FlowEngine):
    """Seed 004's engine: `FlowAnalyzer(model).analyze(x, y, loss_fn)` -> FlowReport (seed 004 thresholds)."""

    analyzer_name = "FlowAnalyzer"
    default_thresholds = SEED004

    def analyze(self, x: Any, y: Any = NO_TARGET, loss_fn: Callable[..., torch.Tensor] | None = None,
                steps: int = 10, *, title: str | None = None) -> FlowReport:
        """Analyse `steps` passes of model(x) with loss_fn(output, y) (loss_fn(output) when y is omitted)."""
        if loss_fn is None:
            raise TypeError("loss_fn is required")
        return self._run(self.model, batches_from(x=x, y=y), loss_fn, steps, title)


def model_issues(issues: list[FlowIssue]) -> list[FlowIssue]:
    return [i for i in issues if i.layer == MODEL]
