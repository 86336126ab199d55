"""RLPolicyAnalyzer: exploration of a policy network (entropy, action std) on top of its gradient flow.

`action_extractor(output) -> (logits, std, mean, value)` (any may be None; a dict with those keys works
too). Per analysed step, over the batch:

- discrete_entropy_normalized = mean of H(softmax(logits)) / ln(n), n = the number of finite logits of the
  row (masked actions excluded): 0 = deterministic, 1 = uniform;
- continuous_std_mean / continuous_std_min = mean / min of the Gaussian policy's std over batch and action
  dimensions (pass std, not log-std);
- entropy_drop = 1 - (last step's entropy / first step's entropy): how fast exploration falls (only
  meaningful when an optimizer trains the policy during the analysis).

entropy_collapse_risk: HIGH when entropy < min_entropy_threshold / 2; MEDIUM when entropy <
min_entropy_threshold or entropy_drop > collapse_drop (0.5); LOW otherwise; UNKNOWN without logits.
exploration_adequacy: TOO_LOW when entropy < min_entropy_threshold or std < min_std_threshold; TOO_HIGH when
std > max_std_threshold or (if set) entropy > max_entropy_threshold; ADEQUATE otherwise.
Issues: ENTROPY_COLLAPSE (risk MEDIUM/HIGH), LOW_ACTION_STD, EXCESSIVE_EXPLORATION, and the LOW-severity
verdict LOW_EXPLORATION whenever the adequacy is TOO_LOW.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..report.flow_report import section, series
from .base import MODEL, FlowIssue, FlowThresholds, IssueSeverity, IssueType, contract_call, jsonable, make_issue
from .core import FlowEngine
from .engine import AnalysisRun, Collector, Extension, ExtensionResult, batches_from
from .metrics import FlowMetrics

Extracted = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) / ln(number of finite logits), per row (NaN for rows with < 2 actions)."""
    logits = logits.detach().double()
    finite = torch.isfinite(logits)
    logp = torch.log_softmax(torch.where(finite, logits, float("-inf")), dim=-1)
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    n = finite.sum(-1).double()
    return torch.where(n >= 2, h / n.clamp_min(2).log(), float("nan"))


def default_extractor(output: Any) -> Extracted:
    """A tensor output is logits; a tuple is (logits, std, mean, value); a dict has those keys."""
    if isinstance(output, torch.Tensor):
        return output, None, None, None
    if isinstance(output, dict):
        return output.get("logits"), output.get("std"), output.get("mean"), output.get("value")
    if isinstance(output, (tuple, list)):
        vals = list(output)[:4] + [None] * (4 - min(4, len(output)))
        return vals[0], vals[1], vals[2], vals[3]
    raise TypeError(f"cannot read a policy from an output of type {type(output).__name__}: pass action_extractor")


@dataclass(frozen=True)
class PolicyStats:
    """Seed 003's `stats` of a policy (see the module docstring)."""

    discrete_entropy_normalized: float
    continuous_std_mean: float
    continuous_std_min: float
    entropy_collapse_risk: str
    exploration_adequacy: str
    entropy_drop: float = float("nan")
    action_count: int = 0
    action_dims: int = 0
    value_mean: float = float("nan")
    value_std: float = float("nan")
    entropy_history: tuple[float, ...] = field(default=(), repr=False)
    std_history: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


@dataclass(frozen=True)
class PolicyThresholds:
    """The policy view of FlowThresholds (its min_policy_entropy, min/max_action_std, max_policy_entropy,
    entropy_collapse_drop): the names the policy measurements read."""

    min_entropy: float = 0.5
    min_std: float = 0.1
    max_std: float = 2.0
    max_entropy: float | None = None
    collapse_drop: float = 0.5

    @classmethod
    def of(cls, th: FlowThresholds) -> PolicyThresholds:
        return cls(th.min_policy_entropy, th.min_action_std, th.max_action_std,
                   th.max_policy_entropy if math.isfinite(th.max_policy_entropy) else None, th.entropy_collapse_drop)


def collapse_risk(entropy: float, drop: float, th: PolicyThresholds) -> str:
    if not math.isfinite(entropy):
        return "UNKNOWN"
    if entropy < th.min_entropy / 2:
        return "HIGH"
    if entropy < th.min_entropy or (math.isfinite(drop) and drop > th.collapse_drop):
        return "MEDIUM"
    return "LOW"


