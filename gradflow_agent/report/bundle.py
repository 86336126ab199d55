"""`gradflow-agent report BUNDLE`: a flight-recorder bundle (export/flight.py) for the person on call.

Text (the default, on stdout, at most 80 columns): the trigger, where it started, the per-step loss and
gradient norms before it, the last snapshots and the advice. HTML or JSON: the recorded-run report of the
bundle's snapshots (the same FlowReport the JSONL record gets), with the trigger and the per-step history
added as one more section, so the existing renderers show it unchanged.
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..export.flight import is_bundle, read_bundle

WIDTH = 80
LAYER_COLUMNS = 4  # per-layer norm columns in the text history (the trigger's and origin's layers first)

__all__ = ["WIDTH", "bundle_report", "is_bundle", "main", "render_text"]


def _fit(line: str, width: int = WIDTH) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


def _fmt(value: Any, width: int = 10) -> str:
    """A number in `width` columns; null (no value) as "-", the strings nan/inf as they are."""
    if value is None:
        text = "-"
    elif isinstance(value, str):
        text = value
    else:
        text = f"{float(value):.4g}"
    return text.rjust(width)


def _wrap(label: str, text: str, width: int = WIDTH) -> list[str]:
    pad = " " * 10
    return textwrap.wrap(text, width=width, initial_indent=f"{label:<10}", subsequent_indent=pad) or [label]


def _layer_columns(bundle: dict[str, Any]) -> list[int]:
    """Which layers get a column: the trigger's, the origin's, then the largest norms; only layers with data."""
    h = bundle.get("history") or {}
    layers = h.get("layers") or []
    rows = h.get("layer_grad_norm") or []
    peak = {}
    for i in range(len(layers)):
        values = [r[i] for r in rows if i < len(r) and isinstance(r[i], (int, float))]
        if values:
            peak[i] = max(values)
    first = [bundle["trigger"].get("layer"), (bundle.get("origin") or {}).get("layer")]
    order = [layers.index(name) for name in first if name in layers]
    order += sorted(peak, key=lambda i: -peak[i])
    out: list[int] = []
    for i in order:
        if i in peak and i not in out:
            out.append(i)
    return out[:LAYER_COLUMNS]


def render_text(bundle: dict[str, Any], name: str = "") -> str:
    """The bundle as plain text, every line at most WIDTH columns."""
    t = bundle["trigger"]
    lines = [_fit(f"gradflow flight recorder: {name or 'bundle'}")]
    written = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(bundle.get("written", 0)))
    lines.append(_fit(f"run {bundle.get('run')}  rank {bundle.get('rank')}  written {written}  "
                      f"agent {bundle.get('agent_version', '?')}"))
    lines.append("")
    where = f"{t['layer']} ({t['layer_type']})" if t.get("layer_type") else f"{t['layer']}"
    lines += _wrap("TRIGGER", f"{t['kind']} ({t['severity']}) at layer {where}, step {t['step']}")
    lines += _wrap("", t.get("message", ""))
    lines += _wrap("", f"value {_fmt(t.get('value'), 0)}, threshold {_fmt(t.get('threshold'), 0)}; "
                       f"seen at the snapshot of step {t.get('snapshot_step')}")
    origin = bundle.get("origin")
    if origin:
        lines += _wrap("ORIGIN", f"first non-finite {origin.get('tensor')} values in layer {origin.get('layer')} "
                                 f"at step {origin.get('step')}")
    others = [i for i in bundle.get("issues", []) if (i["kind"], i["layer"]) != (t["kind"], t["layer"])]
    if others:
        lines += _wrap("ALSO NEW", "; ".join(f"{i['kind']} at {i['layer']} ({i['severity']})" for i in others))
    lines += _history(bundle)
    lines += _snapshots(bundle.get("snapshots") or [])
    if t.get("recommendation"):
        lines.append("")
        lines += _wrap("ADVICE", t["recommendation"])
    bounds = bundle.get("bounds") or {}
    left = [f"{bounds[k]} {what}" for k, what in (("history_rows_left_out", "oldest history rows"),
                                                  ("snapshots_left_out", "oldest snapshots")) if bounds.get(k)]
    if left:
        lines += ["", *_wrap("NOTE", f"left out to stay under max_bytes={bounds.get('max_bytes')}: "
                                     + ", ".join(left))]
    return "\n".join(_fit(line) for line in lines) + "\n"


def _history(bundle: dict[str, Any]) -> list[str]:
    h = bundle.get("history") or {}
    steps = h.get("steps") or []
    if not steps:
        return ["", "HISTORY   none kept (no step before the trigger is in the bundle)"]
    layers = h.get("layers") or []
    cols = _layer_columns(bundle)
    trigger_step = bundle["trigger"]["step"]
    out = ["", _fit(f"HISTORY   {len(steps)} steps ({steps[0]}..{steps[-1]}) up to the trigger: loss and "
                    f"gradient L2 norms")]
    out.append("    step" + "loss".rjust(12) + "grad norm".rjust(12) + "".join(f"#{i}".rjust(10) for i in cols))
    norms = h.get("layer_grad_norm") or [[] for _ in steps]
    for k, step in enumerate(steps):
        row = norms[k] if k < len(norms) else []
        line = (f"{step:>8}" + _fmt(h["loss"][k], 12) + _fmt(h["grad_norm"][k], 12)
                + "".join(_fmt(row[i] if i < len(row) else None) for i in cols))
        out.append(line + ("  <" if step == trigger_step else ""))
    types = {row.get("layer"): row.get("type") for r in bundle.get("snapshots") or [] for row in r.get("layers", ())}
    legend = [f"#{i} = {layers[i]}" + (f" ({types[layers[i]]})" if types.get(layers[i]) else "") for i in cols]
    if legend:
        out += textwrap.wrap("; ".join(legend), width=WIDTH, initial_indent="  ", subsequent_indent="  ")
    out.append("  '<': the trigger step; '-': no value; norms are of the finite elements")
    return out


def _snapshots(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return ["", "SNAPSHOTS none kept"]
    out = ["", f"SNAPSHOTS {len(records)}, the last at step {records[-1].get('step')}",
           "    step" + "loss".rjust(12) + "grad norm".rjust(12) + "  non-finite" + "  issues"]
    for r in records:
        bad = sum(1 for row in r.get("layers", ())
                  if any((row.get(f"nonfinite_{k}") or 0) > 0 for k in ("grad", "activation", "param")))
        issues = ", ".join(f"{i['kind']}@{i['layer']}" for i in r.get("issues", ())) or "-"
        line = f"{r.get('step', 0):>8}" + _fmt(r.get("loss"), 12) + _fmt(r.get("grad_norm"), 12) + \
               f"{bad:>5} layers  " + issues
        out.append(_fit(line))
    return out


def bundle_report(bundle: dict[str, Any], *, thresholds: Any = None, title: str | None = None) -> Any:
    """The FlowReport of the bundle's snapshots, with a "Flight recorder" section (trigger and history)."""
    from ..analyze.offline import report_from_records
    from .flow_report import section, series, table

    records = [r for r in bundle.get("snapshots") or [] if r.get("layers")]
    if not records:
        raise ValueError("the bundle holds no snapshot (left out to stay under max_bytes): use --format text")
    t = bundle["trigger"]
    report = report_from_records(records, thresholds=thresholds,
                                 title=title or f"flight recorder: {t['kind']} at {t['layer']}, step {t['step']}")
    h = bundle.get("history") or {}
    steps, layers = h.get("steps") or [], h.get("layers") or []
    cols = _layer_columns(bundle)

    def num(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) else (math.nan if v is None else float(v))

    norms = h.get("layer_grad_norm") or []
    charts = []
    if steps:
        charts.append(series("Loss and global gradient norm per step", steps,
                             {"loss": [num(v) for v in h.get("loss", [])],
                              "grad norm": [num(v) for v in h.get("grad_norm", [])]}, xlabel="step"))
        charts.append(series("Gradient L2 norm per step", steps,
                             {layers[i]: [num(r[i]) for r in norms] for i in cols}, xlabel="step", log=True))
    rows = [[s, h["loss"][k], h["grad_norm"][k], *[(norms[k][i] if k < len(norms) else None) for i in cols]]
            for k, s in enumerate(steps)]
    origin = bundle.get("origin") or {}
    report.sections["flight_recorder"] = section(
        "Flight recorder", summary={
            "trigger": f"{t['kind']} ({t['severity']}) at {t['layer']}", "trigger step": t["step"],
            "snapshot step": t.get("snapshot_step"), "message": t.get("message", ""),
            "origin": f"{origin.get('tensor')} of {origin.get('layer')} at step {origin.get('step')}"
            if origin else "none", "run": bundle.get("run"), "rank": bundle.get("rank")},
        tables=[table("Steps before the trigger", ["step", "loss", "grad norm", *[layers[i] for i in cols]], rows)],
        series=charts, notes="Per-step values kept on the device by the agent and written at the incident.")
    return report


def main(args: argparse.Namespace, src: Path, thresholds: Callable[[str | None], Any]) -> int:
    """Render the bundle `src` as report/cli.py's arguments ask: text on stdout unless a file or format is given."""
    bundle = read_bundle(src)
    fmt = args.format or ({".html": "html", ".htm": "html", ".json": "json"}.get(Path(args.output).suffix.lower(),
                                                                                "text") if args.output else "text")
    if fmt == "text":
        text = render_text(bundle, src.name)
        if not args.output:
            print(text, end="")
            return 0
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    else:
        report = bundle_report(bundle, thresholds=thresholds(args.config), title=args.title)
        out = Path(args.output) if args.output else src.with_suffix(".html" if fmt == "html" else ".report.json")
        (report.save_html if fmt == "html" else report.save_json)(out)
    if not args.quiet:
        t = bundle["trigger"]
        print(f"{out}: {fmt} report of flight bundle {src.name} ({t['kind']} at {t['layer']}, step {t['step']})")
    return 0
