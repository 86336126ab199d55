"""FlowReport: the result of an analysis (or of a recorded run) and every way to show or save it.

Display: print_summary / print_issues / print_layers (rich, colour). Export: save_html (one self-contained
file), save_json (round-trips through `FlowReport.load_json`), save_text. Query: get_worst_layers,
get_issues_by_severity, get_layer. Analyzer-specific results live in `sections`: plain data with a title,
scalar summary, tables and series, so every renderer shows every analyzer without knowing about it.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analyze.base import FlowIssue, FlowThresholds, IssueSeverity, jsonable, sort_issues
from ..analyze.detectors import depth_issues, depth_profile, recorded_issues, scalar_issues
from ..analyze.health import DEFAULT_POLICY, HealthPolicy, LayerHealth, layer_health, overall_health
from ..analyze.history import History
from ..analyze.metrics import FlowMetrics, compute_metrics
from .html import layer_stats

SCHEMA = "gradflow-flow-report/1"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A report table: `rows` are lists aligned with `columns`."""
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows]}


def series(title: str, x: Sequence[float], ys: dict[str, Sequence[float]], *, xlabel: str = "", ylabel: str = "",
           labels: Sequence[str] | None = None, log: bool = False) -> dict[str, Any]:
    """A chart: one or more named y sequences over x (labels: optional names of the x positions)."""
    return {"title": title, "x": list(x), "y": {k: list(v) for k, v in ys.items()}, "xlabel": xlabel,
            "ylabel": ylabel, "labels": list(labels) if labels is not None else None, "log": log}


def section(title: str, *, summary: dict[str, Any] | None = None, tables: list[dict[str, Any]] | None = None,
            series: list[dict[str, Any]] | None = None, notes: str = "") -> dict[str, Any]:
    """An analyzer's part of the report."""
    return {"title": title, "summary": dict(summary or {}), "tables": list(tables or []),
            "series": list(series or []), "notes": notes}


