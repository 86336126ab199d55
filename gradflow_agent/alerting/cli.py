"""`gradflow-agent rules` and `gradflow-agent dashboards`: write the generated alert rules / dashboards.

Both read the same config as `attach()` (the `thresholds:` section), so the alerts Prometheus evaluates
and the lines the dashboards draw agree with what the in-process detector flags. `--check` compares
instead of writing (exit 1 on a difference): CI uses it to keep the checked-in files generated.

    gradflow-agent rules --config gradflow.yaml -o deploy/prometheus/rules/gradflow-alerts.yml
    gradflow-agent rules --config gradflow.yaml --format k8s --namespace ml -o prometheusrule.yaml
    gradflow-agent dashboards --config gradflow.yaml -o grafana/dashboards
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradflow_agent.config import ConfigError, Section, load_config


def _write_or_check(path: Path | None, text: str, check: bool) -> bool:
    """Write `text` (stdout without a path); with `check`, report whether the file already holds it."""
    if path is None:
        if check:
            raise SystemExit("--check needs -o/--output")
        sys.stdout.write(text)
        return True
    if check:
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            print(f"{path}: out of date; regenerate it with the same command without --check", file=sys.stderr)
            return False
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def _load(args: argparse.Namespace, command: str) -> Section | None:
    """The config named by --config; None (after a message on stderr) when it is invalid, unless --debug."""
    try:
        return load_config(args.config)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"gradflow-agent {command}: {exc}", file=sys.stderr)
        return None


def _rules_parser() -> argparse.ArgumentParser:
    from gradflow_agent.alerting.rules import DEFAULT_JOB_REGEX, RUNBOOK_BASE_URL

    parser = argparse.ArgumentParser(
        prog="gradflow-agent rules",
        description="Write the Prometheus alert rules (from the rule table and a config's thresholds).")
    parser.add_argument("--config", help="agent config file (YAML); default: the built-in defaults")
    parser.add_argument("--format", choices=("prometheus", "k8s", "promtool-tests"), default="prometheus",
                        help="a Prometheus rule file, a prometheus-operator PrometheusRule resource, or the "
                             "promtool unit tests proving the alerts fire exactly where the detector does")
    parser.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file differs")
    parser.add_argument("--runbook-base-url", default=RUNBOOK_BASE_URL,
                        help="URL under which <Alert>.md runbooks are published (default: %(default)s)")
    parser.add_argument("--job-regex", default=DEFAULT_JOB_REGEX,
                        help="scrape jobs of the agents, for GradflowAgentDown (default: %(default)s)")
    parser.add_argument("--hung-after", default="10m",
                        help="TrainingHung: a served run without an optimizer step for this long "
                             "(a Prometheus duration, above your longest step; default: %(default)s)")
    parser.add_argument("--alert-absent", action="store_true",
                        help="GradflowAgentDown also fires when no target matches --job-regex at all")
    parser.add_argument("--name", default="gradflow-alerts", help="k8s: metadata.name (default: %(default)s)")
    parser.add_argument("--namespace", help="k8s: metadata.namespace (default: none)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`gradflow-agent rules ...` (argv is what follows `rules`)."""
    from gradflow_agent.alerting.rules import build_rule_groups, render_k8s, render_prometheus

    args = _rules_parser().parse_args(argv)
    cfg = _load(args, "rules")
    if cfg is None:
        return 2
    groups = build_rule_groups(cfg, runbook_base_url=args.runbook_base_url, job_regex=args.job_regex,
                               alert_absent=args.alert_absent, hung_after=args.hung_after)
    source = args.config or "config/default.yaml"
    if args.format == "k8s":
        text = render_k8s(groups, source, name=args.name, namespace=args.namespace)
    elif args.format == "promtool-tests":
        from gradflow_agent.alerting.agreement import render_promtool_tests
        text = render_promtool_tests(cfg, source)
    else:
        text = render_prometheus(groups, source)
    return 0 if _write_or_check(args.output, text, args.check) else 1


def dashboards_main(argv: list[str] | None = None) -> int:
    """`gradflow-agent dashboards ...`: write the Grafana dashboards JSON into a directory."""
    parser = argparse.ArgumentParser(
        prog="gradflow-agent dashboards",
        description="Write the Grafana dashboards (JSON, one file each) for a config's thresholds.")
    parser.add_argument("--config", help="agent config file (YAML); default: the built-in defaults")
    parser.add_argument("-o", "--output", type=Path, default=Path("grafana/dashboards"),
                        help="directory for the JSON files (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        from gradflow_agent.alerting.dashboards import build_dashboards, to_json
    except ImportError as exc:
        print(f"gradflow-agent dashboards: {exc}; install the pinned Grafana SDK: "
              f"pip install 'grafana-foundation-sdk==1769699379!11.6.0'", file=sys.stderr)
        return 2
    cfg = _load(args, "dashboards")
    if cfg is None:
        return 2
    ok = True
    for name, model in build_dashboards(cfg).items():
        ok = _write_or_check(args.output / name, to_json(model), args.check) and ok
    return 0 if ok else 1


if __name__ == "__main__":  # python -m gradflow_agent.alerting.cli {rules|dashboards} ...
    commands = {"rules": main, "dashboards": dashboards_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print("usage: python -m gradflow_agent.alerting.cli {rules|dashboards} [options]", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(commands[sys.argv[1]](sys.argv[2:]))
