"""Notebook and script generation; one notebook is executed with nbclient, one script with python."""

from __future__ import annotations

import ast

import nbformat
import pytest

from gradflow_agent.initcheck import ANALYSES
from gradflow_agent.initcheck.cli import main
from gradflow_agent.initcheck.errors import OutputError
from gradflow_agent.initcheck.notebook import NotebookParams, build_script, cells, import_root, output_format

LINEAR = ["torch.nn@Linear", "--input-shape", "2,16", "--module-kwargs", "in_features=16", "out_features=32"]
LAYERNORM = ["torch.nn@LayerNorm", "--input-shape", "2,16", "--module-kwargs", "normalized_shape=16"]


@pytest.fixture
def kernel_env(monkeypatch):
    """What the kernel and script inherit: a headless matplotlib and one thread on a shared machine."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def code_sources(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_seed_example_generate_notebook_layernorm(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate-notebook", *LAYERNORM, "-o", "analysis.ipynb", "--device", "cpu"]) == 0
    assert "wrote analysis.ipynb" in capsys.readouterr().err
    nb = nbformat.read(tmp_path / "analysis.ipynb", as_version=4)
    nbformat.validate(nb)
    sources = code_sources(nb)
    params = sources[0]
    namespace: dict = {}
    exec(params, namespace)  # the parameters cell is plain, editable Python
    assert namespace["SPEC"] == "torch.nn@LayerNorm"
    assert namespace["MODULE_KWARGS"] == {"normalized_shape": 16}
    assert namespace["INPUT_SHAPES"] == {"x": (2, 16)} and namespace["DEVICE"] == "cpu"
    assert namespace["N_SAMPLES"] == 50 and namespace["LOSS_FNS"] == ["reconstruction"]
    for aid in ANALYSES:
        assert any(f'runner.run_one("{aid}")' in s for s in sources), aid
    assert sum('show(fig, "' in s for s in sources) == 9  # a plot for every analysis but numerical precision
    for source in sources:
        ast.parse(source)
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_seed_example_generate_and_run_notebook(tmp_path, monkeypatch, capsys, kernel_env):
    monkeypatch.chdir(tmp_path)  # no -o in the seed example: the default name lands in the working directory
    assert main(["generate-notebook", *LINEAR, "--run", "--device", "cpu"]) == 0
    assert "executed init_check_linear.ipynb (outputs saved)" in capsys.readouterr().err
    nb = nbformat.read(tmp_path / "init_check_linear.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 7  # gradient_ratios (one layer) has nothing to plot; precision has no plot
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "ok       spectral.weight" in text
    assert "skipped  gradient_ratios: skipped: needs at least two layers" in text
    assert "status" in text  # the rich summary of the last cell
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def test_seed_example_generate_python_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["generate-notebook", *LINEAR, "--output-format", "py", "-o", "analysis.py", "--device", "cpu"]
    assert main(argv) == 0
    source = (tmp_path / "analysis.py").read_text()
    ast.parse(source)
    n_code = len([c for c in cells(NotebookParams("torch.nn@Linear")) if c[0] == "code"])
    assert source.count("# %%\n") == n_code
    assert "SPEC = 'torch.nn@Linear'" in source and "# %% [markdown]" in source


def test_generated_script_runs_and_saves_figures(tmp_path, monkeypatch, capsys, kernel_env):
    monkeypatch.chdir(tmp_path)
    only = ["--only", "parameter_norms", "spectral", "weight_distribution"]
    argv = ["generate-notebook", *LINEAR, "--output-format", "py", "-o", "small.py", "--run"]
    argv += ["--device", "cpu", "--n-samples", "2", *only]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ok       spectral.weight" in out and "figure saved to" in out
    figures = sorted(p.name for p in (tmp_path / "small_figures").iterdir())
    assert figures == ["parameter_norms.png", "spectral.png", "weight_distribution.png"]
    assert all((tmp_path / "small_figures" / f).read_bytes()[:4] == b"\x89PNG" for f in figures)


def test_a_failing_script_is_one_error_line(tmp_path):
    from gradflow_agent.initcheck.notebook import NotebookExecutionError, execute_script

    bad = tmp_path / "bad.py"
    bad.write_text("print('started')\nraise RuntimeError('boom in cell 3')\n")
    with pytest.raises(NotebookExecutionError, match=r"exit code 1: RuntimeError: boom in cell 3"):
        execute_script(bad, timeout=60)


def test_a_run_that_fails_exits_1(tmp_path, monkeypatch, capsys):
    from gradflow_agent.initcheck import notebook

    def fail(path, timeout):
        raise notebook.NotebookExecutionError(f"{path}: exit code 1: RuntimeError: boom")

    monkeypatch.setattr(notebook, "execute_script", fail)
    monkeypatch.chdir(tmp_path)
    argv = ["generate-notebook", *LINEAR, "-o", "x.py", "--device", "cpu", "--run"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "wrote x.py",
        "gradflow-agent init-check: error: execution failed: x.py: exit code 1: RuntimeError: boom",
    ]


def test_output_format_resolution():
    assert output_format(None, None) == "ipynb"
    assert output_format("a.py", None) == "py"
    assert output_format(None, "py") == "py"
    assert output_format("a.ipynb", "ipynb") == "ipynb"
    with pytest.raises(OutputError):
        output_format("a.ipynb", "py")
    with pytest.raises(OutputError):
        output_format("a.txt", None)


def test_import_root_for_files_and_checkouts(tmp_path, repo_root, monkeypatch):
    assert import_root("torch.nn@Linear") == ("torch.nn@Linear", None)
    spec, root = import_root(f"{tmp_path / 'x.py'}@Block")
    assert spec == f"{tmp_path / 'x.py'}@Block" and root is None
    monkeypatch.chdir(repo_root)
    spec, root = import_root("examples.initcheck_custom_module@ReluMLP")
    assert spec == "examples.initcheck_custom_module@ReluMLP" and root == str(repo_root)


def test_script_is_one_cell_per_code_cell():
    params = NotebookParams("torch.nn@Linear", analyses=["spectral"])
    script = build_script(params)
    assert 'runner.run_one("spectral")' in script and 'runner.run_one("rank")' not in script
