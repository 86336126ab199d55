"""Reports of a run: the JSON document, a Markdown file and a `rich` console summary.

All three are built from one dict (`build_report`) so they can never disagree.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import IO, Any

from .._optional import require
from .errors import OutputError
from .result import AnalysisResult, json_safe

Console = require("rich.console", "initcheck", "gradflow_agent.initcheck").Console
Table = require("rich.table", "initcheck", "gradflow_agent.initcheck").Table
Text = require("rich.text", "initcheck", "gradflow_agent.initcheck").Text

SCHEMA_VERSION = 1
TOOL = "gradflow-agent init-check"


def package_version() -> str | None:
    try:
        return importlib_metadata.version("gradflow-agent")
    except importlib_metadata.PackageNotFoundError:
        return None


def summarize(results: Sequence[AnalysisResult]) -> dict[str, Any]:
    """Counts by outcome and an overall status: error > warning > ok."""
    counts = {
        "total": len(results),
        "passed": 0,
        "failed": 0,
        "skipped": 0,
        "info": 0,
        "warning": 0,
        "error": 0,
    }
    for r in results:
        counts["skipped" if r.skipped else "passed" if r.passed else "failed"] += 1
        counts[r.severity] += 1
    counts["status"] = "error" if counts["error"] else "warning" if counts["failed"] else "ok"
    return counts


def analysis_status(results: Sequence[AnalysisResult]) -> dict[str, dict[str, Any]]:
    """Per analysis id: ran / skipped / failed, and whether all its checks passed."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = out.setdefault(r.analysis, {"status": "ran", "passed": True, "n_results": 0})
        entry["n_results"] += 1
        entry["passed"] = entry["passed"] and r.passed
        if r.message.startswith("analysis failed:"):
            entry["status"] = "failed"
    for aid, entry in out.items():
        if all(r.skipped for r in results if r.analysis == aid):
            entry["status"] = "skipped"
    return out


def build_report(meta: dict[str, Any], results: Sequence[AnalysisResult]) -> dict[str, Any]:
    """The stable JSON document: schema_version, tool, run metadata, summary, analyses, results."""
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "tool": TOOL}
    doc.update(json_safe(meta))
    doc["summary"] = summarize(results)
    doc["analyses"] = analysis_status(results)
    doc["results"] = [r.to_dict() for r in results]
    return doc


def _write(path: str | Path, text: str, suffixes: tuple[str, ...]) -> Path:
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        raise OutputError(f"output {str(path)!r} must end with {' or '.join(suffixes)}")
    try:
        if target.parent and not target.parent.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return target


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def save_json(doc: dict[str, Any], path: str | Path) -> Path:
    return _write(path, to_json(doc), (".json",))


def _status_text(r: dict[str, Any]) -> str:
    if r["skipped"]:
        return "skipped"
    if r["passed"]:
        return "ok"
    return "ERROR" if r["severity"] == "error" else "warning"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: dict[str, Any]) -> str:
    """A human-readable report: run settings, summary, then one table per analysis."""
    mod = doc["module"]
    s = doc["summary"]
    shapes = ", ".join(f"`{k}`: {tuple(v)}" for k, v in doc["input_shapes"].items())
    kwargs = ", ".join(f"`{k}={v!r}`" for k, v in mod["kwargs"].items()) or "none"
    lines = [
        f"# Initialization check: `{mod['spec']}`",
        "",
        f"- Class: `{mod['class']}` ({mod['n_parameters']} parameters, {mod['n_trainable']} trainable)",
        f"- Module kwargs: {kwargs}",
        f"- Inputs: {shapes} ({doc['call_style']} call)",
        f"- Device: `{doc['device']}` (requested `{doc['requested_device']}`), dtype `{doc['dtype']}`",
        f"- Samples: {doc['n_samples']}, loss functions: {', '.join(doc['loss_fns'])}, seed {doc['seed']}",
        "",
        f"**Status: {s['status']}** - {s['passed']} passed, {s['failed']} failed "
        f"({s['warning']} warnings, {s['error']} errors), {s['skipped']} skipped, {s['total']} checks.",
        "",
    ]
    by_analysis: dict[str, list[dict[str, Any]]] = {}
    for r in doc["results"]:
        by_analysis.setdefault(r["analysis"], []).append(r)
    for aid, rows in by_analysis.items():
        lines += [f"## {aid}", "", "| Check | Status | Severity | Message |", "| --- | --- | --- | --- |"]
        for r in rows:
            lines.append(
                f"| `{r['name']}` | {_status_text(r)} | {r['severity']} | {_md_escape(r['message'])} |"
            )
        lines.append("")
    lines += ["## Healthy ranges", "", "| Threshold | Value |", "| --- | --- |"]
    lines += [f"| `{k}` | {v} |" for k, v in doc["healthy_ranges"].items()]
    return "\n".join(lines) + "\n"


def save_markdown(doc: dict[str, Any], path: str | Path) -> Path:
    return _write(path, to_markdown(doc), (".md", ".markdown"))


STYLES = {"ok": "green", "warning": "yellow", "ERROR": "bold red", "skipped": "dim"}


def print_summary(doc: dict[str, Any], file: IO[str] | None = None) -> None:
    """A table of every check with its status and message, then one status line."""
    stream = file or sys.stdout
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    console = Console(file=stream, width=None if is_tty else 140, force_jupyter=False, soft_wrap=False)
    mod = doc["module"]
    shapes = " ".join(f"{k}:{','.join(map(str, v))}" for k, v in doc["input_shapes"].items())
    table = Table(
        title=f"init-check {mod['spec']}  inputs {shapes}  {doc['device']}/{doc['dtype']}",
        show_lines=False,
        expand=False,
    )
    table.add_column("Check", overflow="fold")
    table.add_column("Status")
    table.add_column("Message", overflow="fold")
    for r in doc["results"]:
        status = _status_text(r)
        table.add_row(Text(r["name"]), Text(status, style=STYLES[status]), Text(r["message"]))
    console.print(table)
    s = doc["summary"]
    style = {"ok": "green", "warning": "yellow", "error": "bold red"}[s["status"]]
    console.print(
        f"[{style}]status {s['status']}[/]: {s['passed']} passed, {s['failed']} failed "
        f"({s['warning']} warnings, {s['error']} errors), {s['skipped']} skipped"
    )
