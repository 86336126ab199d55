"""Live views of a Snapshot for the terminal (the demo): a per-layer health table and an issue list.

Both fit the console they are drawn on: at 80 columns the narrow layout drops the columns that matter
least and separates the rest by one space, so that no number is ever cut to `0.0…` (numbers have 3
significant digits and their columns never wrap; layer names are shortened in the middle instead).
"""

from __future__ import annotations

import math

from .._optional import require
from ..snapshot import Snapshot

Table = require("rich.table", "demo", "gradflow_agent.report.live (the demo's tables)").Table
box = require("rich.box", "demo", "gradflow_agent.report.live (the demo's tables)")

#: Below this console width the tables use the narrow layout.
WIDE = 120


def _fmt(x: float | None) -> str:
    """3 significant digits (`1.2e-07`, `0.0123`, `4.41e+04`); '-' for no data."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def middle(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut in the middle (qualified layer names differ at both ends)."""
    if len(text) <= width or width < 3:
        return text
    head = (width - 1) // 2 + (width - 1) % 2
    return text[:head] + "~" + text[len(text) - (width - 1 - head):]


def _table(title: str, narrow: bool) -> Table:
    if narrow:  # no vertical rules, one space between columns
        return Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    return Table(title=title, show_lines=False)


def health_table(snap: Snapshot | None, max_rows: int = 40, width: int | None = None) -> Table:
    """Per-layer statistics and health; `width` (the console's) below WIDE selects the narrow layout."""
    narrow = width is not None and width < WIDE
    table = _table(f"layer health at step {snap.step if snap else 0}", narrow)
    s = snap.stats if snap else {}
    bad = ([sum(float(v[i]) for v in snap.nonfinite.values()) for i in range(len(snap.layers))]
           if snap else [])
    if narrow:
        cols = ["layer", "type", "pressure", "turb", "zero%", "sat%", "dead%", "update", "health"]
        if any(bad):
            cols.insert(-1, "NaN")
        fixed = {"type": 7, "pressure": 8, "turb": 8, "zero%": 5, "sat%": 4, "dead%": 5, "update": 8, "NaN": 7,
                 "health": 6}
        name_w = max(8, min(24, (width or 80) - sum(fixed[c] + 1 for c in cols[1:]) - 1))
    else:
        cols = ["layer", "type", "pressure", "turbulence", "act std", "zero %", "sat %", "dead %", "update",
                "NaN/Inf", "health"]
        name_w = 48
    for col in cols:
        left = col in ("layer", "type")
        table.add_column(col, justify="left" if left else "right", no_wrap=True,
                         overflow="crop" if left else "fold")
    if snap is None:
        return table
    for i, name in enumerate(snap.layers[:max_rows]):
        score = float(snap.health[i]) if snap.health is not None else math.nan
        # the bands of detect/health.py: critical <= 50 < warning < 100 = healthy
        colour = "white" if math.isnan(score) else "green" if score >= 100 else "yellow" if score > 50 else "red"

        def pct(key: str, i: int = i) -> str:
            v = s[key][i]
            return "-" if math.isnan(v) else f"{100 * v:.0f}"

        cells = {
            "layer": middle(name, name_w), "type": middle(snap.layer_types[i], 7 if narrow else 24),
            "pressure": _fmt(s["grad_pressure"][i]), "turbulence": _fmt(s["grad_turbulence"][i]),
            "turb": _fmt(s["grad_turbulence"][i]), "act std": _fmt(s["activation_std"][i]),
            "zero %": pct("activation_zero_ratio"), "zero%": pct("activation_zero_ratio"),
            "sat %": pct("activation_saturation_ratio"), "sat%": pct("activation_saturation_ratio"),
            "dead %": pct("activation_dead_unit_ratio"), "dead%": pct("activation_dead_unit_ratio"),
            "update": _fmt(s["update_ratio"][i]), "NaN/Inf": f"{bad[i]:.0f}", "NaN": f"{bad[i]:.3g}",
            # unknown is never shown as healthy
            "health": f"[{colour}]{'?' if math.isnan(score) else f'{score:.0f}'}[/]",
        }
        table.add_row(*(cells[c] for c in cols))
    if len(snap.layers) > max_rows:
        table.caption = f"{len(snap.layers) - max_rows} more layers not shown"
    return table


def issues_table(issues, width: int | None = None) -> Table:
    """The detected issues; narrow: without the threshold column (the message states it)."""
    narrow = width is not None and width < WIDE
    table = _table("detected issues" if issues else "detected issues: none", narrow)
    cols = ("severity", "kind", "layer", "value", "message") if narrow else (
        "severity", "kind", "layer", "value", "threshold", "message")
    for col in cols:
        table.add_column(col, no_wrap=col != "message", overflow="fold",
                         justify="right" if col in ("value", "threshold") else "left")
    colours = {"critical": "red", "warning": "yellow", "info": "blue"}
    for issue in issues:
        cells = {"severity": f"[{colours.get(issue.severity, 'white')}]{issue.severity}[/]", "kind": issue.kind,
                 "layer": middle(issue.layer, 16) if narrow else issue.layer, "value": _fmt(issue.value),
                 "threshold": _fmt(issue.threshold), "message": issue.message}
        table.add_row(*(cells[c] for c in cols))
    return table