def adequacy(entropy: float, std: float, th: PolicyThresholds) -> str:
    if not (math.isfinite(entropy) or math.isfinite(std)):
        return "UNKNOWN"
    if (math.isfinite(entropy) and entropy < th.min_entropy) or (math.isfinite(std) and std < th.min_std):
        return "TOO_LOW"
    if (math.isfinite(std) and std > th.max_std) or (th.max_entropy is not None and math.isfinite(entropy)
                                                     and entropy > th.max_entropy):
        return "TOO_HIGH"
    return "ADEQUATE"


class PolicyCollector(Collector):
    def __init__(self, extractor: Callable[[Any], Any] | None) -> None:
        self.extractor = extractor or default_extractor
        self.entropy: list[float] = []
        self.std: list[float] = []
        self.std_min: list[float] = []
        self.values: list[torch.Tensor] = []
        self.actions = 0
        self.dims = 0

    def after_backward(self, run: AnalysisRun, output: Any, loss: torch.Tensor) -> None:
        got = self.extractor(output)
        if isinstance(got, dict):
            got = (got.get("logits"), got.get("std"), got.get("mean"), got.get("value"))
        logits, std, _mean, value = (list(got) + [None] * 4)[:4]
        if isinstance(logits, torch.Tensor):
            e = normalized_entropy(logits)
            self.entropy.append(float(torch.nanmean(e)))
            self.actions = logits.shape[-1]
        if isinstance(std, torch.Tensor):
            s = std.detach().double()
            self.std.append(float(s.mean()))
            self.std_min.append(float(s.min()))
            self.dims = s.shape[-1] if s.ndim else 1
        if isinstance(value, torch.Tensor):
            self.values.append(value.detach().double().reshape(-1).cpu())

    def stats(self, th: PolicyThresholds) -> PolicyStats:
        ent = float(np.nanmean(self.entropy)) if self.entropy else float("nan")
        std = float(np.mean(self.std)) if self.std else float("nan")
        drop = float("nan")
        if len(self.entropy) >= 2 and self.entropy[0] > 0:
            drop = 1.0 - self.entropy[-1] / self.entropy[0]
        vals = torch.cat(self.values) if self.values else None
        return PolicyStats(
            discrete_entropy_normalized=ent, continuous_std_mean=std,
            continuous_std_min=float(np.min(self.std_min)) if self.std_min else float("nan"),
            entropy_collapse_risk=collapse_risk(ent, drop, th), exploration_adequacy=adequacy(ent, std, th),
            entropy_drop=drop, action_count=self.actions, action_dims=self.dims,
            value_mean=float(vals.mean()) if vals is not None else float("nan"),
            value_std=float(vals.std()) if vals is not None and vals.numel() > 1 else float("nan"),
            entropy_history=tuple(self.entropy), std_history=tuple(self.std))


def policy_issues(st: PolicyStats, th: PolicyThresholds, step: int = 0) -> list[FlowIssue]:
    out = []
    e = st.discrete_entropy_normalized
    if st.entropy_collapse_risk in ("HIGH", "MEDIUM"):
        declining = math.isfinite(st.entropy_drop) and st.entropy_drop > th.collapse_drop and e >= th.min_entropy
        msg = (f"policy entropy fell by {st.entropy_drop:.0%} during the analysis (now {e:.2f})" if declining else
               f"normalised policy entropy {e:.2f} < {th.min_entropy:g}: the policy is near-deterministic")
        out.append(make_issue(IssueType.ENTROPY_COLLAPSE, IssueSeverity.HIGH if st.entropy_collapse_risk == "HIGH"
                              else IssueSeverity.MEDIUM, MODEL, e, th.min_entropy, msg + f" (risk "
                              f"{st.entropy_collapse_risk})", step, entropy_drop=st.entropy_drop))
    s = st.continuous_std_mean
    if math.isfinite(s) and s < th.min_std:
        out.append(make_issue(IssueType.LOW_ACTION_STD, IssueSeverity.HIGH if s < th.min_std / 2 else
                              IssueSeverity.MEDIUM, MODEL, s, th.min_std,
                              f"mean action std {s:.3g} < {th.min_std:g}: the Gaussian policy stops exploring", step))
    if st.exploration_adequacy == "TOO_HIGH":
        value, limit = (s, th.max_std) if math.isfinite(s) and s > th.max_std else (e, th.max_entropy or 1.0)
        out.append(make_issue(IssueType.EXCESSIVE_EXPLORATION, IssueSeverity.MEDIUM, MODEL, value, limit,
                              f"exploration too high ({value:.3g} > {limit:g}): the policy acts almost at random",
                              step))
    if st.exploration_adequacy == "TOO_LOW":
        out.append(make_issue(IssueType.LOW_EXPLORATION, IssueSeverity.LOW, MODEL, e if math.isfinite(e) else s,
                              th.min_entropy if math.isfinite(e) else th.min_std,
                              "exploration adequacy TOO_LOW (too deterministic)", step))
    return out


