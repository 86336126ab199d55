"""GradientFlowAnalyzer (seed 003) and FlowAnalyzer (seed 004): the general-purpose offline analyzers.

Both are core.FlowEngine, the one implementation of the `base.Analyzer` contract:

    report = GradientFlowAnalyzer(model).analyze(model, x, loss_fn=F.cross_entropy, targets=y, steps=20)
    report = FlowAnalyzer().analyze(model, lambda: next(batches), loss_fn=lambda out: out.loss)

The seeds' call shapes still work, translated onto the same path (`_analyze`) and returning what the seeds
documented (derived from the FlowReport, which stays at `analyzer.report`):

    issues = GradientFlowAnalyzer(model).analyze(input_fn, loss_fn, steps=20)   # seed 003: list of issues
    report = FlowAnalyzer(model).analyze(x, y, loss_fn)                         # seed 004: FlowReport

Thresholds are the same for both (default.yaml's `thresholds:`, the rule table's keys, plus the analyzers'
own in FlowThresholds); seed 003's constructor keywords (vanishing_threshold, ...) are overrides of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..report.flow_report import FlowReport
from .base import MODEL, FlowIssue, FlowThresholds, IssueSeverity, IssueType, contract_call, filter_issues
from .core import FlowEngine, judges_compression, positional_only
from .engine import NO_TARGET, Extension, ExtensionResult, batches_from
from .health import DEFAULT_POLICY, HealthPolicy
from .jacobian import JacobianExtension
from .recurrent import RecurrentExtension
from .vector import VectorExtension

__all__ = ["Extension", "ExtensionResult", "FlowAnalyzer", "FlowEngine", "GradientFlowAnalyzer",
           "JacobianExtension", "VectorExtension", "judges_compression", "model_issues", "positional_only"]

_SEED003_KEYWORDS = frozenset({"input_fn", "min_severity", "issue_types", "layer"})


class GradientFlowAnalyzer(FlowEngine):
    """General-purpose gradient-flow analyzer with seed 003's options.

    Detects VANISHING (pressure below the rule table's floor, or 1000x below the model's median), EXPLODING,
    DEAD (ReLU units that never fire, or > `dead` of the gradient elements exactly zero - embeddings excepted),
    UNSTABLE, NUMERICAL (NaN/Inf), SATURATED, STALLED, and the architecture issues BOTTLENECK,
    DECAY/AMPLIFICATION, LAYER_VARIANCE; with `enable_vector_analysis` OSCILLATION and CIRCULATION, with
    `enable_jacobian` LOW_RANK; with `enable_rnn_analyzer` the recurrent issues of RecurrentAnalyzer.
    """

    analyzer_name = "GradientFlowAnalyzer"
    default_steps = 20

    def __init__(self, model: nn.Module | None = None, enable_rnn_analyzer: bool = False,
                 enable_circular_flow_analyser: bool = False, vanishing_threshold: float | None = None,
                 exploding_threshold: float | None = None, dead_threshold: float | None = None,
                 unstable_cv_threshold: float | None = None, *, enable_jacobian: bool = False,
                 enable_vector_analysis: bool = False, optimizer: torch.optim.Optimizer | None = None,
                 thresholds: FlowThresholds | Any = None, health_policy: HealthPolicy = DEFAULT_POLICY,
                 measure_rank: bool = True, **threshold_overrides: float) -> None:
        overrides = {"vanishing": vanishing_threshold, "exploding": exploding_threshold, "dead": dead_threshold,
                     "unstable_cv": unstable_cv_threshold, **threshold_overrides}
        super().__init__(model, thresholds=thresholds, enable_jacobian=enable_jacobian,
                         enable_vector_analysis=enable_vector_analysis or enable_circular_flow_analyser,
                         optimizer=optimizer, health_policy=health_policy, measure_rank=measure_rank,
                         **overrides)
        self.enable_rnn_analyzer = enable_rnn_analyzer
        self.enable_circular_flow_analyser = enable_circular_flow_analyser

    def _extensions(self) -> list[Extension]:
        exts = super()._extensions()
        if self.enable_rnn_analyzer:
            exts.append(RecurrentExtension(jacobian=self.enable_jacobian))
        return exts

    def analyze(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The contract (`analyze(model, inputs, *, loss_fn, targets, steps) -> FlowReport`), or seed 003's
        `analyze(input_fn, loss_fn, steps=20, *, min_severity, issue_types, layer) -> list[FlowIssue]`."""
        if contract_call(args, kwargs, _SEED003_KEYWORDS):
            return super().analyze(*args, **kwargs)
        return self._seed003(*args, **kwargs)

    def _seed003(self, input_fn: Callable[[], Any], loss_fn: Callable[[Any], torch.Tensor], steps: int = 20, *,
                 min_severity: IssueSeverity | str | None = None, issue_types: list[IssueType | str] | None = None,
                 layer: str | None = None) -> list[FlowIssue]:
        report = self._analyze(self._bind(None), batches_from(input_fn), loss_fn, steps, None)
        return filter_issues(report.issues, min_severity=min_severity, types=issue_types, layer=layer)

    def print_summary(self, issues: list[FlowIssue] | None = None, console: Any = None) -> None:
        """Health, issue counts by severity and type, and the issues themselves."""
        self.report.print_summary(console=console)
        self.report.print_issues(issues if issues is not None else self.report.issues, console=console)


class FlowAnalyzer(FlowEngine):
    """Seed 004's engine name. The contract, or seed 004's `analyze(x, y, loss_fn, steps=10) -> FlowReport`
    (loss_fn(output, y); loss_fn(output) when y is omitted)."""

    analyzer_name = "FlowAnalyzer"
    default_steps = 10

    def analyze(self, *args: Any, **kwargs: Any) -> FlowReport:  # type: ignore[override]
        if contract_call(args, kwargs, frozenset({"x", "y"})):
            return super().analyze(*args, **kwargs)
        return self._seed004(*args, **kwargs)

    def _seed004(self, x: Any, y: Any = NO_TARGET, loss_fn: Callable[..., torch.Tensor] | None = None,
                 steps: int = 10, *, title: str | None = None) -> FlowReport:
        return self._analyze(self._bind(None), batches_from(x=x, y=y), loss_fn, steps, title)


def model_issues(issues: list[FlowIssue]) -> list[FlowIssue]:
    return [i for i in issues if i.layer == MODEL]
