"""`gradflow-agent init-check`: the seeds' CLI examples as written (plus --device cpu), options, errors."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from gradflow_agent.initcheck import ANALYSES
from gradflow_agent.initcheck.cli import main

LINEAR = ["torch.nn@Linear", "--input-shape", "2,16", "--module-kwargs", "in_features=16", "out_features=32"]
MHA = [
    "torch.nn@MultiheadAttention",
    "--input-shapes",
    "query:2,8,32",
    "key:2,8,32",
    "value:2,8,32",
    "--module-kwargs",
    "embed_dim=32",
    "num_heads=4",
]
LAYERNORM = ["torch.nn@LayerNorm", "--input-shape", "2,16", "--module-kwargs", "normalized_shape=16"]


def load(path):
    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def results_by_name(doc):
    return {r["name"]: r for r in doc["results"]}


def check_common(doc, spec, kwargs, shapes):
    assert doc["schema_version"] == 1
    assert doc["module"]["spec"] == spec and doc["module"]["kwargs"] == kwargs
    assert doc["input_shapes"] == shapes
    assert doc["device"] == "cpu" and doc["dtype"] == "float32" and doc["n_samples"] == 50
    assert doc["loss_fns"] == ["reconstruction"]
    assert set(doc["analyses"]) == set(ANALYSES)  # every analysis ran (or said why it was skipped)
    for r in doc["results"]:
        assert set(r) == {"analysis", "name", "value", "passed", "message", "severity", "skipped"}
        assert r["severity"] in ("info", "warning", "error") and isinstance(r["passed"], bool)
    assert not [r for r in doc["results"] if r["message"].startswith("analysis failed")]
    assert doc["summary"]["error"] == 0


def test_seed_example_linear(tmp_path, capsys):
    out = tmp_path / "linear.json"
    assert main(["analyze", *LINEAR, "--device", "cpu", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "spectral.weight" in stdout and "status" in stdout  # the console table, as written
    doc = load(out)
    check_common(doc, "torch.nn@Linear", {"in_features": 16, "out_features": 32}, {"x": [2, 16]})
    named = results_by_name(doc)
    smax = named["spectral.weight"]["value"]["spectral_radius"]
    assert named["parameter_norms.weight"]["value"]["operator"] == pytest.approx(smax, rel=1e-12)
    assert named["lipschitz"]["value"]["power_iteration"] == pytest.approx(smax, rel=1e-3)
    rank = named["rank.weight"]["value"]  # (pytest 9.2's approx refuses nested dicts: compare the numbers)
    assert (rank["effective_rank"], rank["max_rank"], rank["rank_ratio"]) == pytest.approx((16, 16, 1.0))
    assert named["gradient.existence[reconstruction]"]["passed"]
    assert named["operator_norm.normal"]["passed"]  # default init: gain ~0.8 on Gaussian inputs
    assert named["gradient_ratios"]["skipped"]


def test_seed_example_multihead_attention(tmp_path):
    out = tmp_path / "mha.json"
    assert main(["analyze", *MHA, "--device", "cpu", "-o", str(out), "-q"]) == 0
    doc = load(out)
    check_common(
        doc,
        "torch.nn@MultiheadAttention",
        {"embed_dim": 32, "num_heads": 4},
        {"query": [2, 8, 32], "key": [2, 8, 32], "value": [2, 8, 32]},
    )
    assert doc["call_style"] == "keyword"
    named = results_by_name(doc)
    assert set(named["gradient.input[reconstruction]"]["value"]["per_input"]) == {"query", "key", "value"}
    assert named["spectral.in_proj_weight"]["value"]["matrix_shape"] == [96, 32]
    assert named["rank.out_proj.weight"]["value"]["max_rank"] == 32
    assert named["gradient.existence[reconstruction]"]["value"]["with_gradient"] == 4
    assert named["lipschitz"]["value"]["is_upper_bound"] is False


def test_seed_example_layernorm(tmp_path):
    out = tmp_path / "ln.json"
    assert main(["analyze", *LAYERNORM, "--device", "cpu", "-o", str(out), "-q"]) == 0
    doc = load(out)
    check_common(doc, "torch.nn@LayerNorm", {"normalized_shape": 16}, {"x": [2, 16]})
    named = results_by_name(doc)
    assert named["spectral"]["skipped"] and named["rank"]["skipped"]  # only 1-D parameters
    weight = named["parameter_norms.weight"]["value"]
    assert weight["frobenius"] == pytest.approx(4.0) and weight["std"] == 0.0 and weight["mean"] == 1.0
    root = named["activation_stats.<root>"]["value"]
    assert root["mean"] == pytest.approx(0.0, abs=1e-6) and root["std"] == pytest.approx(1.0, abs=1e-3)
    # LayerNorm is scale-invariant: tiny inputs are amplified, huge inputs shrunk
    assert not named["operator_norm.small_magnitude"]["passed"]
    assert not named["operator_norm.large_magnitude"]["passed"]


def test_seed_table_example_two_inputs_several_losses(tmp_path, monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)  # examples.initcheck_custom_module is importable from the repository root
    out = tmp_path / "mixer.json"
    argv = [
        "analyze",
        "examples.initcheck_custom_module@SymbolMixer",
        "--input-shapes",
        "x:2,16,64",
        "symbols:2,16,64",
        "--module-kwargs",
        "dim=64",
        "n_symbols=100",
        "--loss-fn",
        "sum",
        "variance",
        "--n-samples",
        "3",
        "--device",
        "cpu",
        "-o",
        str(out),
        "-q",
    ]
    assert main(argv) == 0
    doc = load(out)
    assert doc["call_style"] == "keyword" and doc["loss_fns"] == ["sum", "variance"]
    named = results_by_name(doc)
    for loss in ("sum", "variance"):
        assert set(named[f"gradient.input[{loss}]"]["value"]["per_input"]) == {"x", "symbols"}
    assert named["rank.codebook"]["value"]["max_rank"] == 64


def test_markdown_and_stdout_json(tmp_path, capsys):
    md = tmp_path / "report.md"
    assert main(["analyze", *LINEAR, "--device", "cpu", "--n-samples", "3", "-o", str(md), "-q"]) == 0
    text = md.read_text()
    assert "# Initialization check: `torch.nn@Linear`" in text and "## lipschitz" in text
    capsys.readouterr()
    argv = [
        "analyze",
        *LINEAR,
        "--device",
        "cpu",
        "--n-samples",
        "3",
        "-o",
        "-",
        "-q",
        "--only",
        "spectral",
        "rank",
    ]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["enabled_analyses"] == ["spectral", "rank"]
    assert {r["analysis"] for r in doc["results"]} == {"spectral", "rank"}


def test_skip_and_dtype_options(tmp_path):
    out = tmp_path / "o.json"
    argv = ["analyze", *LINEAR, "--device", "cpu", "--n-samples", "3", "--dtype", "bfloat16", "--seed", "3"]
    assert main([*argv, "--skip", "lipschitz", "operator_norm", "-o", str(out), "-q"]) == 0
    doc = load(out)
    assert doc["dtype"] == "bfloat16" and doc["seed"] == 3
    assert {"lipschitz", "operator_norm"}.isdisjoint({r["analysis"] for r in doc["results"]})


def test_fail_on(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    base = [
        "analyze",
        "examples.initcheck_custom_module@LowRankLinear",
        "--input-shape",
        "4,16",
        "--device",
        "cpu",
        "--n-samples",
        "3",
        "--only",
        "rank",
        "-q",
    ]
    assert main([*base, "--fail-on", "warning"]) == 1  # rank 2 of 16 is low rank: a warning
    assert main([*base, "--fail-on", "error"]) == 0
    assert main(base) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback needs a machine without CUDA")
def test_default_device_falls_back_to_cpu_with_a_notice(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["analyze", *LINEAR, "--n-samples", "2", "--only", "spectral", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "notice: CUDA is not available; running on CPU" in err
    doc = load(out)
    assert doc["device"] == "cpu" and doc["requested_device"] == "cuda" and "CUDA" in doc["device_notice"]


def test_list_analyses(capsys):
    assert main(["list-analyses"]) == 0
    text = capsys.readouterr().out
    for aid, info in ANALYSES.items():
        assert aid in text and info.switch in text
    assert main(["list-analyses", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == list(ANALYSES)


ERRORS = [
    (
        ["analyze", "torch.nn@Linearr", "--input-shape", "2,16"],
        "no attribute 'Linearr' (did you mean 'Linear'?)",
    ),
    (["analyze", "no_such_pkg.mod@Block", "--input-shape", "2,16"], "cannot import module 'no_such_pkg.mod'"),
    (["analyze", "torch.nn@Linear", "--input-shape", "2,x", *LINEAR[3:]], "bad shape '2,x'"),
    (["analyze", *LINEAR, "foo=1"], "got an unexpected keyword argument 'foo'"),
    (["analyze", "torch.nn@Linear", "--input-shape", "2,15", *LINEAR[3:]], "mat1 and mat2 shapes cannot"),
    (["analyze", *LINEAR, "-o", "out.txt"], "must end with .json or .md"),
    (["analyze", "torch.nn@Linear", *LINEAR[3:]], "an input shape is required"),
    (["analyze", *LINEAR, "--device", "tpu"], "unknown device 'tpu'"),
    (["analyze", *LINEAR, "--dtype", "float64"], "invalid choice: 'float64'"),
    (["analyze", *MHA[:5], "--module-kwargs", "embed_dim=32", "num_heads=5"], "embed_dim must be divisible"),
    (["generate-notebook", *LINEAR, "-o", "nb.txt"], "must end with .ipynb or .py"),
    (["generate-notebook", *LINEAR, "-o", "nb.ipynb", "--output-format", "py"], "does not match"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "expected"), ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_errors_are_one_line_exit_2(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] != "frobnicate" and "--device" not in argv:
        argv = [*argv, "--device", "cpu"]  # no CUDA notice line before the error
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("gradflow-agent init-check") and expected in lines[0]
    assert "Traceback" not in captured.err
    assert not list(tmp_path.iterdir())  # nothing written on error


def test_dtype_the_device_cannot_run(capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    argv = [
        "analyze",
        "examples.initcheck_custom_module@FourierMixer",
        "--input-shape",
        "2,8,32",
        "--dtype",
        "float16",
        "--device",
        "cpu",
    ]
    if torch.cuda.is_available():
        pytest.skip("float16 FFT exists on CUDA")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gradflow-agent init-check: error: examples.initcheck_custom_module@FourierMixer "
        "cannot run in float16 on cpu: Unsupported dtype Half"
    ]
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("gradflow-agent init-check: error:")


def test_module_runs_as_a_subprocess(tmp_path, repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sub.json"
    cmd = [
        sys.executable,
        "-m",
        "gradflow_agent.initcheck.cli",
        "analyze",
        *LINEAR,
        "--device",
        "cpu",
        "--n-samples",
        "5",
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rank.weight" in proc.stdout and f"wrote {out}" in proc.stderr
    assert load(out)["module"]["spec"] == "torch.nn@Linear"


def test_package_main_module(monkeypatch, capsys):
    """`python -m gradflow_agent.initcheck` is the same CLI (run in-process here: no second torch import)."""
    argv = ["gradflow_agent.initcheck", "analyze", "torch.nn@Nope", "--input-shape", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("gradflow_agent.initcheck", run_name="__main__")
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "module 'torch.nn' has no attribute 'Nope'" in lines[0]