class PolicyExtension(Extension):
    name = "policy"

    def __init__(self, extractor: Callable[[Any], Any] | None = None) -> None:
        self.collector = PolicyCollector(extractor)

    def collectors(self) -> list[Collector]:
        return [self.collector]

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        pth = PolicyThresholds.of(th)
        st = self.collector.stats(pth)
        step = int(run.history.steps[-1]) if run.history is not None else 0
        charts = []
        if st.entropy_history:
            charts.append(series("Normalised policy entropy per step", list(range(len(st.entropy_history))),
                                 {"entropy": list(st.entropy_history)}, xlabel="step", ylabel="H / ln n"))
        if st.std_history:
            charts.append(series("Mean action std per step", list(range(len(st.std_history))),
                                 {"std": list(st.std_history)}, xlabel="step", ylabel="std"))
        sec = section("Policy", summary={"discrete entropy (normalised)": st.discrete_entropy_normalized,
                                         "continuous std (mean)": st.continuous_std_mean,
                                         "entropy collapse risk": st.entropy_collapse_risk,
                                         "exploration adequacy": st.exploration_adequacy,
                                         "entropy drop": st.entropy_drop, "actions": st.action_count,
                                         "value mean": st.value_mean}, series=charts)
        return ExtensionResult(policy_issues(st, pth, step), sec, st)


class RLPolicyAnalyzer(FlowEngine):
    """Policy analyzer. The contract (`analyze(model, inputs, ...) -> FlowReport`, the statistics at
    `report.result("policy")`; `action_extractor` given to the constructor), or seed 003's
    `issues, stats = RLPolicyAnalyzer(policy).analyze(input_fn, loss_fn, steps=20, action_extractor=f)`.
    Its thresholds (min_entropy_threshold, ...) are FlowThresholds'."""

    analyzer_name = "RLPolicyAnalyzer"
    default_steps = 20

    def __init__(self, model: nn.Module | None = None, enable_jacobian: bool = False,
                 enable_vector_analysis: bool = False, min_entropy_threshold: float | None = None,
                 min_std_threshold: float | None = None, max_std_threshold: float | None = None,
                 track_distributions: bool = True, *, max_entropy_threshold: float | None = None,
                 collapse_drop: float | None = None, action_extractor: Callable[[Any], Any] | None = None,
                 optimizer: torch.optim.Optimizer | None = None, thresholds: FlowThresholds | Any = None,
                 **threshold_overrides: float) -> None:
        super().__init__(model, thresholds=thresholds, enable_jacobian=enable_jacobian,
                         enable_vector_analysis=enable_vector_analysis, optimizer=optimizer,
                         min_policy_entropy=min_entropy_threshold, min_action_std=min_std_threshold,
                         max_action_std=max_std_threshold, max_policy_entropy=max_entropy_threshold,
                         entropy_collapse_drop=collapse_drop, **threshold_overrides)
        self.track_distributions = track_distributions
        self.action_extractor = action_extractor

    @property
    def policy_thresholds(self) -> PolicyThresholds:
        return PolicyThresholds.of(self.thresholds)

    def _extensions(self) -> list[Extension]:
        exts = super()._extensions()
        if self.track_distributions:
            exts.append(PolicyExtension(self.action_extractor))
        return exts

    @property
    def policy_stats(self) -> PolicyStats:
        """The policy statistics of the last analysis (UNKNOWN ones before one)."""
        st = self.results.get("policy")
        return st if st is not None else PolicyStats(float("nan"), float("nan"), float("nan"), "UNKNOWN", "UNKNOWN")

    def analyze(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The contract -> FlowReport, or seed 003's `analyze(input_fn, loss_fn, steps=20, action_extractor=None)
        -> (issues, stats)`."""
        if contract_call(args, kwargs, frozenset({"input_fn", "action_extractor"})):
            return super().analyze(*args, **kwargs)
        return self._seed003(*args, **kwargs)

    def _seed003(self, input_fn: Callable[[], Any], loss_fn: Callable[[Any], torch.Tensor], steps: int = 20,
                 action_extractor: Callable[[Any], Any] | None = None) -> tuple[list[FlowIssue], PolicyStats]:
        if action_extractor is not None:
            self.action_extractor = action_extractor
        report = self._analyze(self._bind(None), batches_from(input_fn), loss_fn, steps, None)
        return report.issues, self.policy_stats
