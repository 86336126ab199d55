"""The programmatic API: run_analysis, AnalysisRunner, switches, skipping, failures, reports."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
from torch import nn

from gradflow_agent.initcheck import ANALYSES, AnalysisConfig, AnalysisResult, AnalysisRunner, run_analysis
from gradflow_agent.initcheck.errors import InitCheckError, ShapeError

RESULT_KEYS = {"analysis", "name", "value", "passed", "message", "severity", "skipped"}


def _no_nan_constants(token: str):
    raise AssertionError(f"JSON contains the non-standard constant {token}")


def test_run_analysis_seed_example():
    results = run_analysis(
        "torch.nn@Linear",
        input_shapes={"x": (2, 16)},
        device="cpu",
        module_kwargs={"in_features": 16, "out_features": 32},
        n_samples=4,
        quiet=True,
    )
    assert all(isinstance(r, AnalysisResult) for r in results)
    assert {r.analysis for r in results} == set(ANALYSES)
    assert all(r.severity in ("info", "warning", "error") for r in results)
    named = {r.name: r for r in results}
    assert named["rank.weight"].value["effective_rank"] == 16
    assert named["gradient_ratios"].skipped  # a single layer has no consecutive pair


def test_runner_seed_example_with_switches_and_files(tmp_path):
    config = AnalysisConfig(
        input_shapes={"x": (2, 16)},
        device="cpu",
        dtype="float32",
        n_samples=5,
        run_spectral_analysis=True,
        run_lipschitz=False,
        quiet=True,
    )
    runner = AnalysisRunner("torch.nn@Linear", config, module_kwargs={"in_features": 16, "out_features": 32})
    results = runner.run_all()
    assert "lipschitz" not in {r.analysis for r in results}
    assert "spectral" in {r.analysis for r in results}

    out = io.StringIO()
    runner.print_summary(results, file=out)
    text = out.getvalue()
    assert "spectral.weight" in text and "gradient.existence[reconstruction]" in text and "status" in text

    json_path = runner.save_json(results, tmp_path / "results.json")
    doc = json.loads(json_path.read_text(), parse_constant=_no_nan_constants)
    assert doc["schema_version"] == 1 and doc["tool"] == "gradflow-agent init-check"
    assert doc["module"] == {
        "spec": "torch.nn@Linear",
        "class": "torch.nn.modules.linear.Linear",
        "kwargs": {"in_features": 16, "out_features": 32},
        "n_parameters": 16 * 32 + 32,
        "n_trainable": 16 * 32 + 32,
    }
    assert doc["input_shapes"] == {"x": [2, 16]} and doc["device"] == "cpu" and doc["dtype"] == "float32"
    assert "lipschitz" not in doc["enabled_analyses"]
    assert len(doc["results"]) == len(results)
    assert all(set(r) == RESULT_KEYS for r in doc["results"])
    assert doc["summary"]["total"] == len(results)
    assert doc["summary"]["passed"] + doc["summary"]["failed"] + doc["summary"]["skipped"] == len(results)

    md = runner.save_markdown(results, tmp_path / "results.md").read_text()
    assert md.startswith("# Initialization check: `torch.nn@Linear`")
    assert "## spectral" in md and "| `rank.weight` | ok |" in md

    with pytest.raises(InitCheckError, match=r"must end with \.json"):
        runner.save_json(results, tmp_path / "results.txt")


def test_identity_module_skips_what_does_not_apply(quick):
    runner = AnalysisRunner(nn.Identity(), quick((3, 8)))
    results = runner.run_all()
    named = {r.name: r for r in results}
    for name in ("parameter_norms", "spectral", "rank", "gradient_ratios", "weight_distribution"):
        assert named[name].skipped and named[name].passed and named[name].message.startswith("skipped:")
    assert "no 2-D weight" in named["spectral"].message
    assert named["gradient.parameters[reconstruction]"].skipped
    # the identity has unit gain everywhere and Lipschitz constant exactly 1
    assert named["operator_norm.sparse"].value["max"] == pytest.approx(1.0)
    assert named["lipschitz"].value["empirical"] == pytest.approx(1.0, rel=1e-4)
    assert named["lipschitz"].value["power_iteration"] == pytest.approx(1.0, rel=1e-6)
    assert named["lipschitz"].value["weight_bound"] is None
    assert runner.report(results)["analyses"]["spectral"]["status"] == "skipped"


def test_layernorm_without_affine_has_no_gradient_parameters(quick):
    runner = AnalysisRunner(
        "torch.nn@LayerNorm", quick((2, 16)), {"normalized_shape": 16, "elementwise_affine": False}
    )
    named = {r.name: r for r in runner.run_all()}
    assert named["gradient.parameters[reconstruction]"].skipped
    assert named["gradient.input[reconstruction]"].value["per_input"]["x"] is not None


def test_detached_output_has_no_gradient(quick):
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).detach()

    named = {r.name: r for r in AnalysisRunner(Frozen(), quick((2, 4))).run_all()}
    assert named["gradient[reconstruction]"].skipped
    assert "no gradient" in named["gradient[reconstruction]"].message
    assert named["numerical_precision.gradients"].skipped
    assert named["gradient_ratios"].skipped


def test_a_crashing_analysis_does_not_stop_the_run(quick, monkeypatch):
    def boom(ctx):
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setitem(ANALYSES, "spectral", dataclasses.replace(ANALYSES["spectral"], run=boom))
    runner = AnalysisRunner(nn.Linear(8, 8), quick((2, 8)))
    results = runner.run_all()
    failed = [r for r in results if r.analysis == "spectral"]
    assert len(failed) == 1 and failed[0].severity == "error"
    assert failed[0].message == "analysis failed: RuntimeError: simulated failure"
    assert {"rank", "weight_distribution"} <= {r.analysis for r in results}
    assert runner.report(results)["analyses"]["spectral"]["status"] == "failed"


def test_multi_input_module_is_called_by_keyword(quick):
    runner = AnalysisRunner(
        "torch.nn@MultiheadAttention",
        quick({"query": (2, 4, 16), "key": (2, 4, 16), "value": (2, 4, 16)}, run_lipschitz=False),
        {"embed_dim": 16, "num_heads": 2},
    )
    assert runner.ctx.call_style == "keyword"
    named = {r.name: r for r in runner.run_all()}
    assert set(named["gradient.input[reconstruction]"].value["per_input"]) == {"query", "key", "value"}
    assert named["rank.in_proj_weight"].value["max_rank"] == 16


def test_the_callers_module_is_left_alone(quick):
    layer = nn.Linear(8, 8)
    before = layer.weight.detach().clone()
    AnalysisRunner(layer, quick((2, 8), dtype="bfloat16")).run_all()
    assert layer.weight.dtype == torch.float32 and layer.weight.grad is None
    assert torch.equal(layer.weight, before)


def test_wrong_shape_is_a_shape_error(quick):
    with pytest.raises(ShapeError, match=r"failed on inputs x:2,15 .*mat1 and mat2"):
        AnalysisRunner("torch.nn@Linear", quick((2, 15)), {"in_features": 16, "out_features": 4})


def test_kwargs_with_an_instance_are_refused(quick):
    with pytest.raises(InitCheckError, match="module_kwargs"):
        AnalysisRunner(nn.Linear(2, 2), quick((1, 2)), {"bias": False})


def test_progress_bar_on_stderr_and_quiet(quick):
    err = io.StringIO()
    config = quick((2, 8), quiet=False, progress=True, run_lipschitz=False, run_operator_norm=False)
    AnalysisRunner(nn.Linear(8, 8), config, stderr=err).run_all()
    assert "init-check" in err.getvalue() and "analysis" in err.getvalue()
    err = io.StringIO()
    AnalysisRunner(nn.Linear(8, 8), quick((2, 8), quiet=True, progress=True), stderr=err).run_all()
    assert err.getvalue() == ""
    err = io.StringIO()  # not a terminal and progress left to auto: no bar
    AnalysisRunner(nn.Linear(8, 8), quick((2, 8), quiet=False, run_lipschitz=False), stderr=err).run_all()
    assert "init-check" not in err.getvalue()


def test_bfloat16_and_float16_runs_complete(quick):
    for dtype in ("bfloat16", "float16"):
        runner = AnalysisRunner(
            nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), quick((4, 8), dtype=dtype)
        )
        results = runner.run_all()
        assert not [r for r in results if r.message.startswith("analysis failed")], dtype
        # rounding in the low-precision dtype must not push an estimate "above" the true bound
        assert {r.name: r for r in results}["lipschitz"].severity != "error"
        assert runner.module[0].weight.dtype == getattr(torch, dtype)
        eps = torch.finfo(getattr(torch, dtype)).eps
        weight = runner.module[0].weight.detach().double()
        rank = {r.name: r for r in results}["rank.0.weight"]
        # the tolerance follows the storage precision: sigma_max * max(m, n) * eps(dtype)
        expected = float(torch.linalg.svdvals(weight)[0]) * 16 * eps
        assert rank.value["tolerance"] == pytest.approx(expected, rel=1e-9)
        assert rank.value["effective_rank"] == 8
