"""`gradflow-agent init-check`: analyze, generate-notebook, list-analyses.

Exit codes: 0 done; 1 checks failed under `--fail-on`, or a generated notebook/script failed to run;
2 a usage error (unknown module, bad shape, rejected kwarg, unusable device or dtype, bad output path),
printed as one line on stderr, with the traceback only under `--debug`.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import IO, Any, NoReturn

from .analyses import ANALYSES
from .config import DTYPES, LOSS_FNS, AnalysisConfig
from .errors import InitCheckError, OutputError, ShapeError
from .spec import parse_module_kwargs, parse_named_shapes, parse_shape

PROG = "gradflow-agent init-check"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add_module_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "spec", help="module to analyse: package.module@ClassName (e.g. torch.nn@Linear) or file.py@Class"
    )
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument("--input-shape", metavar="SHAPE", help="single input shape, e.g. 2,16 or 2,16,64")
    shapes.add_argument(
        "--input-shapes",
        nargs="+",
        action="extend",
        metavar="NAME:SHAPE",
        help="named inputs, e.g. query:2,8,32 key:2,8,32 value:2,8,32 (by keyword when forward has them)",
    )
    p.add_argument(
        "--module-kwargs",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="constructor kwargs; values are Python literals (16, False, (4, 16), None) or strings",
    )
    p.add_argument(
        "--loss-fn",
        nargs="+",
        action="extend",
        choices=LOSS_FNS,
        metavar="LOSS",
        help=f"loss function(s) for the gradient analyses: {', '.join(LOSS_FNS)} (default: reconstruction)",
    )
    p.add_argument(
        "--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda; CPU when CUDA is absent)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="parameter and input dtype (default: float32)"
    )
    p.add_argument(
        "--n-samples", type=int, default=50, metavar="N", help="samples per estimate (default: 50)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the module's init and all inputs (default: 0)"
    )
    p.add_argument(
        "--only", nargs="+", choices=list(ANALYSES), metavar="ANALYSIS", help="run only these analyses"
    )
    p.add_argument(
        "--skip", nargs="+", choices=list(ANALYSES), default=[], metavar="ANALYSIS", help="skip these"
    )
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notices")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Check that a PyTorch module is well-behaved at initialization.",
        epilog="Example: %(prog)s analyze torch.nn@Linear --input-shape 2,16 "
        "--module-kwargs in_features=16 out_features=32 --device cpu",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    analyze = sub.add_parser("analyze", help="run the analyses and print (or save) the results")
    _add_module_options(analyze)
    analyze.add_argument(
        "-o", "--output", metavar="FILE", help="write results to FILE.json or FILE.md ('-': JSON on stdout)"
    )
    analyze.add_argument(
        "--fail-on",
        choices=("never", "warning", "error"),
        default="never",
        help="exit 1 when a check fails with this severity or worse (default: never)",
    )

    gen = sub.add_parser(
        "generate-notebook", help="write a Jupyter notebook (or .py script) that runs the analyses"
    )
    _add_module_options(gen)
    gen.add_argument(
        "-o", "--output", metavar="FILE", help="FILE.ipynb or FILE.py (default: init_check_<class>.<fmt>)"
    )
    gen.add_argument(
        "--output-format", choices=("ipynb", "py"), help="ipynb or py (default: from -o, else ipynb)"
    )
    gen.add_argument(
        "--run", action="store_true", help="execute it after writing (nbclient) and save the outputs"
    )
    gen.add_argument("--kernel", default="python3", help="Jupyter kernel for --run (default: python3)")
    gen.add_argument("--timeout", type=int, default=600, help="seconds per cell for --run (default: 600)")

    lst = sub.add_parser("list-analyses", help="list the analyses, their switches and healthy ranges")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_common(lst)
    return parser


def _shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    if args.input_shapes:
        return parse_named_shapes(args.input_shapes)
    if args.input_shape:
        return {"x": parse_shape(args.input_shape)}
    raise ShapeError("an input shape is required: --input-shape 2,16 or --input-shapes name:2,16 ...")


def _enabled(args: argparse.Namespace) -> list[str]:
    chosen = list(args.only) if args.only else list(ANALYSES)
    return [a for a in chosen if a not in set(args.skip)]


def _config(args: argparse.Namespace) -> AnalysisConfig:
    enabled = set(_enabled(args))
    switches = {info.switch: (aid in enabled) for aid, info in ANALYSES.items()}
    return AnalysisConfig(
        input_shapes=_shapes(args),
        device=args.device,
        dtype=args.dtype,
        n_samples=args.n_samples,
        loss_fns=tuple(args.loss_fn or ("reconstruction",)),
        seed=args.seed,
        quiet=args.quiet,
        debug=args.debug,
        **switches,
    )


def _fails(summary: dict[str, Any], fail_on: str) -> bool:
    if fail_on == "error":
        return summary["error"] > 0
    if fail_on == "warning":
        return summary["failed"] > 0
    return False


def cmd_analyze(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from . import report
    from .runner import AnalysisRunner

    if (
        args.output
        and args.output != "-"
        and Path(args.output).suffix.lower() not in (".json", ".md", ".markdown")
    ):
        raise OutputError(f"output {args.output!r} must end with .json or .md")
    kwargs = parse_module_kwargs(args.module_kwargs)
    runner = AnalysisRunner(args.spec, _config(args), kwargs, stderr=err)
    results = runner.run_all()
    doc = runner.report(results)
    if args.output == "-":
        out.write(report.to_json(doc))
    else:
        if not (args.quiet and args.output):
            report.print_summary(doc, file=out)
        if args.output:
            suffix = Path(args.output).suffix.lower()
            path = (
                report.save_json(doc, args.output)
                if suffix == ".json"
                else report.save_markdown(doc, args.output)
            )
            if not args.quiet:
                print(f"wrote {path}", file=err)
    return EXIT_FAILED if _fails(doc["summary"], args.fail_on) else EXIT_OK


def _default_output(spec: str, fmt: str) -> str:
    cls = spec.rpartition("@")[2] if "@" in spec else spec.rpartition(".")[2]
    return f"init_check_{cls.split('.')[-1].lower()}.{fmt}"


def cmd_generate(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from . import notebook
    from .runner import AnalysisRunner

    fmt = notebook.output_format(args.output, args.output_format)
    path = args.output or _default_output(args.spec, fmt)
    kwargs = parse_module_kwargs(args.module_kwargs)
    config = _config(args)
    # Build and probe the module now: a bad spec, shape, kwarg or dtype is reported here, not in cell 4.
    AnalysisRunner(args.spec, config, kwargs, stderr=err)
    spec, extra_path = notebook.import_root(args.spec)
    params = notebook.NotebookParams(
        spec=spec,
        module_kwargs=kwargs,
        input_shapes=config.shapes,
        device=args.device,
        dtype=args.dtype,
        n_samples=args.n_samples,
        loss_fns=config.loss_fns,
        seed=args.seed,
        analyses=_enabled(args),
        extra_sys_path=[extra_path] if extra_path else [],
    )
    target = notebook.write(params, path, fmt, kernel=args.kernel)
    print(f"wrote {target}", file=err)
    if args.run:
        if fmt == "ipynb":
            notebook.execute_notebook(target, kernel=args.kernel, timeout=args.timeout)
            print(f"executed {target} (outputs saved)", file=err)
        else:
            proc = notebook.execute_script(target, timeout=args.timeout)
            out.write(proc.stdout)
            print(f"ran {target}", file=err)
    return EXIT_OK


def cmd_list(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    rows = [
        {"id": i.id, "title": i.title, "switch": i.switch, "description": i.description, "healthy": i.healthy}
        for i in ANALYSES.values()
    ]
    if args.json:
        out.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    from .._optional import require

    require("rich", "initcheck", "gradflow_agent.initcheck")
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="init-check analyses")
    for col in ("Analysis", "Config switch", "Measures", "Healthy"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(Text(r["id"]), Text(r["switch"]), Text(r["description"]), Text(r["healthy"]))
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    Console(file=out, width=None if is_tty else 140, force_jupyter=False).print(table)
    return EXIT_OK


COMMANDS = {"analyze": cmd_analyze, "generate-notebook": cmd_generate, "list-analyses": cmd_list}


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments that follow `init-check` and run the command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    out, err = sys.stdout, sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return COMMANDS[args.command](args, out, err)
    except InitCheckError as exc:
        if debug:
            traceback.print_exc(file=err)
        print(f"{PROG}: error: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return 130
    except Exception as exc:
        from .notebook import NotebookExecutionError

        if isinstance(exc, NotebookExecutionError):
            if debug:
                traceback.print_exc(file=err)
            print(f"{PROG}: error: execution failed: {exc}", file=err)
            return EXIT_FAILED
        if debug:
            traceback.print_exc(file=err)
        else:
            print(
                f"{PROG}: internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)",
                file=err,
            )
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
