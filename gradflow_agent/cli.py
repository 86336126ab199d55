"""`gradflow-agent` / `python -m gradflow_agent`: demo, config check, and the sub-tools' commands.

`--help` and `--version` import neither torch nor any sub-tool: a sub-command's module is imported only
when it runs, and a command whose extra is not installed says which one in one line (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from ._optional import MissingExtraError, require_extra

# The demo's `--pathology` choices, kept here so that building the parser never imports the demo (torch);
# tests/test_packaging.py checks that they equal gradflow_agent.demo.PATHOLOGIES.
PATHOLOGIES = ("vanishing", "exploding", "dead", "nonfinite", "saturated", "stalled", "unstable")

# Sub-commands implemented by other parts of the package: name -> (module, help, extra it needs or None).
# Each module has `main(argv) -> int` and parses what follows the sub-command itself.
DELEGATED: dict[str, tuple[str, str, str | None]] = {
    "init-check": ("gradflow_agent.initcheck.cli", "check a module's initialisation (norms, spectra, ...)",
                   "initcheck"),
    "rules": ("gradflow_agent.alerting.cli", "write Prometheus alert rules from a config's thresholds", None),
    "dashboards": ("gradflow_agent.alerting.dashboards_cli", "write the Grafana dashboards from a config",
                   "dashboards"),
    "report": ("gradflow_agent.report.cli", "turn a JSONL flight record into an HTML/JSON/text report", None),
    "top": ("gradflow_agent.report.top", "live terminal view of a running job's /metrics (or via Prometheus)", None),
}


def _demo(args: argparse.Namespace) -> int:
    if args.steps <= 0:
        print(f"gradflow-agent demo: error: --steps must be a positive number of steps, not {args.steps}",
              file=sys.stderr)
        return 2
    require_extra("demo", "gradflow-agent demo")  # rich draws its progress bar and tables
    if not args.quiet:  # importing torch takes seconds: say something first
        print("gradflow-agent demo: starting (importing torch)...", flush=True)
    from .demo import run
    issues = run(pathology=args.pathology, steps=args.steps, port=args.port, addr=args.addr,
                 config=args.config, step_delay=args.step_delay, linger=args.linger, quiet=args.quiet)
    return 1 if args.fail_on_issues and issues else 0


def _check_config(args: argparse.Namespace) -> int:
    """What attach() would do with this config, without a model: one error line (exit 2) or `ok` (exit 0)."""
    import os

    from .config import DEFAULT_SOURCE, ENV_CONFIG_FILE, ConfigError, check_runtime, env_overrides, load_config
    warnings: list[str] = []
    try:
        cfg = load_config(args.file, warn=warnings.append)
        check_runtime(cfg)
    except ConfigError as exc:
        if args.debug:
            raise
        for warning in warnings:
            print(f"gradflow-agent: warning: {warning}", file=sys.stderr)
        print(f"gradflow-agent: error: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"gradflow-agent: warning: {warning}", file=sys.stderr)
    name = args.file or os.environ.get(ENV_CONFIG_FILE) or DEFAULT_SOURCE
    overrides = len(env_overrides(cfg))
    from_env = f", {overrides} key{'s' if overrides != 1 else ''} from the environment" if overrides else ""
    print(f"{name}: ok ({len(cfg)} sections{from_env})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; torch-free, so that `--help` and `--version` answer at once."""
    parser = argparse.ArgumentParser(prog="gradflow-agent", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"gradflow-agent {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model with the agent attached and serve its metrics")
    demo.add_argument("--pathology", choices=PATHOLOGIES, help="train a model with this fault")
    demo.add_argument("--steps", type=int, default=400)
    demo.add_argument("--port", type=int, default=9464, help="metrics port (0 = a free port)")
    demo.add_argument("--addr", default="127.0.0.1", help="metrics listen address")
    demo.add_argument("--config", help="YAML config merged over the demo's defaults")
    demo.add_argument("--step-delay", type=float, default=0.01, help="seconds to sleep between steps")
    demo.add_argument("--linger", type=float, default=0.0, help="keep serving metrics this long after training")
    demo.add_argument("--quiet", action="store_true", help="no progress or tables")
    demo.add_argument("--fail-on-issues", action="store_true", help="exit 1 when issues were detected")
    demo.set_defaults(func=_demo)
    check = sub.add_parser("check-config", help="validate a config as attach() would (file, environment, machine)")
    check.add_argument("file", nargs="?", help="YAML config (default: $GRADFLOW_CONFIG, else the defaults); "
                                              "GRADFLOW_* variables apply either way")
    check.set_defaults(func=_check_config)
    for name, (_, help_text, _extra) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _delegate(name: str, argv: list[str]) -> int:
    """Run a sub-tool's `main`, after checking (without importing it) that its extra is installed."""
    module_name, _, extra = DELEGATED[name]
    if extra is not None:
        require_extra(extra, f"gradflow-agent {name}")
    return importlib.import_module(module_name).main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for i, token in enumerate(argv):
        if token in DELEGATED:
            if any(t != "--debug" for t in argv[:i]):
                break
            try:
                return _delegate(token, argv[i + 1:] + (["--debug"] if "--debug" in argv[:i] else []))
            except MissingExtraError as exc:  # the one line that names the extra
                if "--debug" in argv:
                    raise
                print(exc, file=sys.stderr)
                return 2
        if not token.startswith("-"):
            break
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MissingExtraError as exc:
        if args.debug:
            raise
        print(exc, file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line; the traceback with --debug
        if args.debug:
            raise
        print(f"gradflow-agent: error: {exc}", file=sys.stderr)
        return 2
