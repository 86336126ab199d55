"""Gradient-flow detectors over a whole analysis: the agent's detectors on the aggregate, plus depth structure.

Scalar issues (VANISHING, EXPLODING, DEAD, UNSTABLE, NUMERICAL, SATURATED, STALLED) come from the agent's
own rules (`gradflow_agent.detect.rules`) run on the aggregated snapshot with the analyzer's thresholds,
so a live alert and an offline analysis agree; their severities go through analyze/health.py's one map.
VANISHING is also judged relative to the model's median pressure (`relative_vanishing`). Seed 003's
"DEAD: > 90% of gradients are zero" is added for parametric layers other than embeddings
(`sparse_gradient`). Depth structure (DECAY, AMPLIFICATION, LAYER_VARIANCE) and BOTTLENECK are new.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..detect import rules
from ..detect.spec import rule, severity_rank
from ..snapshot import Snapshot
from .base import (
    FROM_AGENT_KIND,
    MODEL,
    FlowIssue,
    FlowThresholds,
    IssueSeverity,
    IssueType,
    jsonable,
    make_issue,
)
from .health import from_agent_severity, recommendation
from .metrics import FlowMetrics

#: Layer types whose parameter gradient is row-sparse by construction: an embedding's rows that no token of the
#: batch indexed (BERT's 512 position rows for a 16-token batch, most of a vocabulary) get exactly zero
#: gradient. Zero-gradient elements say nothing about dead units there, so they are never judged DEAD on it.
_SPARSE_GRADIENT = ("Embedding", "EmbeddingBag", "Embeddings")


def sparse_gradient(layer_type: str) -> bool:
    """Whether a layer type's gradient is row-sparse by construction (an embedding table)."""
    return layer_type.endswith(_SPARSE_GRADIENT)


def agent_advice(issue: FlowIssue) -> FlowIssue:
    """The issue with the standard recommendation when it has none (the agent's, for the types its rule table
    shares)."""
    if issue.recommendation:
        return issue
    return dataclasses.replace(issue, recommendation=recommendation(issue.issue_type))


def agent_thresholds(th: FlowThresholds) -> SimpleNamespace:
    """The analyzer's thresholds in the shape of the agent's `thresholds:` config section."""
    return SimpleNamespace(warmup_steps=0, vanishing=th.vanishing, exploding=th.exploding, dead_ratio=th.dead,
                           dead_unit_ratio=th.dead_unit_ratio, unstable_cv=th.unstable_cv,
                           saturation_ratio=th.saturation_ratio, stalled_update_ratio=th.stalled_update_ratio)


def scalar_issues(aggregate: Snapshot, th: FlowThresholds) -> list[FlowIssue]:
    """The agent's detectors (the rule table) on the aggregate, as FlowIssues with the one severity map, plus
    relative VANISHING (see `relative_vanishing`) and zero-gradient DEAD layers (embeddings excepted)."""
    out = []
    for issue in rules.detect(aggregate, agent_thresholds(th)):
        out.append(FlowIssue(FROM_AGENT_KIND[issue.kind], from_agent_severity(issue.severity), issue.layer,
                             issue.value, issue.threshold, issue.message, issue.recommendation, issue.step,
                             {"source": "gradflow_agent.detect.rules"}))
    out += relative_vanishing(aggregate, th, {i.layer for i in out if i.issue_type is IssueType.VANISHING})
    dead = {i.layer for i in out if i.issue_type is IssueType.DEAD}
    zero = aggregate.stats["grad_zero_ratio"]
    dead_rule = rule("dead")
    for i in np.flatnonzero(np.nan_to_num(zero, nan=-1.0) > th.dead):
        name = aggregate.layers[i]
        if name in dead or sparse_gradient(aggregate.layer_types[i]):
            continue
        critical = dead_rule.conditions[-1].critical(float(zero[i]), th.dead)
        out.append(make_issue(IssueType.DEAD, from_agent_severity("critical" if critical else dead_rule.severity),
                              name, zero[i], th.dead,
                              f"{zero[i]:.0%} of the gradient elements are exactly zero (> {th.dead:.0%})",
                              aggregate.step))
    return [agent_advice(i) for i in out]


