"""LayerHealth: a 0-100 score, a status and advice per layer, computed from snapshots.

score = clip(100 - P_pressure - P_turbulence - P_issues, 0, 100), where

- P_pressure = min(25 * d, 50), d = decades the layer's mean gradient pressure p lies outside the good band
  [0.1, 10] of seed 004 (d = log10(0.1 / p) below it, log10(p / 10) above it, 0 inside, 0 without gradients);
- P_turbulence = min(10 * max(0, t - 1), 40), t = turbulence (seed 004: < 1 good, > 5 critical);
- P_issues = sum over the layer's issues of 40 (CRITICAL), 30 (HIGH), 20 (MEDIUM), 5 (LOW).

status: HEALTHY when score >= 75, WARNING when 50 <= score < 75, CRITICAL below 50 (seed 004's table).
The model's overall score is the mean layer score minus the issue penalties of model-level issues.
`snapshot_health_scores` applies the same formula to one live `Snapshot` (the exported
gradflow_layer_health_score could use it; the agent's own score counts issue penalties only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .base import FROM_AGENT_SEVERITY, FlowIssue, IssueSeverity, jsonable, recommendation


class HealthStatus(str, Enum):
    HEALTHY = "HEALTHY"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HealthPolicy:
    """The constants of the health formula (see the module docstring)."""

    good_low: float = 0.1
    good_high: float = 10.0
    points_per_decade: float = 25.0
    pressure_cap: float = 50.0
    turbulence_good: float = 1.0
    points_per_turbulence: float = 10.0
    turbulence_cap: float = 40.0
    penalties: tuple[tuple[str, float], ...] = (("critical", 40.0), ("high", 30.0), ("medium", 20.0), ("low", 5.0))
    healthy_min: float = 75.0
    warning_min: float = 50.0

    def penalty(self, severity: IssueSeverity | str) -> float:
        return dict(self.penalties)[IssueSeverity(severity).value]

    def status(self, score: float) -> HealthStatus:
        if score >= self.healthy_min:
            return HealthStatus.HEALTHY
        return HealthStatus.WARNING if score >= self.warning_min else HealthStatus.CRITICAL


DEFAULT_POLICY = HealthPolicy()


def pressure_penalty(pressure: float, policy: HealthPolicy = DEFAULT_POLICY) -> float:
    """Points lost for a mean pressure outside the good band (0 when unknown)."""
    if not (math.isfinite(pressure) and pressure > 0):
        return 0.0 if not (math.isfinite(pressure) and pressure == 0.0) else policy.pressure_cap
    if pressure < policy.good_low:
        d = math.log10(policy.good_low / pressure)
    elif pressure > policy.good_high:
        d = math.log10(pressure / policy.good_high)
    else:
        return 0.0
    return min(policy.points_per_decade * d, policy.pressure_cap)


def turbulence_penalty(turbulence: float, policy: HealthPolicy = DEFAULT_POLICY) -> float:
    if not math.isfinite(turbulence):
        return 0.0
    return min(policy.points_per_turbulence * max(0.0, turbulence - policy.turbulence_good), policy.turbulence_cap)


@dataclass(frozen=True)
class LayerHealth:
    """Health of one layer: score 0-100, status, the issues behind it, what to do, and the score's parts."""

    layer: str
    score: float
    status: HealthStatus
    issues: tuple[FlowIssue, ...] = ()
    recommendations: tuple[str, ...] = ()
    components: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "score": jsonable(self.score), "status": self.status.value,
                "issues": [i.to_dict() for i in self.issues], "recommendations": list(self.recommendations),
                "components": jsonable(self.components)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerHealth:
        return cls(d["layer"], float(d["score"]) if d.get("score") is not None else float("nan"),
                   HealthStatus(d["status"]), tuple(FlowIssue.from_dict(i) for i in d.get("issues", [])),
                   tuple(d.get("recommendations", [])),
                   {k: float(v) for k, v in d.get("components", {}).items() if v is not None})


def _advice(pressure: float, turbulence: float, policy: HealthPolicy) -> list[str]:
    out = []
    if math.isfinite(pressure) and 0 < pressure < policy.good_low:
        out.append(f"Gradient pressure {pressure:.2g} is below the good band [{policy.good_low:g}, "
                   f"{policy.good_high:g}]: this layer learns slowly.")
    elif math.isfinite(pressure) and pressure > policy.good_high:
        out.append(f"Gradient pressure {pressure:.2g} is above the good band: consider gradient clipping.")
    if math.isfinite(turbulence) and turbulence > policy.turbulence_good:
        out.append(f"Turbulence {turbulence:.2f} > {policy.turbulence_good:g}: gradients swing between steps; "
                   "a larger batch or a lower learning rate steadies them.")
    return out


def layer_health(layer: str, pressure: float, turbulence: float, issues: Iterable[FlowIssue] = (),
                 policy: HealthPolicy = DEFAULT_POLICY) -> LayerHealth:
    """Score one layer from its mean pressure, turbulence and issues (the formula of this module)."""
    issues = tuple(i for i in issues if i.layer == layer)
    parts = {"pressure": pressure_penalty(pressure, policy), "turbulence": turbulence_penalty(turbulence, policy),
             "issues": sum(policy.penalty(i.severity) for i in issues)}
    score = float(min(100.0, max(0.0, 100.0 - sum(parts.values()))))
    recs: list[str] = []
    for i in issues:
        rec = i.recommendation or recommendation(i.issue_type)
        if rec and rec not in recs:
            recs.append(rec)
    recs.extend(r for r in _advice(pressure, turbulence, policy) if r not in recs)
    return LayerHealth(layer, score, policy.status(score), issues, tuple(recs), parts)


def overall_health(layers: Iterable[LayerHealth], model_issues: Iterable[FlowIssue] = (),
                   policy: HealthPolicy = DEFAULT_POLICY) -> tuple[float, HealthStatus]:
    """Mean layer score minus the penalties of model-level issues, clipped to [0, 100]."""
    scores = [h.score for h in layers if math.isfinite(h.score)]
    base = float(np.mean(scores)) if scores else 100.0
    score = max(0.0, min(100.0, base - sum(policy.penalty(i.severity) for i in model_issues)))
    return score, policy.status(score)


def snapshot_health_scores(snap: Any, issues: Iterable[Any] | None = None,
                           policy: HealthPolicy = DEFAULT_POLICY) -> np.ndarray:
    """The health formula on one live Snapshot (agent issues mapped to severities), one score per layer.

    Drop-in for `gradflow_agent.detect.health.health_scores(snap.layers, issues)` when the snapshot's
    statistics are available: `snapshot_health_scores(snap, issues)`.
    """
    issues = list(snap.issues if issues is None else issues)
    p = snap.stats["grad_pressure"]
    t = snap.stats["grad_turbulence"]
    out = np.empty(len(snap.layers))
    for i, name in enumerate(snap.layers):
        penalty = sum(policy.penalty(_severity_of(x)) for x in issues if x.layer == name)
        score = 100.0 - pressure_penalty(float(p[i]), policy) - turbulence_penalty(float(t[i]), policy) - penalty
        out[i] = min(100.0, max(0.0, score))
    return out


def _severity_of(issue: Any) -> IssueSeverity:
    """A FlowIssue's severity, or the agent Issue's info/warning/critical mapped to LOW/MEDIUM/CRITICAL."""
    sev = issue.severity
    if isinstance(sev, IssueSeverity):
        return sev
    return FROM_AGENT_SEVERITY.get(str(sev), IssueSeverity.MEDIUM)
