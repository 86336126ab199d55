"""Attach/detach hygiene, never hurting the run, configuration errors, CLI."""

from __future__ import annotations

import copy
import logging
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
from torch import nn

import gradflow_agent
from gradflow_agent import ConfigError, load_config
from tests.conftest import config
from tests.conftest import train as _train


def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def _all_hooks(model, opt):
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return n + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks) + \
        len(_global_optimizer_pre_hooks) + len(_global_optimizer_post_hooks)


@pytest.mark.parametrize("explicit_optimizer", [True, False])
def test_detach_leaves_no_hook_thread_or_port(explicit_optimizer):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    threads_before = set(threading.enumerate())
    agent = gradflow_agent.attach(model, config(exporters={"prometheus": {"enabled": True, "port": 0,
                                                                          "addr": "127.0.0.1"},
                                                           "jsonl": {"enabled": False}}),
                                  optimizer=opt if explicit_optimizer else None)
    assert _all_hooks(model, opt) > 0
    _train(model, opt, 5, agent)
    url = agent.prometheus_url
    assert "gradflow_steps_total" in urllib.request.urlopen(url, timeout=5).read().decode()
    port = int(url.split(":")[2].split("/")[0])
    agent.detach()
    agent.detach()  # idempotent
    assert _all_hooks(model, opt) == 0
    assert set(threading.enumerate()) <= threads_before
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(1)
        s.connect(("127.0.0.1", port))


def test_loss_curve_is_bit_identical_with_the_agent():
    torch.manual_seed(0)
    plain = _model()
    watched = copy.deepcopy(plain)
    torch.manual_seed(1)
    reference = _train(plain, torch.optim.Adam(plain.parameters()), 30)
    opt = torch.optim.Adam(watched.parameters())
    cfg = config(stats={"parameters": {"update_ratio": "sampled", "sample_size": 4}})
    torch.manual_seed(1)  # Dropout draws from the global generator: the agent must not
    with gradflow_agent.attach(watched, cfg, optimizer=opt) as agent:
        observed = _train(watched, opt, 30, agent)
        assert agent.snapshot().step == 30
    assert observed == reference


def test_steps_are_counted_once_with_optimizer_hooks_and_agent_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config())  # optimizer found through the global hooks
    _train(model, opt, 7, agent)
    assert agent.snapshot().step == 7
    agent.detach()


def test_without_an_optimizer_agent_step_reads_the_gradients():
    model = nn.Sequential(nn.Linear(4, 1))
    agent = gradflow_agent.attach(model, config())
    for _ in range(3):
        model(torch.ones(2, 4)).sum().backward()
        expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
        agent.step()  # before zero_grad: this is where the gradients are read
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    snap = agent.snapshot()
    agent.detach()
    assert snap.step == 3
    assert snap.layer("0")["grad_pressure"] == pytest.approx(expected, rel=1e-5)
    assert snap.layer("0")["update_ratio"] > 0


def test_an_exception_in_a_hook_is_counted_logged_once_and_training_goes_on(caplog, monkeypatch):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    agent = gradflow_agent.attach(model, config(), optimizer=opt)

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(agent.act, "_reduce_plain", broken)
    monkeypatch.setattr(agent.grad, "read", broken)
    with caplog.at_level(logging.ERROR, logger="gradflow_agent"):
        losses = _train(model, opt, 10, agent)
    snap = agent.snapshot()
    agent.detach()
    assert len(losses) == 10 and snap.step == 10
    assert snap.errors["hook"] == 10 * 5  # five hooked modules per step (Dropout is pass-through)
    assert snap.errors["gradients"] == 10
    assert snap.counters["errors_total"] == 60
    logged = [r for r in caplog.records if "injected failure" in r.getMessage()]
    assert len(logged) == 2  # once per component


def test_a_failing_exporter_is_counted_and_training_goes_on():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    agent = gradflow_agent.attach(model, config(sampling={"export_every_n_steps": 2}), optimizer=opt)

    class Broken:
        def publish(self, snap):
            raise OSError("disk full")

        def close(self):
            raise OSError("disk full")

    agent.exporters.append(Broken())
    _train(model, opt, 6, agent)
    agent.detach()
    assert agent.errors.counts["Broken"] == 5  # three interval snapshots, the one at detach, and close
    assert agent.latest.step == 6


