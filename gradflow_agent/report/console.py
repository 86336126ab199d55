"""ConsoleReporter: a FlowReport in the terminal with rich (colour-coded health and severities).

rich (the `report` extra) is imported when a table is drawn, not with this module: the HTML report
uses `fmt` from here and must work on a core install.
"""

from __future__ import annotations

import functools
import io
import math
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .._optional import require

if TYPE_CHECKING:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from ..analyze.base import FlowIssue

FEATURE = "ConsoleReporter (console and text reports)"


@functools.cache
def _rich() -> SimpleNamespace:
    """rich's Console, Panel and Table, or one line naming the `report` extra."""
    return SimpleNamespace(Console=require("rich.console", "report", FEATURE).Console,
                           Panel=require("rich.panel", "report", FEATURE).Panel,
                           Table=require("rich.table", "report", FEATURE).Table)

SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan"}
STATUS_STYLE = {"HEALTHY": "green", "WARNING": "yellow", "CRITICAL": "bold red"}


def fmt(x: Any) -> str:
    """Numbers with 3 significant digits, '-' for missing values."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.3g}"
    return str(x)


def _first_step(issue: Any) -> int | None:
    """The step an issue started at (`details["first_step"]` of a recorded run's issue), if known."""
    v = (getattr(issue, "details", None) or {}).get("first_step", getattr(issue, "first_step", None))
    return None if v is None else int(v)


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


class ConsoleReporter:
    """Prints the parts of a FlowReport; `console=None` writes to the terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or _rich().Console()

    # -- renderables (compute-free: the report already holds every number) -----------------------------------
    @staticmethod
    def summary_panel(report: Any) -> Panel:
        s = report.summary()
        style = STATUS_STYLE.get(s["overall_status"], "white")
        sev = "  ".join(f"[{SEVERITY_STYLE[k]}]{k}: {v}[/]" for k, v in s["issues_by_severity"].items())
        worst = ", ".join(f"{name} ({score:.0f})" for name, score in s["worst_layers"]) or "-"
        body = (f"overall health [{style}]{s['overall_score']:.0f}/100 {s['overall_status']}[/]   "
                f"layers {s['layers']}   steps {fmt(s['steps'])}\n"
                f"issues {s['issues']}: {sev}\n"
                f"worst layers: {worst}")
        if s["issues_by_type"]:
            body += "\nby type: " + ", ".join(f"{k} {v}" for k, v in sorted(s["issues_by_type"].items()))
        return _rich().Panel(body, title=s["title"], expand=False)

    @staticmethod
    def issues_table(issues: list[FlowIssue], width: int | None = None) -> Table:
        """Issues with the step each started at ("since"); the message folds to the width left."""
        from rich import box
        narrow = width is not None and width < 100
        t = _rich().Table(title="Issues" if issues else "Issues: none found", show_lines=narrow,
                          **({"box": box.SIMPLE_HEAD, "padding": (0, 1, 0, 0), "pad_edge": False,
                              "show_edge": False} if narrow else {}))
        firsts = [_first_step(i) for i in issues]
        cols = ["severity", "type", "layer"] + (["since"] if any(f is not None for f in firsts) else []) + \
            ["value"] + (["threshold"] if width is None or width >= 72 else []) + ["message"]
        for col in cols:
            # numbers and one-word labels never wrap (a folded `4.3` / `8e+04` reads as two numbers); text folds
            numeric = col in ("value", "threshold", "since")
            t.add_column(col, overflow="fold", no_wrap=col not in ("layer", "message"),
                         justify="right" if numeric else "left", ratio=1 if col == "message" else None,
                         min_width=16 if col == "message" else None)
        for i, first in zip(issues, firsts):
            style = SEVERITY_STYLE.get(i.severity.value, "white")
            cells = {"severity": f"[{style}]{i.severity.value}[/]", "type": i.issue_type.value, "layer": i.layer,
                     "since": fmt(first), "value": fmt(i.value), "threshold": fmt(i.threshold), "message": i.message}
            t.add_row(*(cells[c] for c in cols))
        return t

    #: The layer table's columns, most important first: a console gets as many as fit its width, and a column
    #: with no value in any layer is left out (named in the caption).
    LAYER_COLUMNS = ("layer", "status", "health", "pressure", "zero act", "dead units", "turbulence", "type",
                     "update ratio", "max", "saturation", "eff. rank out", "gain")
    _ORDER = ("layer", "type", "pressure", "max", "turbulence", "zero act", "dead units", "saturation",
              "update ratio", "eff. rank out", "gain", "health", "status")

    @staticmethod
    def layers_table(report: Any, max_rows: int = 60, width: int | None = None) -> Table:
        """Per-layer metrics in the columns that fit `width` (None: all), chosen by importance and shown in
        table order; numbers never fold, long layer names do."""
        rich = _rich()
        from rich import box
        rows = []
        for m in report.layers[:max_rows]:
            h = report.health.get(m.layer)
            score = h.score if h else float("nan")
            status = h.status.value if h else "-"
            style = STATUS_STYLE.get(status, "white")
            rows.append({"layer": m.layer, "type": m.layer_type, "pressure": fmt(m.mean_pressure),
                         "max": fmt(m.max_pressure), "turbulence": fmt(m.turbulence),
                         "zero act": _pct(m.activation_zero_ratio), "dead units": _pct(m.dead_unit_ratio),
                         "saturation": _pct(m.saturation_ratio), "update ratio": fmt(m.update_ratio),
                         "eff. rank out": fmt(m.effective_rank_out), "gain": fmt(m.gradient_gain),
                         "health": f"[{style}]{fmt(round(score))}[/]" if math.isfinite(score) else "-",
                         "status": f"[{style}]{status}[/]", "_plain_health": fmt(round(score))
                         if math.isfinite(score) else "-", "_plain_status": status})
        empty = [c for c in ConsoleReporter.LAYER_COLUMNS if c not in ("layer", "status")
                 and rows and all(r[c] == "-" for r in rows)]

        def need(c: str) -> int:
            vals = [r.get(f"_plain_{c}", r[c]) for r in rows]
            longest = max((len(v) for v in vals), default=1)
            if c == "layer":  # long names fold
                return max(min(longest, 24), len(c)) + 2
            return max(longest, len(c)) + 2  # cell, right padding, column gap

        chosen: list[str] = []
        used = 0
        for c in ConsoleReporter.LAYER_COLUMNS:
            if c in empty:
                continue
            w = need(c)
            if width is not None and used + w > width and c != "layer":
                continue
            chosen.append(c)
            used += w
        cols = [c for c in ConsoleReporter._ORDER if c in chosen]
        t = rich.Table(title="Layers", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
        for col in cols:
            left = col in ("layer", "type", "status")
            t.add_column(col, justify="left" if left else "right", no_wrap=col != "layer", overflow="fold")
        for r in rows:
            t.add_row(*(r[c] for c in cols))
        notes = []
        if len(report.layers) > max_rows:
            notes.append(f"{len(report.layers) - max_rows} more layers not shown")
        if empty:
            notes.append("no data: " + ", ".join(empty))
        left_out = [c for c in ConsoleReporter.LAYER_COLUMNS if c not in chosen and c not in empty]
        if left_out:
            notes.append("too wide for this width: " + ", ".join(left_out))
        if notes:
            t.caption = "; ".join(notes)
        return t

    @staticmethod
    def section_tables(report: Any) -> list[Any]:
        out: list[Any] = []
        for sec in report.sections.values():
            if sec.get("summary"):
                t = _rich().Table(title=sec["title"], show_header=False)
                t.add_column("metric")
                t.add_column("value", justify="right")
                for k, v in sec["summary"].items():
                    t.add_row(str(k), fmt(v))
                out.append(t)
            for tab in sec.get("tables", []):
                t = _rich().Table(title=f"{sec['title']}: {tab['title']}")
                for col in tab["columns"]:
                    t.add_column(str(col), overflow="fold")
                for row in tab["rows"]:
                    t.add_row(*(fmt(v) for v in row))
                out.append(t)
        return out

    # -- printing -------------------------------------------------------------------------------------------------
    def print_summary(self, report: Any) -> None:
        self.console.print(self.summary_panel(report))

    def print_issues(self, report: Any, issues: list[FlowIssue] | None = None) -> None:
        self.console.print(self.issues_table(report.issues if issues is None else issues, width=self.console.width))

    def print_layers(self, report: Any, max_rows: int = 60) -> None:
        self.console.print(self.layers_table(report, max_rows, width=self.console.width))

    print_layer_summary = print_layers

    def print_recommendations(self, report: Any) -> None:
        seen: list[str] = []
        for i in report.issues:
            if i.recommendation and i.recommendation not in seen:
                seen.append(i.recommendation)
        if not seen:
            self.console.print("[green]No recommendations: no issues found.[/]")
        for k, rec in enumerate(seen, 1):
            self.console.print(f"{k}. {rec}")

    def print_sections(self, report: Any) -> None:
        for t in self.section_tables(report):
            self.console.print(t)

    def print_all(self, report: Any) -> None:
        self.print_summary(report)
        self.print_issues(report)
        self.print_layers(report)
        self.print_sections(report)
        self.print_recommendations(report)

    @classmethod
    def format_report(cls, report: Any, width: int = 80) -> str:
        """The whole report as plain text (no colour codes), laid out for `width` columns (default: 80, a
        terminal, an e-mail or a ticket)."""
        buf = io.StringIO()
        console = _rich().Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
        cls(console).print_all(report)
        return buf.getvalue()
