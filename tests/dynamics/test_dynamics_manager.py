"""ModelAnalysisManager: schedule, builder, presets, fail-safety, reset after architecture changes, config."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.dynamics import (
    AnalysisConfig,
    GradientMetrics,
    MetricComputer,
    ModelAnalysisManager,
    MomentumMetrics,
    ParameterChangeMetrics,
    ParameterMismatchError,
    SparseQualityMetrics,
)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _steps(model, opt, manager, n, inputs=True):
    """n training steps; returns {step: metrics} of the measurements."""
    g = torch.Generator().manual_seed(0)
    got = {}
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        F.cross_entropy(model(x), torch.arange(8) % 4).backward()
        opt.step()
        out = manager.on_optimizer_step(model, inputs=x if inputs else None, optimizer=opt)
        opt.zero_grad()
        if out:
            got[manager.step] = out
    return got


def test_measures_every_interval_steps_and_returns_nothing_in_between():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=3, sparse_quality_enabled=False))
    manager.capture_baseline(model)  # step 0: windows of exactly `interval` steps
    got = _steps(model, opt, manager, 10)
    assert sorted(got) == [3, 6, 9]
    assert all(m["param_change/window_steps"] == 3.0 for m in got.values())
    assert manager.snapshot.step == 9 and manager.measurements == 3


def test_without_a_baseline_the_first_call_captures_one():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager.create({"interval": 4, "sparse_quality_enabled": False})
    got = _steps(model, opt, manager, 8)
    assert sorted(got) == [4, 8]
    assert got[4]["param_change/window_steps"] == 3.0 and got[8]["param_change/window_steps"] == 4.0


def test_the_delta_is_the_change_since_the_snapshot():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=2, sparse_quality_enabled=False))
    manager.capture_baseline(model)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    got = _steps(model, opt, manager, 2)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert got[2]["param_change/norm_l2"] == pytest.approx((after - before).norm().item(), rel=1e-5)
    assert got[2]["param_change/norm_max"] == pytest.approx((after - before).abs().max().item(), rel=1e-5)


def test_only_one_snapshot_is_held():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=2, sparse_quality_enabled=False))
    first = weakref.ref(manager.capture_baseline(model))
    _steps(model, opt, manager, 2)
    gc.collect()
    assert first() is None and manager.snapshot.step == 2


def test_presets_and_the_factory_choose_the_computers():
    minimal = ModelAnalysisManager.minimal()
    assert minimal.config.interval == 500
    assert [type(m) for m in minimal.metrics] == [ParameterChangeMetrics]
    assert not minimal.metrics[0].per_layer and not minimal.metrics[0].track_components
    full = ModelAnalysisManager.comprehensive(interval=10)
    assert full.config.interval == 10
    assert [type(m) for m in full.metrics] == [ParameterChangeMetrics, SparseQualityMetrics, GradientMetrics,
                                               MomentumMetrics]
    assert full.metrics[0].per_layer and full.metrics[0].track_components and full.metrics[1].include_random
    assert AnalysisConfig.minimal(interval=7).interval == 7
    default = ModelAnalysisManager.create()
    assert [type(m) for m in default.metrics] == [ParameterChangeMetrics, SparseQualityMetrics]
    assert default.config.param_change_thresholds == (1e-8, 1e-6, 1e-4)


def test_builder_and_a_custom_metric_written_like_seed_002():
    class GradientNormMetric(MetricComputer):
        def compute(self, **kwargs):
            context = kwargs.get("context")
            if context is None or context.model is None:
                return {}
            total = sum(p.grad.norm(2).item() ** 2 for p in context.model.parameters() if p.grad is not None)
            return {"gradient/total_norm": total ** 0.5}

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager(AnalysisConfig(interval=2))
    assert manager.add_metric(GradientNormMetric()) is manager
    with pytest.raises(ValueError, match="already registered"):
        manager.add_metric(GradientNormMetric())
    manager.capture_baseline(model)
    g = torch.Generator().manual_seed(0)
    outs = []
    for _ in range(2):
        x = torch.randn(8, 6, generator=g)
        F.cross_entropy(model(x), torch.arange(8) % 4).backward()
        expected = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters()))
        opt.step()
        outs.append(manager.on_optimizer_step(model, inputs=x))
        opt.zero_grad()
    assert outs == [{}, {"gradient/total_norm": pytest.approx(expected)}]


def test_a_failing_metric_is_caught_counted_and_the_others_and_training_go_on(caplog):
    class Broken(MetricComputer):
        name = "broken"

        def compute(self, delta=None, snapshot=None, context=None, **kwargs):
            raise ZeroDivisionError("a bug in a plug-in")

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=2, sparse_quality_thresholds=(1e-6,)))
    manager.add_metric(Broken())
    manager.capture_baseline(model)
    with caplog.at_level("ERROR", logger="gradflow_agent"):
        got = _steps(model, opt, manager, 6)
    assert sorted(got) == [2, 4, 6]
    assert all("param_change/norm_l2" in m and "sparse/kl_at_1e-06" in m for m in got.values())
    assert manager.errors == {"broken": 3}
    assert sum("a bug in a plug-in" in r.getMessage() for r in caplog.records) == 1  # logged once
    seen = []
    manager.on_error = lambda name, exc: seen.append((name, type(exc).__name__))
    _steps(model, opt, manager, 2)
    assert seen == [("broken", "ZeroDivisionError")]


def test_a_metric_that_needs_inputs_is_skipped_without_them():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=2))
    manager.capture_baseline(model)
    got = _steps(model, opt, manager, 4, inputs=False)
    assert all(not any(k.startswith("sparse/") for k in m) and "param_change/norm_l2" in m for m in got.values())
    assert manager.skipped == {"sparse_quality": 2} and not manager.errors


def test_after_an_architecture_change_a_clear_error_then_reset_recovers():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=2, sparse_quality_enabled=False))
    manager.capture_baseline(model)
    _steps(model, opt, manager, 2)
    model.append(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 6)
    model(x).sum().backward()
    opt.step()
    manager.on_optimizer_step(model)  # step 3: not due, nothing checked
    with pytest.raises(ParameterMismatchError, match=r"added: 3\.bias, 3\.weight.*reset\(\)"):
        manager.on_optimizer_step(model)  # step 4
    manager.reset()
    assert manager.on_optimizer_step(model) == {}  # step 5 captures a new baseline
    out = manager.on_optimizer_step(model)  # step 6
    assert out["param_change/window_steps"] == 1.0


def test_gradient_and_momentum_metrics_relate_the_optimizer_to_the_change():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(GradientMetrics()).add_metric(
        MomentumMetrics())
    manager.capture_baseline(model)
    x = torch.randn(8, 6)
    F.cross_entropy(model(x), torch.arange(8) % 4).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    out = manager.on_optimizer_step(model, optimizer=opt)
    assert out["gradient/norm_l2"] == pytest.approx(torch.cat([g.reshape(-1) for g in grads]).norm().item(),
                                                    rel=1e-5)
    # first Adam step: exp_avg = 0.1 g, so momentum and gradient are parallel, and the update opposes both
    assert out["momentum/grad_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert out["momentum/norm_l2"] == pytest.approx(0.1 * out["gradient/norm_l2"], rel=1e-5)
    assert out["gradient/update_cosine"] > 0.5 and out["momentum/update_cosine"] > 0.5
    assert out["momentum/second_moment_mean"] > 0


@pytest.mark.parametrize(("values", "message"), [
    ({"interval": 0}, "interval"),
    ({"snapshot_dtype": "int8"}, "snapshot_dtype"),
    ({"snapshot_device": "gpu0"}, "snapshot_device"),
    ({"param_change_thresholds": [-1.0]}, "param_change_thresholds"),
    ({"intervall": 5}, "unknown key"),
])
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        AnalysisConfig.from_mapping(values)


def test_config_accepts_yaml_spellings_and_normalises_thresholds():
    cfg = AnalysisConfig.from_mapping({"sparse_quality_thresholds": ["1e-4", 1e-6, 1e-6], "snapshot_device": "model"})
    assert cfg.sparse_quality_thresholds == (1e-6, 1e-4)
    assert cfg.torch_device is None and cfg.torch_dtype is torch.float32
    assert AnalysisConfig.from_mapping(cfg.to_dict()) == cfg
