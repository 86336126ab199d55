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
from ..analyze.base import FlowIssue

if TYPE_CHECKING:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

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
    def issues_table(issues: list[FlowIssue]) -> Table:
        t = _rich().Table(title="Issues" if issues else "Issues: none found", show_lines=False)
        for col in ("severity", "type", "layer", "value", "threshold", "message"):
            # numbers never wrap (a folded `4.3` / `8e+04` reads as two numbers); text folds
            numeric = col in ("value", "threshold")
            t.add_column(col, overflow="fold", no_wrap=numeric, justify="right" if numeric else "left")
        for i in issues:
            style = SEVERITY_STYLE.get(i.severity.value, "white")
            t.add_row(f"[{style}]{i.severity.value}[/]", i.issue_type.value, i.layer, fmt(i.value), fmt(i.threshold),
                      i.message)
        return t

    #: The layer table's columns; a console narrower than NARROW gets NARROW_COLUMNS (they fit 80 columns).
    LAYER_COLUMNS = ("layer", "type", "pressure", "max", "turbulence", "zero act", "dead units", "eff. rank out",
                     "gain", "health", "status")
    NARROW_COLUMNS = ("layer", "type", "pressure", "turbulence", "zero act", "dead units", "health", "status")
    NARROW = 120

    @staticmethod
    def layers_table(report: Any, max_rows: int = 60, width: int | None = None) -> Table:
        """Per-layer metrics; a console narrower than NARROW gets the compact layout (fewer columns, no
        vertical rules), so that every number stays whole at 80 columns."""
        narrow = width is not None and width < ConsoleReporter.NARROW
        rich = _rich()
        if narrow:
            from rich import box
            t = rich.Table(title="Layers", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False,
                           show_edge=False)
            cols = ConsoleReporter.NARROW_COLUMNS
        else:
            t = rich.Table(title="Layers", show_lines=False)
            cols = ConsoleReporter.LAYER_COLUMNS
        for col in cols:
            left = col in ("layer", "type", "status")
            t.add_column(col, justify="left" if left else "right", no_wrap=not left or col == "status",
                         overflow="fold")
        for m in report.layers[:max_rows]:
            h = report.health.get(m.layer)
            score = h.score if h else float("nan")
            status = h.status.value if h else "-"
            style = STATUS_STYLE.get(status, "white")
            cells = {"layer": m.layer, "type": m.layer_type, "pressure": fmt(m.mean_pressure),
                     "max": fmt(m.max_pressure), "turbulence": fmt(m.turbulence),
                     "zero act": _pct(m.activation_zero_ratio), "dead units": _pct(m.dead_unit_ratio),
                     "eff. rank out": fmt(m.effective_rank_out), "gain": fmt(m.gradient_gain),
                     "health": f"[{style}]{fmt(round(score))}[/]" if math.isfinite(score) else "-",
                     "status": f"[{style}]{status}[/]"}
            t.add_row(*(cells[c] for c in cols))
        if len(report.layers) > max_rows:
            t.caption = f"{len(report.layers) - max_rows} more layers not shown"
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
        self.console.print(self.issues_table(report.issues if issues is None else issues))

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
    def format_report(cls, report: Any, width: int = 120) -> str:
        """The whole report as plain text (no colour codes)."""
        buf = io.StringIO()
        console = _rich().Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
        cls(console).print_all(report)
        return buf.getvalue()