def relative_vanishing(aggregate: Snapshot, th: FlowThresholds, already: frozenset[str] | set[str] = frozenset()
                       ) -> list[FlowIssue]:
    """VANISHING relative to the model: a layer whose pressure is below `vanishing_relative` (1e-3) times the
    median pressure of the model's layers with a gradient. Scale-free (a loss scaled by 0.01 flags nothing; a
    fresh Llama/BERT, whose Q/K and norm gradients sit 1-2.5 decades below the median, is not flagged), while a
    layer 3+ decades below the rest of its own model is. Severity follows the rule table's vanishing rule
    (warning; critical beyond its critical_factor, i.e. 100x further below)."""
    p = np.asarray(aggregate.stats["grad_pressure"], dtype=np.float64)
    ok = np.isfinite(p) & (p > 0)
    if ok.sum() < 3:
        return []
    median = float(np.median(p[ok]))
    limit = th.vanishing_relative * median
    van = rule("vanishing")
    cond = van.conditions[0]
    out = []
    for i in np.flatnonzero(ok):
        name = aggregate.layers[i]
        if name in already or not cond.holds(float(p[i]), limit):
            continue
        ratio = float(p[i]) / median
        sev = "critical" if cond.critical(float(p[i]), limit) else van.severity
        out.append(make_issue(IssueType.VANISHING, from_agent_severity(sev), name, ratio, th.vanishing_relative,
                              f"gradient pressure {p[i]:.3g} is {ratio:.2g} of the model's median {median:.3g} "
                              f"(< {th.vanishing_relative:g})", aggregate.step, pressure=float(p[i]),
                              median_pressure=median, criterion="relative"))
    return out


