"""`gradflow-agent report SNAPSHOTS.jsonl -o report.html [--format html|json|text]`: a recorded run as a report.

The JSONL flight record (exporters.jsonl, one `Snapshot.to_dict()` per line) goes through the analyzers'
detectors with the thresholds of a config file (`--config`, default: the agent's defaults) and is written
as one self-contained HTML page, JSON (loadable with `FlowReport.load_json`) or plain text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("html", "json", "text")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradflow-agent report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshots", help="JSONL flight record written by the agent's jsonl exporter, or a "
                                     "flight-recorder bundle (text on stdout unless -o/--format)")
    p.add_argument("-o", "--output", help="output file (default: SNAPSHOTS with the format's suffix)")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from the output suffix, else html)")
    p.add_argument("--config", help="agent config (YAML) whose `thresholds:` section the detectors use")
    p.add_argument("--title", help="report title")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower() if args.output else ""
    return {".json": "json", ".txt": "text", ".text": "text"}.get(suffix, "html")


def _thresholds(config: str | None):
    """FlowThresholds from the config's `thresholds:` section (the same values the live detectors use)."""
    from ..analyze.base import FlowThresholds
    from ..config import load_config

    th = load_config(config).thresholds
    return FlowThresholds(vanishing=th.vanishing, exploding=th.exploding, dead=th.dead_ratio,
                          dead_unit_ratio=th.dead_unit_ratio, unstable_cv=th.unstable_cv,
                          saturation_ratio=th.saturation_ratio, stalled_update_ratio=th.stalled_update_ratio)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    fmt = _format(args)
    try:
        from ..export.jsonl import describe_skipped, scan_snapshots
        from .flow_report import FlowReport

        src = Path(args.snapshots)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file")
        from ..export.flight import is_bundle
        if is_bundle(src):  # a flight-recorder bundle (export/flight.py): text on stdout by default
            from .bundle import main as bundle_main
            return bundle_main(args, src, _thresholds)
        records, skipped = scan_snapshots(src)  # a torn last line (a killed run) is skipped, not fatal
        if skipped and not args.quiet:
            print(f"gradflow-agent report: warning: {describe_skipped(src, skipped)}", file=sys.stderr)
        if not records:
            raise ValueError(f"{src}: no snapshot records")
        report = FlowReport.from_records(records, thresholds=_thresholds(args.config),
                                         title=args.title or f"gradflow report: {src.name}")
        out = Path(args.output) if args.output else src.with_suffix({"html": ".html", "json": ".json",
                                                                     "text": ".txt"}[fmt])
        {"html": report.save_html, "json": report.save_json, "text": report.save_text}[fmt](out)
    except Exception as exc:
        if args.debug:
            raise
        print(f"gradflow-agent report: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        s = report.summary()
        print(f"{out}: {fmt} report of {len(records)} snapshots, {s['layers']} layers, overall health "
              f"{s['overall_score']:.0f} ({s['overall_status']}), {s['issues']} issues"
              + (f", {len(skipped)} undecodable lines skipped" if skipped else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
