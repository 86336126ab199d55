"""Fault containment: a fault anywhere in the agent is contained, nothing leaks, nothing is silenced.

Each test here failed before the change it covers (issue 12): transactional attach, faults at the step
boundary, copies and saves of an attached model, inference mode, changing trainable sets, GradScaler
accounting, checkpointing with output gradients, non-finite attribution, and loops without an optimizer.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import socket
import threading
import urllib.request

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradflow_agent
from gradflow_agent import ConfigError
from gradflow_agent.agent import AttachError
from tests.conftest import config
from tests.conftest import train as _train


def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _hook_count(model) -> int:
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return n + len(_global_optimizer_pre_hooks) + len(_global_optimizer_post_hooks)


def _gradflow_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("gradflow") or "serve" in t.name.lower()}


def _scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=5).read().decode()


def _serving(exporters=None, **sections):
    return config(exporters={"prometheus": {"enabled": True, "port": 0, "addr": "127.0.0.1"}, **(exporters or {})},
                  **sections)


# -- 1. attach is transactional ---------------------------------------------------------------------------
def test_a_failed_attach_leaves_no_hook_thread_port_or_file(monkeypatch, tmp_path):
    model = _model()
    before_hooks, before_threads = _hook_count(model), _gradflow_threads()
    bound: list[int] = []
    from gradflow_agent.export import prometheus as prom
    real = prom.PrometheusExporter.__init__

    def remember(self, agent, cfg):
        real(self, agent, cfg)
        bound.append(self.port)

    monkeypatch.setattr(prom.PrometheusExporter, "__init__", remember)
    from gradflow_agent.stats.parameters import ParameterStats

    def broken(self):
        raise RuntimeError("injected fault in the first snapshot")

    monkeypatch.setattr(ParameterStats, "device_parts", broken)
    path = tmp_path / "run.jsonl"
    with pytest.raises(AttachError, match="left nothing attached.*injected fault"):
        gradflow_agent.attach(model, _serving(exporters={"jsonl": {"enabled": True, "path": str(path)}}))
    assert _hook_count(model) == before_hooks
    assert _gradflow_threads() <= before_threads
    assert bound, "the exporter was started before the fault"
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(1)
        s.connect(("127.0.0.1", bound[0]))
    assert "__reduce_ex__" not in vars(model[0])
    copy.deepcopy(model)  # no half-built agent reachable from the model


def test_attach_to_a_selection_that_matches_nothing_is_one_config_error():
    with pytest.raises(ConfigError, match="modules: include .* select no layer of Sequential"):
        gradflow_agent.attach(_model(), config(modules={"include": ["encoder.*"]}))


def test_an_include_glob_that_matches_nothing_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="gradflow_agent"):
        agent = gradflow_agent.attach(_model(), config(modules={"include": ["0", "decoder.*"]}))
    agent.detach()
    assert [layer.name for layer in agent.layers] == ["0"]
    assert any("decoder.*" in r.getMessage() for r in caplog.records)


# -- 2. a fault at the step boundary never silences the exports -----------------------------------------
def test_a_failing_parameter_component_is_visible_on_metrics_and_disabled(monkeypatch, caplog):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, _serving(sampling={"export_every_n_steps": 5}), optimizer=opt)
    try:
        def broken(*args, **kwargs):
            raise ValueError("parameter statistics broke")

        monkeypatch.setattr(agent.param, "measure", broken)
        with caplog.at_level(logging.WARNING, logger="gradflow_agent"):
            _train(model, opt, 50, agent)
        assert agent.latest.step == 50
        text = _scrape(agent.prometheus_url)
        assert 'gradflow_agent_errors_total{component="parameters"' in text
        assert 'gradflow_agent_component_disabled{component="parameters"' in text
        assert agent.errors.counts["parameters"] == 20  # disabled after 20 failures in a row
        logged = [r.getMessage() for r in caplog.records if "parameters" in r.getMessage()]
        assert len(logged) == 2  # the first error, and the warning that it is disabled
        assert "gradflow_grad_pressure{" in text  # the rest of the agent goes on
        assert "gradflow_layer_health_score{" not in text  # unknown is never exported as healthy
    finally:
        agent.detach()


def test_a_raising_detector_is_counted_and_never_reaches_the_training_loop(monkeypatch):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)

    def broken(snap, thresholds):
        raise ZeroDivisionError("detector bug")

    monkeypatch.setattr("gradflow_agent.agent.diagnose", broken)
    _train(model, opt, 5, agent)
    snap = agent.snapshot()  # does not raise
    issues = agent.issues()
    agent.detach()
    assert issues == [] and snap.errors["detect"] == 1 and agent.errors.counts["detect"] == 3  # + detach
    assert np.isnan(snap.health).all()


def test_the_first_step_boundary_fault_still_publishes_errors(monkeypatch):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(sampling={"export_every_n_steps": 2}), optimizer=opt)
    monkeypatch.setattr(agent.act, "end_step", lambda: 1 / 0)
    _train(model, opt, 6, agent)
    agent.detach()
    assert agent.latest.step == 6 and agent.latest.errors["activations"] >= 6


# -- 9. evaluation under torch.inference_mode() is skipped by design ---------------------------------------
def test_inference_mode_is_not_measured_and_raises_no_hook_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    for _ in range(40):
        with torch.inference_mode():
            model(torch.randn(4, 8))
        _train(model, opt, 1, agent)
    snap = agent.snapshot()
    agent.detach()
    assert snap.errors.get("hook", 0) == 0 and snap.counters["errors_total"] == 0
    assert snap.step == 40
    assert snap.layer("1")["activation_dead_unit_ratio"] >= 0


# -- 10. models copied or saved while attached ---------------------------------------------------------
def _user_hook(module, inputs, output):
    return None


def test_torch_save_and_deepcopy_of_an_attached_model_carry_no_agent_hook(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model[0].register_forward_hook(_user_hook)  # the user's own hooks travel, as without the agent
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    _train(model, opt, 3, agent)
    torch.save(model, tmp_path / "model.pt")  # a whole-model save, as reference scripts do
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    pickle.loads(pickle.dumps(model))
    ema = copy.deepcopy(model)
    for m in (loaded, ema):
        assert sum(len(x._forward_hooks) for x in m.modules()) == 1  # the user's hook only
        assert all("__reduce_ex__" not in vars(x) for x in m.modules())
    calls_before = list(agent.act.calls)
    with torch.no_grad():
        ema(torch.randn(4, 8))  # the EMA copy's forward is not counted as the model's
    assert agent.act.calls == calls_before
    buf = io.BytesIO()
    torch.save(ema, buf)
    agent.detach()
    assert sum(len(x._forward_hooks) for x in model.modules()) == 1
    assert all("__reduce_ex__" not in vars(x) for x in model.modules())
    assert torch.equal(loaded(torch.ones(2, 8)), model(torch.ones(2, 8)))


# -- 11. the trainable set may change during the run --------------------------------------------------------
def test_a_layer_unfrozen_or_frozen_mid_run_is_followed():
    model = _model()
    model[4].requires_grad_(False)  # frozen at attach, unfrozen at step 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = gradflow_agent.attach(model, config(thresholds={"warmup_steps": 0}), optimizer=opt)
    _train(model, opt, 10, agent)
    assert np.isnan(agent.snapshot().layer("4")["grad_pressure"])
    model[4].requires_grad_(True)
    model[0].requires_grad_(False)  # frozen at step 10
    _train(model, opt, 10, agent, seed=1)
    snap = agent.snapshot()
    agent.detach()
    assert snap.layer("4")["grad_pressure"] > 0
    assert snap.layer("4")["update_ratio"] > 0
    assert np.isnan(snap.layer("0")["update_ratio"])
    assert not [i for i in snap.issues if i.layer == "0"], [str(i) for i in snap.issues]


# -- 12. GradScaler without optimizer=: every skipped step counted, and not as an optimizer step --------
def test_grad_scaler_skips_are_counted_without_an_optimizer_reference():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    agent = gradflow_agent.attach(model, config(), scaler=scaler)
    for step in range(6):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        scaler.scale(loss).backward()
        if step in (0, 3):  # the very first step overflows, before any real optimizer step
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        agent.step(loss=loss)
    snap = agent.snapshot()
    agent.detach()
    assert snap.counters["optimizer_steps_skipped_total"] == 2
    assert snap.step == snap.counters["steps_total"] == 4


def test_agent_step_on_every_micro_batch_counts_optimizer_steps_only():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    for micro in range(12):
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean() / 4
        loss.backward()
        if micro % 4 == 3:
            opt.step()
            opt.zero_grad()
        agent.step(loss=loss)
    snap = agent.snapshot()
    agent.detach()
    assert snap.step == 3 and snap.counters["optimizer_steps_skipped_total"] == 0


# -- 13. reentrant checkpointing keeps the output gradients of checkpointed layers -------------------------
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_layers_keep_their_output_gradient(reentrant):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    head = nn.Linear(8, 1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = inner, head

        def forward(self, x):
            return self.head(checkpoint(self.inner, x, use_reentrant=reentrant))

    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(stats={"gradients": {"output_grads": True}}), optimizer=opt)
    x = torch.randn(4, 8, requires_grad=True)
    grads = {}
    out = inner[1](inner[0](x))
    out.retain_grad()
    with agent.paused():
        head(out).sum().backward()
    grads["tanh"] = out.grad.norm().item()
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    snap = agent.snapshot()
    agent.detach()
    assert snap.layer("inner.1")["output_grad_norm"] == pytest.approx(grads["tanh"], rel=1e-5)
    assert snap.layer("inner.0")["output_grad_norm"] > 0
    assert snap.layer("inner.0")["activation_mean"] == snap.layer("inner.0")["activation_mean"]  # measured
    assert agent.act.calls == [0, 0, 0]  # reset by the snapshot; counted once per step before it


# -- 8. non-finite values are attributed to where and when they started ------------------------------------
def test_an_inf_planted_in_a_weight_is_reported_on_its_layer_and_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                          nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(stats={"parameters": {"every_n_steps": 1}}), optimizer=opt)
    for step in range(1, 16):
        if step == 10:
            with torch.no_grad():
                model[2].weight[3, 4] = float("inf")
        _train(model, opt, 1, agent, seed=step)
    issues = [i for i in agent.issues() if i.kind == "nonfinite"]
    agent.detach()
    assert len(issues) == 1, [str(i) for i in issues]
    assert issues[0].layer == "2" and issues[0].first_step == 10
    assert "first at step 10" in issues[0].message


def test_a_nan_born_in_backward_is_reported_on_the_deepest_layer_it_reached_first():
    class SqrtAtZero(nn.Module):
        def forward(self, x):
            return torch.sqrt(x - x.detach())  # forward 0, backward inf * 0 = NaN

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), SqrtAtZero(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    issues = [i for i in agent.issues() if i.kind == "nonfinite"]
    agent.detach()
    assert [(i.layer, i.first_step) for i in issues] == [("1", 1)]
    assert "grad" in issues[0].message


# -- 15. a loop without a torch.optim optimizer and without agent.step() -----------------------------------
def test_a_hand_written_update_loop_is_monitored_from_the_end_of_backward(caplog):
    torch.manual_seed(0)
    model = _model()
    with caplog.at_level(logging.INFO, logger="gradflow_agent"):
        agent = gradflow_agent.attach(model, _serving(sampling={"export_every_n_steps": 5}))
        for _ in range(21):
            x = torch.randn(16, 8)
            loss = (model(x) - x[:, :1]).pow(2).mean()
            model.zero_grad()
            loss.backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.05)
    try:
        assert agent.steps == 20  # the first backward pass tells nothing yet
        assert agent.latest.step == 20
        text = _scrape(agent.prometheus_url)
        assert 'gradflow_grad_pressure{layer="0"' in text and "gradflow_grad_norm{" in text
        assert 'grad_source="backward_end"' in text
        assert sum("end of each backward pass" in r.getMessage() for r in caplog.records) == 1
        snap = agent.snapshot()
        assert snap.layer("0")["update_ratio"] > 0
        assert not [i for i in snap.issues if i.kind in ("stalled", "vanishing")]
    finally:
        agent.detach()


def test_gradient_accumulation_with_an_unnamed_optimizer_is_not_mistaken_for_hand_updates():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config())
    for micro in range(16):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        if micro % 4 == 3:
            opt.step()
            opt.zero_grad()
    snap = agent.snapshot()
    agent.detach()
    assert agent.boundary == "optimizer" and snap.step == 4


def test_a_sink_disabled_after_repeated_failures_is_still_closed_at_detach():
    agent = gradflow_agent.attach(_model(), config(sampling={"export_every_n_steps": 1}))

    class Flaky:
        name = "flaky"
        closed = False

        def publish(self, snap):
            raise ConnectionError("endpoint down")

        def close(self, deadline=None):
            Flaky.closed = True

    agent.exporters.append(Flaky())
    for _ in range(25):
        agent.snapshot()
    assert not agent.errors.enabled("flaky")
    agent.detach()
    assert Flaky.closed


# -- the overhead budget (issue 11): the agent keeps its own share of the step time --------------------
@pytest.mark.parametrize("budget,lowered", [(0.0005, True), (0.0, False), (0.9, False)])
def test_the_overhead_budget_lowers_the_activation_cadence_not_the_gradient_watch(budget, lowered):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(sampling={"overhead_budget": budget}), optimizer=opt)
    _train(model, opt, 200, agent)
    snap = agent.snapshot()
    agent.detach()
    assert (snap.counters["activation_every_steps"] > 1) is lowered
    assert 0 < snap.counters["overhead_ratio"] <= 1
    assert snap.step == 200 and snap.layer("0")["grad_pressure"] > 0  # gradients on every step
    assert agent.grad.filled == min(200, agent.grad.ring.shape[0])
    assert snap.layer("1")["activation_zero_ratio"] >= 0  # activations still measured, less often


@pytest.mark.parametrize("on_host", [True, False], ids=["host-path", "accelerator-path"])
def test_the_nonfinite_origin_keeps_the_first_event_on_both_paths(on_host):
    from gradflow_agent.stats.engine import transfer
    from gradflow_agent.stats.nonfinite import NonfiniteOrigin

    origin = NonfiniteOrigin(torch.device("cpu"), on_host=on_host)
    origin.step = 7
    origin.note(torch.tensor([0, 1, 2]), torch.tensor([0.0, 0.0, 0.0]), 0)  # nothing non-finite yet
    origin.note(torch.tensor([0, 1, 2]), torch.tensor([0.0, 2.0, 3.0]), 1, last=True)  # backward: deepest
    origin.step = 9
    origin.note(torch.tensor([0]), torch.tensor([5.0]), 0)  # later events never replace the first
    assert origin.finish(transfer([origin.device_parts()], torch.device("cpu"))[0]) == (7, 2, "grad")