@dataclass
class FlowReport:
    """Per-layer metrics and health, issues, history and analyzer sections of one analysis."""

    title: str
    layers: list[FlowMetrics]
    health: dict[str, LayerHealth]
    issues: list[FlowIssue]
    overall_score: float
    overall_status: str
    history: dict[str, list[Any]] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: The analyzers' typed results (RecurrentDynamics, AttentionStats, PolicyStats, DepthProfile, ...) by
    #: section name; `sections` holds their rendered form. Saved as plain data (to_dict), loaded back as dicts.
    results: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def result(self, name: str, kind: type | None = None) -> Any:
        """The typed result `name` of the analysis (None when that analysis did not run); `kind` checks its type."""
        value = self.results.get(name)
        if value is not None and kind is not None and not isinstance(value, kind):
            raise TypeError(f"result {name!r} is a {type(value).__name__}, not a {kind.__name__}")
        return value

    # -- queries -------------------------------------------------------------------------------------------
    def get_layer(self, name: str) -> FlowMetrics:
        for m in self.layers:
            if m.layer == name:
                return m
        raise KeyError(f"no layer named {name!r}")

    def get_worst_layers(self, n: int = 5) -> list[LayerHealth]:
        """The n layers with the lowest health score (ties: in layer order)."""
        ranked = sorted((h for h in self.health.values() if math.isfinite(h.score)), key=lambda h: h.score)
        return ranked[:n]

    def get_issues_by_severity(self, severity: IssueSeverity | str | None = None
                               ) -> list[FlowIssue] | dict[str, list[FlowIssue]]:
        """Issues of one severity, or (no argument) a dict severity -> issues, most severe first."""
        if severity is not None:
            sev = IssueSeverity(severity)
            return [i for i in self.issues if i.severity is sev]
        out: dict[str, list[FlowIssue]] = {}
        for sev in sorted(IssueSeverity, key=lambda s: -s.rank):
            out[sev.value] = [i for i in self.issues if i.severity is sev]
        return out

    def summary(self) -> dict[str, Any]:
        """Counts and headline numbers (what print_summary shows)."""
        by_sev = Counter(i.severity.value for i in self.issues)
        by_type = Counter(i.issue_type.value for i in self.issues)
        status = Counter(h.status.value for h in self.health.values())
        return {"title": self.title, "overall_score": self.overall_score, "overall_status": self.overall_status,
                "layers": len(self.layers), "issues": len(self.issues),
                "issues_by_severity": {s.value: by_sev.get(s.value, 0) for s in sorted(IssueSeverity,
                                                                                     key=lambda s: -s.rank)},
                "issues_by_type": dict(by_type), "layer_status": dict(status),
                "steps": self.meta.get("steps"), "analyzer": self.meta.get("analyzer"),
                "worst_layers": [(h.layer, h.score) for h in self.get_worst_layers(3)]}

    # -- display -------------------------------------------------------------------------------------------
    def print_summary(self, console: Any = None) -> None:
        from .console import ConsoleReporter
        ConsoleReporter(console).print_summary(self)

    def print_issues(self, issues: list[FlowIssue] | None = None, console: Any = None) -> None:
        from .console import ConsoleReporter
        ConsoleReporter(console).print_issues(self, issues)

    def print_layers(self, console: Any = None, max_rows: int = 60) -> None:
        from .console import ConsoleReporter
        ConsoleReporter(console).print_layers(self, max_rows=max_rows)

    def _repr_html_(self) -> str:
        """Jupyter's view of the report: the HTML report as one scoped, escaped fragment."""
        from .html import report_fragment
        return report_fragment(self)

    # -- export --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "title": self.title, "overall_score": jsonable(self.overall_score),
                "overall_status": self.overall_status, "layers": [m.to_dict() for m in self.layers],
                "health": {k: h.to_dict() for k, h in self.health.items()},
                "issues": [i.to_dict() for i in self.issues], "history": jsonable(self.history),
                "sections": jsonable(self.sections), "meta": jsonable(self.meta),
                "results": jsonable({k: v for k, v in self.results.items() if v is not None})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowReport:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a flow report (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        return cls(title=d["title"], layers=[FlowMetrics.from_dict(m) for m in d["layers"]],
                   health={k: LayerHealth.from_dict(h) for k, h in d["health"].items()},
                   issues=[FlowIssue.from_dict(i) for i in d["issues"]],
                   overall_score=float("nan") if d.get("overall_score") is None else float(d["overall_score"]),
                   overall_status=d["overall_status"], history=d.get("history", {}),
                   sections=d.get("sections", {}), meta=d.get("meta", {}), results=d.get("results", {}))

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False), encoding="utf-8")
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> FlowReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def save_html(self, path: str | Path) -> Path:
        """One self-contained HTML file: sortable tables, inline SVG charts, no external resources."""
        from .html import HTMLReportGenerator
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HTMLReportGenerator().generate(self), encoding="utf-8")
        return path

    def to_text(self, width: int = 80) -> str:
        from .console import ConsoleReporter
        return ConsoleReporter.format_report(self, width=width)

    def save_text(self, path: str | Path, width: int = 80) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_text(width), encoding="utf-8")
        return path

    # -- from a recorded run ---------------------------------------------------------------------------------
    @classmethod
    def from_history(cls, history: History, *, thresholds: FlowThresholds | None = None, title: str = "",
                     policy: HealthPolicy = DEFAULT_POLICY, meta: dict[str, Any] | None = None,
                     recorded: list[FlowIssue] | None = None) -> FlowReport:
        """A report of a History of snapshots. `recorded`: the agent's issues of the run (a recording: shown as
        recorded, never recomputed from whole-run averages); without them the scalar detectors run on the
        history's aggregates. Depth structure is added either way (only a whole-run view shows it)."""
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
        hist["layer_stats"] = layer_stats(history.stats)  # the report's layer x step heatmaps
        return cls(title=title or "Recorded run", layers=metrics, health=health, issues=issues,
                   overall_score=score, overall_status=status.value, history=hist, sections=sections,
                   meta={"analyzer": "recorded run", "records": len(history), "steps": step,
                         "thresholds": th.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                         **(meta or {})},
                   results={"depth_profile": profile})

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], *, thresholds: Any = None,
                     title: str | None = None) -> FlowReport:
        """A report of a recorded run: the JSONL flight record's `Snapshot.to_dict()` records, with the issues
        the agent recorded."""
        history = History.from_records(records)
        labels = records[-1].get("labels", {}) if records else {}
        return cls.from_history(history, thresholds=thresholds, title=title or "Recorded run",
                                meta={"labels": labels}, recorded=recorded_issues(records))

    @classmethod
    def from_jsonl(cls, path: str | Path, *, thresholds: Any = None, title: str | None = None) -> FlowReport:
        from ..export.jsonl import read_snapshots
        return cls.from_records(read_snapshots(path), thresholds=thresholds, title=title or f"Recorded run: {path}")
