"""Generate an editable Jupyter notebook (or a `# %%` Python script) for one module, and run it.

The notebook starts with a parameters cell (spec, kwargs, shapes, device, ...), then one section per
analysis: a Markdown cell saying what is measured and the healthy range, a cell that runs it and
prints the judged results, and a matplotlib cell that plots its values. Figures are rendered to PNG
explicitly, so they appear inline under any matplotlib backend (and are saved to files by the script).
"""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._optional import require
from .analyses import ANALYSES
from .errors import InitCheckError, OutputError
from .spec import parse_module_spec

nbformat = require("nbformat", "initcheck", "gradflow_agent.initcheck")
_v4 = require("nbformat.v4", "initcheck", "gradflow_agent.initcheck")
new_code_cell, new_markdown_cell, new_notebook = _v4.new_code_cell, _v4.new_markdown_cell, _v4.new_notebook

FORMATS = ("ipynb", "py")


class NotebookExecutionError(Exception):
    """The generated notebook or script failed while running; the message names the cell and the error."""


@dataclass
class NotebookParams:
    """Everything the parameters cell of the notebook sets."""

    spec: str
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"x": (2, 16)})
    device: str = "cuda"
    dtype: str = "float32"
    n_samples: int = 50
    loss_fns: Sequence[str] = ("reconstruction",)
    seed: int = 0
    analyses: Sequence[str] = tuple(ANALYSES)
    extra_sys_path: Sequence[str] = ()


