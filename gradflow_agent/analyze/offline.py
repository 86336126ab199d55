"""Reports of recorded runs: the JSONL flight record through the same detectors as a live analysis.

A recording holds the agent's statistics only (no effective ranks, attention maps or gradients through
time), so the report of a recording covers the scalar issues, depth structure and health.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..report.flow_report import FlowReport, section, series
from .base import FlowThresholds, sort_issues
from .detectors import depth_issues, depth_profile, scalar_issues
from .health import DEFAULT_POLICY, HealthPolicy, layer_health, overall_health
from .history import History
from .metrics import compute_metrics


def report_from_history(history: History, *, thresholds: FlowThresholds | None = None, title: str = "",
                        policy: HealthPolicy = DEFAULT_POLICY, meta: dict[str, Any] | None = None) -> FlowReport:
    th = thresholds or FlowThresholds()
    agg = history.aggregate()
    metrics = compute_metrics(history, agg)
    step = int(history.steps[-1])
    profile = depth_profile(metrics)
    issues = sort_issues(scalar_issues(agg, th) + depth_issues(profile, th, step),
                         {m.layer: m.depth for m in metrics})
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
                               meta={"labels": labels})
