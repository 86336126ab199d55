"""Reports of recorded runs: the JSONL flight record, with the issues the agent recorded.

A recording holds the agent's statistics and its detector's issues (no effective ranks, attention maps
or gradients through time). The report shows the recorded issues - never a recomputation from whole-run
averages, which would disagree with what the agent said during the run - plus the depth structure,
which only a whole-run view shows; health is the one formula over those issues and the overall status
follows the worst issue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..detect.spec import severity_rank
from ..report.flow_report import FlowReport, section, series
from .base import FROM_AGENT_SEVERITY, FlowIssue, FlowThresholds, IssueType, make_issue, sort_issues
from .detectors import depth_issues, depth_profile, scalar_issues
from .health import DEFAULT_POLICY, HealthPolicy, layer_health, overall_health
from .history import History
from .metrics import compute_metrics

#: The agent's issue kinds as analyzer issue types.
AGENT_KINDS = {"vanishing": IssueType.VANISHING, "exploding": IssueType.EXPLODING, "dead": IssueType.DEAD,
               "nonfinite": IssueType.NUMERICAL, "unstable": IssueType.UNSTABLE, "saturated": IssueType.SATURATED,
               "stalled": IssueType.STALLED}


def recorded_issues(records: Sequence[dict[str, Any]]) -> list[FlowIssue]:
    """Every (kind, layer) the agent flagged in the records: its worst severity, latest value and message,
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
        issue = make_issue(AGENT_KINDS.get(kind, IssueType.NUMERICAL), FROM_AGENT_SEVERITY[entry["worst"]], layer,
                           value, float(last.get("threshold") or 0.0), last.get("message", kind),
                           step=int(last.get("step", 0)), first_step=int(entry["first"]),
                           records=entry["records"], agent_severity=entry["worst"])
        out.append(FlowIssue(issue.issue_type, issue.severity, issue.layer, issue.value, issue.threshold,
                             issue.message, last.get("recommendation") or issue.recommendation, issue.step,
                             issue.details))
    return out


def report_from_history(history: History, *, thresholds: FlowThresholds | None = None, title: str = "",
                        policy: HealthPolicy = DEFAULT_POLICY, meta: dict[str, Any] | None = None,
                        recorded: list[FlowIssue] | None = None) -> FlowReport:
    """`recorded`: the agent's issues of the run (a recording); without them, the scalar detectors run on
    the history's aggregates (an analysis that has no agent verdicts)."""
    th = thresholds or FlowThresholds()
    agg = history.aggregate()
    metrics = compute_metrics(history, agg)
    step = int(history.steps[-1])
    profile = depth_profile(metrics)
    found = list(recorded) if recorded is not None else scalar_issues(agg, th)
    issues = sort_issues(found + depth_issues(profile, th, step), {m.layer: m.depth for m in metrics})
    health = {m.layer: layer_health(m.layer, m.mean_pressure, m.turbulence, issues, policy) for m in metrics}
    score, status = overall_health(health.values(), [i for i in issues if i.layer not in health], policy)
    sections: dict[str, Any] = {}
    if profile is not None:
        sections["depth"] = section(
            "Depth profile", summary={"total decay (decades)": profile.total_decay,
                                      "residual std (decades)": profile.residual_std},
            series=[series("log10 pressure by layer", list(range(len(profile.layers))),
                           {"log10 pressure": list(profile.log10_pressure)}, xlabel="parametric layer",
                           ylabel="log10 pressure", labels=list(profile.layers))])
    hist: dict[str, Any] = {"steps": history.steps.tolist(), "loss": history.loss.tolist(),
                            "grad_norm": history.grad_norm.tolist()}
    if history.health is not None:  # the agent's own exported score: its worst layer per record
        h = np.where(np.isfinite(history.health), history.health, np.inf).min(axis=1)
        hist["agent_health_min"] = np.where(np.isfinite(h), h, np.nan).tolist()
    return FlowReport(title=title or "Recorded run", layers=metrics, health=health, issues=issues,
                      overall_score=score, overall_status=status.value, history=hist, sections=sections,
                      meta={"analyzer": "recorded run", "records": len(history), "steps": step,
                            "thresholds": th.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                            **(meta or {})})


def report_from_records(records: Sequence[dict[str, Any]], *, thresholds: FlowThresholds | None = None,
                        title: str | None = None) -> FlowReport:
    """A FlowReport of `Snapshot.to_dict()` records (e.g. `gradflow_agent.export.jsonl.read_snapshots(path)`)."""
    history = History.from_records(records)
    labels = records[-1].get("labels", {}) if records else {}
    return report_from_history(history, thresholds=thresholds, title=title or "Recorded run",
                               meta={"labels": labels}, recorded=recorded_issues(records))