def test_a_port_in_use_falls_back_to_a_free_port(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="gradflow_agent"):
            agent = gradflow_agent.attach(_model(), config(exporters={"prometheus": {
                "enabled": True, "port": port, "addr": "127.0.0.1"}}))
        try:
            assert f":{port}/" not in agent.prometheus_url
            assert urllib.request.urlopen(agent.prometheus_url, timeout=5).status == 200
            assert any(f"port {port}" in r.getMessage() and "in use" in r.getMessage() for r in caplog.records)
        finally:
            agent.detach()


@pytest.mark.parametrize("cfg,message", [
    ({"sampling": {"windw": 3}}, "unknown key 'sampling.windw'"),
    ({"thresholds": {"vanishing": "small"}}, "key 'thresholds.vanishing' must be a number"),
    ({"thresholds": {"dead_ratio": 1.5}}, "key 'thresholds.dead_ratio' must be a ratio in [0, 1]"),
    ({"exporters": {"prometheus": {"port": 70000}}}, "key 'exporters.prometheus.port' must be a port"),
    ({"stats": {"parameters": {"update_ratio": "sometimes"}}}, "must be sampled, exact or off"),
    ({"modules": "all"}, "key 'modules' must be a mapping"),
    ({"stats": {"gradients": {"enabled": "yes"}}}, "key 'stats.gradients.enabled' must be a boolean"),
])
def test_bad_configs_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as err:
        gradflow_agent.attach(_model(), cfg)
    assert message in str(err.value)


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "gradflow.yaml"
    path.write_text("sampling:\n  window: -3\n")
    with pytest.raises(ConfigError, match=r"gradflow.yaml: key 'sampling.window' must be an integer >= 2"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_environment_overrides_scalars_and_warns_about_unknown_variables(tmp_path):
    cfg = load_config({"sampling": {"window": 7}}, environ={"GRADFLOW_SAMPLING_WINDOW": "9",
                                                          "GRADFLOW_EXPORTERS_PROMETHEUS_ADDR": "127.0.0.1"})
    assert cfg.sampling.window == 9 and cfg.exporters.prometheus.addr == "127.0.0.1"
    with pytest.raises(ConfigError, match="GRADFLOW_SAMPLING_WINDOW.*must be an integer"):
        load_config(environ={"GRADFLOW_SAMPLING_WINDOW": "many"})
    warnings: list[str] = []  # other tools share the prefix: an unknown variable is a warning, not an error
    assert load_config(environ={"GRADFLOW_SAMPLNG_WINDOW": "9"}, warn=warnings.append).sampling.window == 50
    assert len(warnings) == 1 and "GRADFLOW_SAMPLNG_WINDOW" in warnings[0] and "GRADFLOW_SAMPLING_WINDOW" in warnings[0]
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: from-env-file\n")
    assert load_config(environ={"GRADFLOW_CONFIG": str(path)}).run.name == "from-env-file"


def test_wrong_argument_types_are_rejected_clearly():
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        gradflow_agent.attach("model")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        gradflow_agent.attach(_model(), optimizer="adam")
    with pytest.raises(ConfigError, match="config must be a path, a dict or None"):
        gradflow_agent.attach(_model(), config=42)


def test_module_selection_globs_types_and_cap():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    agent = gradflow_agent.attach(model, config(modules={"types": ["Linear"], "exclude": ["4"]}))
    assert [layer.name for layer in agent.layers] == ["0", "2"]
    agent.detach()
    agent = gradflow_agent.attach(model, config(modules={"max_layers": 2}))
    assert len(agent.layers) == 2 and agent.layers_skipped == 3
    assert agent.snapshot().counters["layers_skipped"] == 3
    agent.detach()
    mha = nn.MultiheadAttention(8, 2)
    agent = gradflow_agent.attach(mha, config())
    assert [layer.name for layer in agent.layers] == ["(root)", "out_proj"]  # in_proj_weight is the root's
    agent.detach()


def test_cli_demo_runs_and_reports(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gradflow_agent", "demo", "--steps", "40", "--port", "0",
                         "--step-delay", "0"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "layer health" in ok.stdout and "detected issues: none" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gradflow_agent", "demo", "--steps", "60", "--port", "0",
                          "--step-delay", "0", "--pathology", "dead", "--fail-on-issues"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "dead" in bad.stdout
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sampling:\n  every: 3\n")
    err = subprocess.run([sys.executable, "-m", "gradflow_agent", "demo", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert err.returncode == 2 and "unknown key 'sampling.every'" in err.stderr
    assert "Traceback" not in err.stderr


def test_plugins_run_at_each_step_and_publish_through_the_exporters():
    from gradflow_agent.export.metrics import Metric

    class StepCounter:
        name = "step_counter"
        metrics = (Metric("gradflow_test_plugin_steps", "gauge", "Steps seen by a test plug-in.", labels=("layer",)),)

        def __init__(self):
            self.seen, self.closed = 0, False

        def on_step(self, agent):
            self.seen += 1
            if self.seen == 3:
                raise ValueError("a failing plug-in step")

        def collect(self):
            return [(self.metrics[0], {"layer": "all"}, float(self.seen))]

        def close(self):
            self.closed = True

    model = _model()
    opt = torch.optim.Adam(model.parameters())
    agent = gradflow_agent.attach(model, config(exporters={"prometheus": {"enabled": True, "port": 0,
                                                                          "addr": "127.0.0.1"}}), optimizer=opt)
    plugin = StepCounter()
    agent.add_plugin(plugin)
    _train(model, opt, 5, agent)
    snap = agent.snapshot()
    text = urllib.request.urlopen(agent.prometheus_url, timeout=5).read().decode()
    agent.detach()
    assert plugin.seen == 5 and plugin.closed and snap.errors["step_counter"] == 1
    assert 'gradflow_test_plugin_steps{layer="all",rank="0",run="default"} 5.0' in text
    assert snap.to_dict()["extra"] == [{"name": "gradflow_test_plugin_steps", "labels": {"layer": "all"},
                                        "value": 5.0}]


def test_loss_is_published_once_given_and_a_nan_loss_stays_nan():
    from gradflow_agent.export.metrics import samples

    model = _model()
    agent = gradflow_agent.attach(model, config())
    agent.step()
    assert not [m for m, _, _ in samples(agent.snapshot(), agent.info) if m.name == "gradflow_loss"]
    agent.step(loss=torch.tensor(2.0))
    agent.step(loss=4.0)
    assert agent.snapshot().loss == 3.0
    agent.step()
    assert agent.snapshot().loss == 3.0  # an interval without a loss keeps the last one
    agent.step(loss=torch.tensor([1.0, 3.0]))  # a per-sample loss counts as its mean, once
    agent.step(loss=torch.tensor([5.0, 7.0]))
    agent.step(loss=1.0)
    assert agent.snapshot().loss == 3.0  # (2 + 6 + 1) / 3
    agent.step(loss=torch.tensor([1.0, 3.0]))  # losses of different shapes in one interval
    agent.step(loss=torch.tensor(6.0, dtype=torch.float64))
    assert agent.snapshot().loss == 4.0
    agent.step(loss=torch.tensor(float("nan")))
    values = [v for m, _, v in samples(agent.snapshot(), agent.info) if m.name == "gradflow_loss"]
    agent.detach()
    assert len(values) == 1 and values[0] != values[0]


def test_each_interval_publishes_the_loss_of_its_own_steps():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config(sampling={"export_every_n_steps": 2}), optimizer=opt)
    published = []
    for loss in (1.0, 3.0, 5.0, 7.0):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()  # the interval is due here, before the step's loss is known...
        opt.zero_grad()
        agent.step(loss=loss)  # ...and published here, with it
        published.append((agent.latest.step, agent.latest.loss))
    assert published == [(0, None), (2, 2.0), (2, 2.0), (4, 6.0)]
    opt.step()
    opt.step()  # due at step 6, held for the agent.step() that does not come...
    assert agent.latest.step == 4
    opt.step()  # ...so the next optimizer step publishes it: held back one step at most
    assert agent.latest.step == 7
    agent.detach()


def test_a_grad_scaler_is_reported_and_its_skipped_steps_counted():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    agent = gradflow_agent.attach(model, config(), optimizer=opt, scaler=scaler)
    for step in range(4):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        scaler.scale(loss).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = float("inf")  # an overflow: the scaler skips this step
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        agent.step(loss=loss)
    snap = agent.snapshot()
    agent.detach()
    assert snap.step == 3  # optimizer steps; the skipped one is counted apart
    assert snap.counters["optimizer_steps_skipped_total"] == 1
    assert snap.counters["grad_scale"] == scaler.get_scale() == 512.0  # halved after the overflow
    assert agent.info["amp_scaler"] == "true"


def test_a_compiled_model_is_monitored_through_its_original_module():
    model = _model()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    agent = gradflow_agent.attach(compiled, config())
    agent.detach()
    assert agent.model is model and [layer.name for layer in agent.layers][:2] == ["0", "1"]
