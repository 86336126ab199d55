"""LayerHealth: a 0-100 score, a status and advice per layer, for analyzer and report results.

The score is the agent's one health formula (`gradflow_agent.detect.health`): 100 minus 50 per
critical, 25 per warning and 10 per info issue, floored at 0. An analyzer's severities map onto the
agent's (critical -> critical, high and medium -> warning, low -> info), so a layer scores the same in
a live snapshot, an analyzer report and a report of a recorded run, and its status follows its worst
issue (critical -> CRITICAL, warning -> WARNING, otherwise HEALTHY), as the run's overall status follows
the worst issue of the run. Pressure and turbulence outside the good band of seed 004 only add advice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ..detect import health as agent_health
from ..detect.issues import RECOMMENDATIONS as AGENT_RECOMMENDATIONS
from ..detect.spec import SEVERITIES
from .base import FROM_AGENT_KIND, FlowIssue, IssueSeverity, IssueType, jsonable
from .base import recommendation as analyzer_recommendation

#: The one severity map. The rule table's severities (detect/spec.SEVERITIES: info < warning < critical) as
#: analyzer severities, for every issue an analyzer derives from a rule (and for recorded agent issues) ...
SEVERITY_FROM_AGENT: dict[str, IssueSeverity] = dict(zip(SEVERITIES, (IssueSeverity.LOW, IssueSeverity.MEDIUM,
                                                                      IssueSeverity.CRITICAL)))
#: ... and back, for the one health formula's penalties (HIGH, an analyzer-only grade, counts as warning).
SEVERITY_TO_AGENT: dict[IssueSeverity, str] = {**{v: k for k, v in SEVERITY_FROM_AGENT.items()},
                                               IssueSeverity.HIGH: "warning"}
TO_AGENT_SEVERITY = SEVERITY_TO_AGENT  # the former name


_AGENT_KIND_OF = {v: k for k, v in FROM_AGENT_KIND.items()}


def recommendation(issue_type: IssueType) -> str:
    """The standard advice for an issue type: the analyzers' text, or the agent's own for the types its rule
    table shares (base.py cannot read the agent's: the agent's modules import it)."""
    return analyzer_recommendation(issue_type) or AGENT_RECOMMENDATIONS.get(_AGENT_KIND_OF.get(issue_type, ""), "")


def from_agent_severity(severity: str) -> IssueSeverity:
    """The analyzer severity of a rule-table severity (info / warning / critical)."""
    return SEVERITY_FROM_AGENT[str(severity)]


class HealthStatus(str, Enum):
    HEALTHY = "HEALTHY"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"

    def __str__(self) -> str:
        return self.value


def agent_severity(severity: IssueSeverity | str) -> str:
    """info / warning / critical for an analyzer severity (or an agent severity, unchanged)."""
    if str(severity) in agent_health.PENALTY:
        return str(severity)
    return TO_AGENT_SEVERITY[IssueSeverity(severity)]


def status_of(issues: Iterable[Any]) -> HealthStatus:
    """The status that follows the worst of `issues` (FlowIssue or agent Issue)."""
    worst = agent_health.overall_status([_AgentView(i.layer, agent_severity(i.severity)) for i in issues])
    return {"critical": HealthStatus.CRITICAL, "warning": HealthStatus.WARNING}.get(worst, HealthStatus.HEALTHY)


@dataclass(frozen=True)
class _AgentView:
    """An analyzer issue as the agent's health formula reads it: its layer and agent severity."""

    layer: str
    severity: str


@dataclass(frozen=True)
class HealthPolicy:
    """The good band of seed 004 behind the advice (not the score: that is detect/health.py)."""

    good_low: float = 0.1
    good_high: float = 10.0
    turbulence_good: float = 1.0

    def penalty(self, severity: IssueSeverity | str) -> float:
        return agent_health.PENALTY[agent_severity(severity)]

    def status(self, score: float) -> HealthStatus:
        """The band of a score (detect/health.py); a result's own status follows its worst issue."""
        band = agent_health.band(score)
        return {"critical": HealthStatus.CRITICAL, "warning": HealthStatus.WARNING}.get(band, HealthStatus.HEALTHY)


DEFAULT_POLICY = HealthPolicy()


def pressure_penalty(pressure: float, policy: HealthPolicy = DEFAULT_POLICY) -> float:
    """Deprecated: the score counts issues only (gradflow_agent.detect.health); always 0."""
    warnings.warn("pressure_penalty is no longer part of the health score; use gradflow_agent.detect.health",
                  DeprecationWarning, stacklevel=2)
    return 0.0


def turbulence_penalty(turbulence: float, policy: HealthPolicy = DEFAULT_POLICY) -> float:
    """Deprecated: the score counts issues only (gradflow_agent.detect.health); always 0."""
    warnings.warn("turbulence_penalty is no longer part of the health score; use gradflow_agent.detect.health",
                  DeprecationWarning, stacklevel=2)
    return 0.0


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
    """One layer's health: the one formula over its issues; advice also from its pressure and turbulence."""
    issues = tuple(i for i in issues if i.layer == layer)
    points = sum(policy.penalty(i.severity) for i in issues)
    score = float(max(0.0, 100.0 - points))
    recs: list[str] = []
    for i in issues:
        rec = i.recommendation or recommendation(i.issue_type)
        if rec and rec not in recs:
            recs.append(rec)
    recs.extend(r for r in _advice(pressure, turbulence, policy) if r not in recs)
    return LayerHealth(layer, score, status_of(issues), issues, tuple(recs), {"issues": points})


def overall_health(layers: Iterable[LayerHealth], model_issues: Iterable[FlowIssue] = (),
                   policy: HealthPolicy = DEFAULT_POLICY) -> tuple[float, HealthStatus]:
    """The run's score: its worst layer's, less the penalties of model-level issues; its status follows
    its worst issue, layers and model together."""
    layers, model_issues = list(layers), list(model_issues)
    scores = [h.score for h in layers if math.isfinite(h.score)]
    score = max(0.0, min(scores, default=100.0) - sum(policy.penalty(i.severity) for i in model_issues))
    return score, status_of([i for h in layers for i in h.issues] + model_issues)


def snapshot_health_scores(snap: Any, issues: Iterable[Any] | None = None,
                           policy: HealthPolicy = DEFAULT_POLICY) -> np.ndarray:
    """The one health formula on a live Snapshot: the score the agent exports."""
    from ..detect import known_layers
    issues = list(snap.issues if issues is None else issues)
    return agent_health.health_scores(snap.layers, [_AgentView(i.layer, agent_severity(i.severity)) for i in issues],
                                      known_layers(snap))