def import_root(spec: str) -> tuple[str, str | None]:
    """The spec as the notebook should write it, and a directory to add to sys.path if one is needed.

    A `.py` file becomes absolute (the kernel runs in the notebook's directory); a dotted module that
    is found outside site-packages and the standard library gets its import root added to sys.path.
    """
    parsed = parse_module_spec(spec)
    if parsed.is_file:
        return f"{Path(parsed.module_path).resolve()}@{parsed.class_name}", None
    top = parsed.module_path.split(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is None:
        cwd = os.getcwd()
        sys.path.insert(0, cwd)
        try:
            found = importlib.util.find_spec(top)
        finally:
            sys.path.remove(cwd)
    if found is None:
        return parsed.text, None
    locations = list(found.submodule_search_locations or []) or ([found.origin] if found.origin else [])
    if not locations or locations[0] in ("built-in", "frozen"):
        return parsed.text, None
    location = Path(locations[0]).resolve()
    root = location.parent
    system = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    system |= {
        Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")
    }
    if root in system:
        return parsed.text, None
    return parsed.text, str(root)


# ------------------------------------------------------------------------------------------------
# Cell sources
# ------------------------------------------------------------------------------------------------

SETUP = '''\
import io
import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

for _path in EXTRA_SYS_PATH:
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gradflow_agent.initcheck import AnalysisConfig, AnalysisRunner  # noqa: E402

try:
    get_ipython  # noqa: B018 - defined inside IPython/Jupyter only
    IN_NOTEBOOK = True
except NameError:
    IN_NOTEBOOK = False
FIGURE_DIR = None if IN_NOTEBOOK else Path(__file__).resolve().with_name(Path(__file__).stem + "_figures")


def show(fig, name):
    """Inline PNG in a notebook (any matplotlib backend); a PNG file next to the script otherwise."""
    if IN_NOTEBOOK:
        from IPython.display import Image, display

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        display(Image(data=buf.getvalue(), format="png"))
    else:
        FIGURE_DIR.mkdir(exist_ok=True)
        fig.savefig(FIGURE_DIR / f"{name}.png", dpi=80, bbox_inches="tight")
        print(f"figure saved to {FIGURE_DIR / (name + '.png')}")
    plt.close(fig)


def show_results(results):
    """One line per check: status, name, message."""
    for r in results:
        status = "skipped" if r.skipped else "ok" if r.passed else r.severity.upper()
        print(f"{status:8} {r.name}: {r.message}")


def plotted(results):
    """Results that carry a value to plot (not skipped, not failed to run)."""
    return [r for r in results if not r.skipped and isinstance(r.value, dict)]


def finite(values):
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else np.nan for v in values]
'''

BUILD = """\
config = AnalysisConfig(
    input_shapes=INPUT_SHAPES,
    device=DEVICE,
    dtype=DTYPE,
    n_samples=N_SAMPLES,
    loss_fns=LOSS_FNS,
    seed=SEED,
    progress=False,
)
runner = AnalysisRunner(SPEC, config, module_kwargs=MODULE_KWARGS)
module = runner.module
print(module)
n_params = sum(p.numel() for p in module.parameters())
print(f"device {runner.device}, dtype {DTYPE}, {n_params} parameters, inputs {INPUT_SHAPES}")
results = {}
"""

RUN = """\
results["{aid}"] = runner.run_one("{aid}")
show_results(results["{aid}"])
"""

PLOTS: dict[str, str] = {
    "parameter_norms": """\
rows = plotted(results["parameter_norms"])
if rows:
    names = [r.name.split(".", 1)[1] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 3.5))
    for i, key in enumerate(["frobenius", "operator", "sup", "std"]):
        ax.bar(x + 0.2 * i, finite([r.value[key] for r in rows]), width=0.2, label=key)
    ax.set_xticks(x + 0.3, names, rotation=30, ha="right")
    ax.set_ylabel("norm")
    ax.set_title("Parameter norms")
    ax.legend()
    show(fig, "parameter_norms")
""",
    "operator_norm": """\
rows = plotted(results["operator_norm"])
if rows:
    lo, hi = config.ranges.operator_norm
    names = [r.name.split(".", 1)[1] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.axhspan(lo, hi, color="tab:green", alpha=0.15, label=f"healthy {lo}-{hi}")
    ax.bar(x - 0.2, finite([r.value["max"] for r in rows]), width=0.4, label="max")
    ax.bar(x + 0.2, finite([r.value["mean"] for r in rows]), width=0.4, label="mean")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("||f(x)|| / ||x||")
    ax.set_title("Operator norm by input distribution")
    ax.legend()
    show(fig, "operator_norm")
""",
    "gradient": """\
rows = [r for r in plotted(results["gradient"]) if r.name.startswith("gradient.norms")]
if rows:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows[0].value["per_parameter"])
    x = np.arange(len(names))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        per = r.value["per_parameter"]
        loss_name = r.name.split("[")[1].rstrip("]")
        ax.bar(x + i * width, finite([per[n] for n in names]), width=width, label=loss_name)
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("||grad||")
    ax.set_title("Parameter gradient norms per loss function")
    ax.legend()
    show(fig, "gradient_norms")
""",
    "spectral": """\
rows = plotted(results["spectral"])
if rows:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in rows:
        s = np.asarray(r.value["singular_values"])
        label = f"{r.name.split('.', 1)[1]} (cond {r.value['condition_number']:.3g})"
        ax.semilogy(np.arange(1, len(s) + 1), s, marker=".", label=label)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title("Singular value spectra")
    ax.legend(fontsize="small")
    show(fig, "spectral")
""",
    "rank": """\
rows = plotted(results["rank"])
if rows:
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 3.5))
    ax.bar([r.name.split(".", 1)[1] for r in rows], [r.value["rank_ratio"] for r in rows])
    ax.axhline(config.ranges.rank_ratio_min, color="tab:green", linestyle="--", label="healthy > 90%")
    ax.axhline(config.ranges.rank_ratio_low, color="tab:red", linestyle=":", label="low rank < 50%")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("effective rank / max rank")
    ax.set_title("Rank ratio")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    show(fig, "rank")
""",
    "lipschitz": """\
rows = plotted(results["lipschitz"])
if rows:
    v = rows[0].value
    labels = ["empirical", "power_iteration"] + (["weight_bound"] if v["weight_bound"] is not None else [])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colors = ["tab:blue", "tab:orange", "tab:gray"][: len(labels)]
    ax.bar(labels, finite([v[k] for k in labels]), color=colors)
    ax.axhline(1.0, color="tab:green", linestyle="--", label="~1 healthy")
    ax.axhline(config.ranges.lipschitz_max, color="tab:red", linestyle=":", label="limit")
    ax.set_yscale("log")
    ax.set_title("Lipschitz estimates" + ("" if v["is_upper_bound"] else " (weight bound heuristic)"))
    ax.legend()
    show(fig, "lipschitz")
""",
    "activation_stats": """\
rows = plotted(results["activation_stats"])
if rows:
    names = [r.name.split(".", 1)[1] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.5 * len(rows)), 3.5))
    means = finite([r.value["mean"] for r in rows])
    stds = finite([r.value["std"] for r in rows])
    ax1.errorbar(x, means, yerr=stds, fmt="o", capsize=4, label="mean +/- std")
    ax1.plot(x, finite([r.value["max"] for r in rows]), "v", label="max")
    ax1.set_xticks(x, names, rotation=30, ha="right")
    ax1.set_title("Activations")
    ax1.legend()
    ax2.bar(x, [r.value["zero_fraction"] for r in rows])
    ax2.axhline(config.ranges.dead_fraction_max, color="tab:orange", linestyle="--", label="50%")
    ax2.axhline(config.ranges.dead_fraction_error, color="tab:red", linestyle=":", label="90% dead")
    ax2.set_xticks(x, names, rotation=30, ha="right")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("Zero fraction")
    ax2.legend()
    show(fig, "activation_stats")
""",
    "gradient_ratios": """\
rows = plotted(results["gradient_ratios"])
if rows:
    lo, hi = config.ranges.gradient_ratio
    pairs = rows[0].value["pairs"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(pairs)), 3.5))
    ax.axhspan(lo, hi, color="tab:green", alpha=0.15, label=f"healthy {lo}-{hi}")
    ax.bar([f"{p['layer']}/{p['next_layer']}" for p in pairs], finite([p["ratio"] for p in pairs]))
    ax.set_yscale("log")
    ax.set_ylabel("||grad layer|| / ||grad next layer||")
    ax.set_title("Gradient ratios between consecutive layers")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    show(fig, "gradient_ratios")
""",
    "weight_distribution": """\
params = [
    (n, p.detach().float().cpu().numpy().ravel()) for n, p in module.named_parameters() if p.numel() >= 2
]
params = [(n, w) for n, w in params if np.isfinite(w).all() and w.std() > 0][:6]
if params:
    fig, axes = plt.subplots(1, len(params), figsize=(3.2 * len(params), 3), squeeze=False)
    for ax, (n, w) in zip(axes[0], params):
        ax.hist(w, bins=40, density=True, alpha=0.7)
        grid = np.linspace(w.min(), w.max(), 200)
        pdf = np.exp(-0.5 * ((grid - w.mean()) / w.std()) ** 2) / (w.std() * np.sqrt(2 * np.pi))
        ax.plot(grid, pdf, label="normal fit")
        ax.set_title(n, fontsize="small")
    axes[0][0].legend(fontsize="small")
    show(fig, "weight_distribution")
""",
}

SUMMARY = """\
all_results = [r for rs in results.values() for r in rs]
runner.print_summary(all_results)
# runner.save_json(all_results, "init_check.json")
# runner.save_markdown(all_results, "init_check.md")
"""


def _parameters_source(p: NotebookParams) -> str:
    shapes = {k: tuple(v) for k, v in p.input_shapes.items()}
    return (
        "# Parameters: edit and re-run all cells.\n"
        f"SPEC = {p.spec!r}\n"
        f"MODULE_KWARGS = {dict(p.module_kwargs)!r}\n"
        f"INPUT_SHAPES = {shapes!r}\n"
        f"DEVICE = {p.device!r}  # cuda falls back to CPU with a notice when CUDA is absent\n"
        f"DTYPE = {p.dtype!r}  # float32, float16 or bfloat16\n"
        f"N_SAMPLES = {int(p.n_samples)!r}\n"
        f"LOSS_FNS = {list(p.loss_fns)!r}  # sum, mse_random, reconstruction, variance\n"
        f"SEED = {int(p.seed)!r}\n"
        f"EXTRA_SYS_PATH = {list(p.extra_sys_path)!r}  # import roots of the module, if not installed\n"
    )


def cells(p: NotebookParams) -> list[tuple[str, str]]:
    """(kind, source) pairs shared by the notebook and the script; kind is 'markdown' or 'code'."""
    shapes = " ".join(f"`{k}`: {tuple(v)}" for k, v in p.input_shapes.items())
    intro = (
        f"# Initialization check: `{p.spec}`\n\n"
        f"Inputs {shapes}, device `{p.device}`, dtype `{p.dtype}`, {p.n_samples} samples.\n\n"
        "Each section below runs one analysis, prints its judged results (ok / WARNING / ERROR / skipped) "
        "and plots its values. Edit the parameters cell and re-run all cells to analyse another "
        "configuration. Generated by `gradflow-agent init-check generate-notebook`."
    )
    out: list[tuple[str, str]] = [("markdown", intro), ("code", _parameters_source(p)), ("code", SETUP)]
    out.append(
        ("markdown", "## Build the module\n\nConstructed with a fixed seed, moved to the device and dtype.")
    )
    out.append(("code", BUILD))
    for i, aid in enumerate(a for a in ANALYSES if a in p.analyses):
        info = ANALYSES[aid]
        out.append(
            ("markdown", f"## {i + 1}. {info.title}\n\n{info.description}\n\nHealthy: {info.healthy}.")
        )
        out.append(("code", RUN.format(aid=aid)))
        if aid in PLOTS:
            out.append(("code", PLOTS[aid]))
    out.append(("markdown", "## Summary"))
    out.append(("code", SUMMARY))
    return out


def build_notebook(p: NotebookParams, kernel: str = "python3") -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["gradflow_init_check"] = {"spec": p.spec, "analyses": list(p.analyses)}
    for kind, source in cells(p):
        nb.cells.append(
            new_markdown_cell(source) if kind == "markdown" else new_code_cell(source.rstrip("\n"))
        )
    nbformat.validate(nb)
    return nb


def build_script(p: NotebookParams) -> str:
    """The same cells as a `# %%` (percent-format) script: runnable with python, or cell by cell in an IDE."""
    parts = [f'"""Initialization check of {p.spec}: run with `python THIS_FILE`; figures go next to it."""\n']
    for kind, source in cells(p):
        if kind == "markdown":
            body = "\n".join(f"# {line}".rstrip() for line in source.splitlines())
            parts.append(f"# %% [markdown]\n{body}\n")
        else:
            parts.append(f"# %%\n{source.rstrip()}\n")
    return "\n\n".join(parts)


def output_format(path: str | None, fmt: str | None) -> str:
    """Resolve --output-format against the suffix of -o; a contradiction is an error."""
    suffix = Path(path).suffix.lower().lstrip(".") if path else ""
    if fmt is not None and fmt not in FORMATS:
        raise OutputError(f"unknown output format {fmt!r}: choose from {', '.join(FORMATS)}")
    if path and suffix not in FORMATS:
        raise OutputError(f"output {path!r} must end with .ipynb or .py")
    if fmt and suffix and fmt != suffix:
        raise OutputError(f"output {path!r} does not match --output-format {fmt}")
    return fmt or suffix or "ipynb"


def write(p: NotebookParams, path: str | Path, fmt: str, kernel: str = "python3") -> Path:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "ipynb":
            nbformat.write(build_notebook(p, kernel), str(target))
        else:
            target.write_text(build_script(p), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return target


def _child_env() -> dict[str, str]:
    """Environment for the kernel/script: this package importable even from a source checkout."""
    env = dict(os.environ)
    import gradflow_agent

    root = str(Path(next(iter(gradflow_agent.__path__))).resolve().parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


def execute_notebook(path: str | Path, kernel: str = "python3", timeout: int = 600) -> Path:
    """Run every cell with nbclient in the notebook's directory and save the outputs into the file."""
    require("nbclient", "initcheck", "gradflow_agent.initcheck")  # and jupyter_client, which nbclient depends on
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    target = Path(path)
    nb = nbformat.read(str(target), as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(target.parent.resolve())}},
    )
    try:
        client.execute(env=_child_env())
    except NoSuchKernel:
        raise InitCheckError(
            f"no Jupyter kernel named {kernel!r}: install one with `python -m ipykernel install --sys-prefix`"
        ) from None
    except CellExecutionError as exc:
        nbformat.write(nb, str(target))
        raise NotebookExecutionError(f"{target}: {_cell_error(nb)}") from exc
    except (CellTimeoutError, DeadKernelError) as exc:
        nbformat.write(nb, str(target))
        raise NotebookExecutionError(
            f"{target}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        ) from exc
    nbformat.write(nb, str(target))
    return target


def _cell_error(nb: nbformat.NotebookNode) -> str:
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {i} raised {out.get('ename')}: {out.get('evalue')}"
    return "a cell raised an error"


def execute_script(path: str | Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run the generated script with this interpreter in its own directory (figures land beside it)."""
    target = Path(path).resolve()
    try:
        proc = subprocess.run(
            [sys.executable, str(target)],
            cwd=target.parent,
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise NotebookExecutionError(f"{target}: timed out after {timeout} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise NotebookExecutionError(f"{target}: exit code {proc.returncode}: {tail}")
    return proc
