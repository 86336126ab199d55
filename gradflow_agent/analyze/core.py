"""FlowEngine: the one implementation of the `base.Analyzer` contract; every analyzer class is a front end to it.

`analyze(model, inputs, *, loss_fn, targets, steps)` runs the loop (engine.run_analysis) with the extensions of
the analyzer, aggregates per-layer FlowMetrics from the agent's snapshots, runs the agent's rule table on the
aggregate with the analyzer's FlowThresholds (plus relative vanishing, depth structure and bottlenecks), adds the
extensions' issues and sections, and returns a FlowReport whose `results` hold the typed results.

Compression (effective rank of a layer's input / of its output) is judged - BOTTLENECK - only on layers that
own parameters (`judges_compression`); rotary embeddings get no compression ratio at all (`positional_only`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..report.flow_report import FlowReport, section, series
from .base import Analyzer, FlowThresholds, LossFn, resolve_thresholds, sort_issues
from .detectors import bottleneck_issues, depth_issues, depth_profile, scalar_issues
from .engine import AnalysisRun, Extension, contract_batches, default_loss, run_analysis
from .health import DEFAULT_POLICY, HealthPolicy, layer_health, overall_health
from .jacobian import JacobianExtension
from .metrics import compute_metrics
from .vector import VectorExtension

_POSITIONAL = re.compile(r"Rotary|RoPE", re.IGNORECASE)


def positional_only(module: nn.Module) -> bool:
    """A rotary embedding: its output is a function of the positions, not of its input's features."""
    return bool(_POSITIONAL.search(type(module).__name__))


def judges_compression(module: nn.Module) -> bool:
    """Whether a layer's compression ratio means anything (see flow.py's docstring): it owns parameters
    and is not a rotary embedding."""
    return not positional_only(module) and next(module.parameters(recurse=False), None) is not None



# -- the engine -----------------------------------------------------------------------------------------------
class FlowEngine(Analyzer):
    """The one implementation of the `base.Analyzer` contract; analyzer classes differ only in their
    extensions and the typed results they expose."""

    analyzer_name = "FlowEngine"
    default_steps = 10

    def __init__(self, model: nn.Module | None = None, *, thresholds: FlowThresholds | Any = None,
                 enable_jacobian: bool = False, enable_vector_analysis: bool = False,
                 optimizer: torch.optim.Optimizer | None = None, health_policy: HealthPolicy = DEFAULT_POLICY,
                 measure_rank: bool = True, **threshold_overrides: float) -> None:
        self.model = model
        self.thresholds = resolve_thresholds(thresholds, **threshold_overrides)
        self.enable_jacobian = enable_jacobian
        self.enable_vector_analysis = enable_vector_analysis
        self.optimizer = optimizer
        self.health_policy = health_policy
        self.measure_rank = measure_rank
        self.last_run: AnalysisRun | None = None
        self.last_report: FlowReport | None = None
        self.results: dict[str, Any] = {}

    # -- the contract ----------------------------------------------------------------------------------------
    def analyze(self, model: nn.Module | None = None, inputs: Any = None, *, loss_fn: LossFn | None = None,
                targets: Any = None, steps: int | None = None, title: str | None = None) -> FlowReport:
        """Analyse `model` (default: the constructor's) on `inputs` (see base.Analyzer) -> FlowReport."""
        return self._analyze(self._bind(model), contract_batches(inputs, targets), loss_fn, steps, title)

    def _analyze(self, model: nn.Module, batch_fn: Callable[[], tuple[Any, Any]], loss_fn: LossFn | None,
                 steps: int | None, title: str | None) -> FlowReport:
        """The one path every call shape (the contract, the seeds' legacy forms) goes through."""
        report = self._run(model, self._prepare(batch_fn), loss_fn or default_loss,
                           self.default_steps if steps is None else steps, title)
        self._finish(report, model)
        return report

    # -- extension points --------------------------------------------------------------------------------
    def _extensions(self) -> list[Extension]:
        exts: list[Extension] = []
        if self.enable_vector_analysis:
            exts.append(VectorExtension())
        if self.enable_jacobian:
            exts.append(JacobianExtension())
        return exts

    def _prepare(self, batch_fn: Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
        """The batch function as this analyzer feeds it (TemporalAnalyzer cuts sequences)."""
        return batch_fn

    def _finish(self, report: FlowReport, model: nn.Module) -> None:
        """Analyzer-specific additions to the report (sections, meta)."""

    def _bind(self, model: nn.Module | None) -> nn.Module:
        """The model to analyse (the argument, else the constructor's), kept as self.model."""
        model = model if model is not None else self.model
        if model is None:
            raise TypeError("analyze() needs a model (as its first argument or the constructor's)")
        self.model = model
        return model

    def _run(self, model: nn.Module, batch_fn: Callable[[], tuple[Any, Any]], loss_fn: LossFn,
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
                  "created": time.strftime("%Y-%m-%d %H:%M:%S")},
            results=self.results)
        self.last_run, self.last_report = run, report
        return report

    # -- queries -----------------------------------------------------------------------------------------------
    @property
    def report(self) -> FlowReport:
        """The report of the last analysis."""
        if self.last_report is None:
            raise RuntimeError("no analysis yet: call analyze() first")
        return self.last_report

    def get_layer_health(self, layer: str) -> Any:
        return self.report.health[layer]
