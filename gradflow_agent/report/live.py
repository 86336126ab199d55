"""Live views of a Snapshot for the terminal (the demo): a per-layer health table and an issue list."""

from __future__ import annotations

import math

from .._optional import require
from ..snapshot import Snapshot

Table = require("rich.table", "demo", "gradflow_agent.report.live (the demo's tables)").Table


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def health_table(snap: Snapshot | None, max_rows: int = 40) -> Table:
    table = Table(title=f"layer health at step {snap.step if snap else 0}", show_lines=False)
    for col in ("layer", "type", "pressure", "turbulence", "act std", "zero %", "sat %", "dead %",
                "update", "NaN/Inf", "health"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    if snap is None:
        return table
    s = snap.stats
    for i, name in enumerate(snap.layers[:max_rows]):
        bad = sum(float(v[i]) for v in snap.nonfinite.values())
        score = float(snap.health[i]) if snap.health is not None else 100.0
        colour = "green" if score >= 75 else "yellow" if score >= 50 else "red"

        def pct(key: str, i: int = i) -> str:
            v = s[key][i]
            return "-" if math.isnan(v) else f"{100 * v:.0f}"

        table.add_row(name, snap.layer_types[i], _fmt(s["grad_pressure"][i]), _fmt(s["grad_turbulence"][i]),
                      _fmt(s["activation_std"][i]), pct("activation_zero_ratio"),
                      pct("activation_saturation_ratio"), pct("activation_dead_unit_ratio"),
                      _fmt(s["update_ratio"][i]), f"{bad:.0f}", f"[{colour}]{score:.0f}[/]")
    if len(snap.layers) > max_rows:
        table.caption = f"{len(snap.layers) - max_rows} more layers not shown"
    return table


def issues_table(issues) -> Table:
    table = Table(title="detected issues" if issues else "detected issues: none")
    for col in ("severity", "kind", "layer", "value", "threshold", "message"):
        table.add_column(col)
    colours = {"critical": "red", "warning": "yellow", "info": "blue"}
    for issue in issues:
        table.add_row(f"[{colours[issue.severity]}]{issue.severity}[/]", issue.kind, issue.layer,
                      _fmt(issue.value), _fmt(issue.threshold), issue.message)
    return table