def recorded_issues(records: Sequence[dict[str, Any]]) -> list[FlowIssue]:
    """Every (kind, layer) the agent flagged in recorded snapshots: its worst severity, latest value and message,
    and the steps it was first and last seen at."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        for issue in record.get("issues", ()):
            key = (issue["kind"], issue["layer"])
            entry = seen.setdefault(key, {"first": issue.get("first_step") or issue.get("step", 0), "worst": "info",
                                          "records": 0})
            entry.update(last=issue)
            entry["records"] += 1
            if severity_rank(issue["severity"]) >= severity_rank(entry["worst"]):
                entry["worst"] = issue["severity"]
    out = []
    for (kind, layer), entry in seen.items():
        last = entry["last"]
        value = float("nan") if last.get("value") is None else float(last["value"])
        issue = make_issue(FROM_AGENT_KIND.get(kind, IssueType.NUMERICAL), from_agent_severity(entry["worst"]),
                           layer, value, float(last.get("threshold") or 0.0), last.get("message", kind),
                           step=int(last.get("step", 0)), first_step=int(entry["first"]),
                           records=entry["records"], agent_severity=entry["worst"])
        out.append(agent_advice(FlowIssue(issue.issue_type, issue.severity, issue.layer, issue.value,
                                          issue.threshold, issue.message,
                                          last.get("recommendation") or issue.recommendation, issue.step,
                                          issue.details)))
    return out


@dataclass(frozen=True)
class DepthProfile:
    """log10 pressure of the parametric layers in forward order, and its least-squares line.

    slope: decades per layer (> 0: pressure grows toward the output, i.e. decays toward the input);
    total_decay: slope x (n - 1), the fitted drop from the last to the first layer in decades;
    residual_std: sqrt(sum r^2 / (n - 2)) of the residuals r around the line, in decades.
    """

    layers: tuple[str, ...]
    log10_pressure: tuple[float, ...]
    slope: float
    intercept: float
    total_decay: float
    residual_std: float

    @property
    def residuals(self) -> np.ndarray:
        d = np.arange(len(self.layers))
        return np.asarray(self.log10_pressure) - (self.intercept + self.slope * d)

    def to_dict(self) -> dict:
        return jsonable({"layers": self.layers, "log10_pressure": self.log10_pressure, "slope": self.slope,
                         "intercept": self.intercept, "total_decay": self.total_decay,
                         "residual_std": self.residual_std})


def depth_profile(metrics: list[FlowMetrics]) -> DepthProfile | None:
    """The depth profile of the layers with a positive, finite pressure, in forward order (None with fewer than
    3). The root module's own parameters (a policy's log-std, a position table) have no depth and are left out."""
    chosen = [m for m in metrics if m.has_gradient and m.mean_pressure > 0 and m.layer != "(root)"]
    if len(chosen) < 3:
        return None
    chosen.sort(key=lambda m: (m.depth if m.depth >= 0 else 1 << 30))
    y = np.log10([m.mean_pressure for m in chosen])
    d = np.arange(len(chosen), dtype=np.float64)
    slope, intercept = np.polyfit(d, y, 1)
    resid = y - (intercept + slope * d)
    rstd = float(np.sqrt((resid ** 2).sum() / (len(chosen) - 2))) if len(chosen) > 3 else 0.0
    return DepthProfile(tuple(m.layer for m in chosen), tuple(float(v) for v in y), float(slope), float(intercept),
                        float(slope * (len(chosen) - 1)), rstd)


def depth_issues(profile: DepthProfile | None, th: FlowThresholds, step: int = 0) -> list[FlowIssue]:
    """DECAY / AMPLIFICATION (trend through depth) and LAYER_VARIANCE (a layer out of line with the trend)."""
    if profile is None:
        return []
    out = []
    total = profile.total_decay
    if abs(total) >= th.decay_decades:
        kind = IssueType.DECAY if total > 0 else IssueType.AMPLIFICATION
        severity = IssueSeverity.HIGH if abs(total) >= 2 * th.decay_decades else IssueSeverity.MEDIUM
        where = "shrinks" if total > 0 else "grows"
        out.append(make_issue(kind, severity, profile.layers[0], abs(total), th.decay_decades,
                              f"gradient pressure {where} by {abs(total):.1f} decades from {profile.layers[-1]} "
                              f"to {profile.layers[0]} ({abs(profile.slope):.2f} decades per layer)", step,
                              slope=profile.slope, layers=len(profile.layers)))
    if len(profile.layers) >= 4 and profile.residual_std > th.layer_variance:
        worst = int(np.argmax(np.abs(profile.residuals)))
        r = float(profile.residuals[worst])
        out.append(make_issue(IssueType.LAYER_VARIANCE, IssueSeverity.MEDIUM, profile.layers[worst],
                              profile.residual_std, th.layer_variance,
                              f"pressure varies across layers beyond the depth trend (residual std "
                              f"{profile.residual_std:.2f} decades); this layer is {abs(r):.1f} decades "
                              f"{'above' if r > 0 else 'below'} the trend", step, residual=r))
    return out


def bottleneck_issues(metrics: list[FlowMetrics], th: FlowThresholds, step: int = 0) -> list[FlowIssue]:
    """BOTTLENECK: a layer whose output uses `bottleneck_ratio` times fewer effective dimensions than its
    input, followed later (in forward order) by a layer at least `bottleneck_ratio` times wider than that
    output's effective rank (an hourglass, not a classifier head). HIGH when the backward gain across the
    layer also exceeds `bottleneck_gain` (the compression amplifies gradients)."""
    out = []
    called = [m for m in metrics if m.depth >= 0]
    for m in called:
        c = m.compression_ratio
        if not (math.isfinite(c) and c >= th.bottleneck_ratio):
            continue
        later = [n.width for n in called if n.depth > m.depth]
        if not later or max(later) < th.bottleneck_ratio * m.effective_rank_out:
            continue
        amplifies = math.isfinite(m.gradient_gain) and m.gradient_gain > th.bottleneck_gain
        severity = IssueSeverity.HIGH if amplifies or c >= 2 * th.bottleneck_ratio else IssueSeverity.MEDIUM
        msg = (f"effective rank drops from {m.effective_rank_in:.1f} to {m.effective_rank_out:.1f} "
               f"(compression {c:.1f}x >= {th.bottleneck_ratio:g}x) before widening again to {max(later)}")
        if amplifies:
            msg += f"; gradients are amplified {m.gradient_gain:.1f}x across it"
        out.append(make_issue(IssueType.BOTTLENECK, severity, m.layer, c, th.bottleneck_ratio, msg, step,
                              effective_rank_in=m.effective_rank_in, effective_rank_out=m.effective_rank_out,
                              gradient_gain=m.gradient_gain, width_after=max(later)))
    return out


def model_level(layer: str) -> bool:
    return layer == MODEL
