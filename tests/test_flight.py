"""Flight recorder: a real training loop with a NaN planted at a known step in a known layer writes one
bounded post-mortem bundle with the steps before it, `gradflow-agent report BUNDLE` renders it, and a
recorder that cannot write is counted while training goes on."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import gradflow_agent
from gradflow_agent import ConfigError
from gradflow_agent.export.flight import is_bundle, read_bundle
from tests.conftest import QUIET, config
from tests.conftest import train as _train


@pytest.fixture(autouse=True)
def _directories_from_the_config(monkeypatch):
    """These tests choose the recorder's directory in their configs: no environment override (conftest)."""
    monkeypatch.delenv("GRADFLOW_FLIGHT_RECORDER_DIRECTORY", raising=False)
    yield

NAN_STEP = 13
NAN_LAYER = "2"
KEEP = 8  # flight_recorder.steps


def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _plant_nan(module: nn.Module, at_call: int) -> None:
    """NaN in `module`'s output on its `at_call`-th forward. Registered before attach, so it runs before the
    agent's hook, which then sees the NaN in this layer's output (as a bug inside the layer would make it)."""
    calls = [0]

    def hook(_module, _inputs, output):
        calls[0] += 1
        return output * float("nan") if calls[0] == at_call else output

    module.register_forward_hook(hook)


def _cfg(directory, **flight):
    return config(sampling={"export_every_n_steps": 5},
                  flight_recorder={"directory": str(directory), "steps": KEEP, **flight})


def _bundles(directory) -> list[Path]:
    return sorted(Path(directory).glob("gradflow-flight-*.json"))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """25 steps, NaN in layer "2"'s output at step 13; per-step losses and layer-2 gradient norms seen by the test."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("flight")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _plant_nan(model[2], NAN_STEP)
    seen: dict[int, float] = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.__setitem__(len(seen) + 1, math.sqrt(sum(
        float(p.grad.pow(2).sum()) for p in model[2].parameters()))))
    lines = _Lines()
    logging.getLogger("gradflow_agent").addHandler(lines)
    try:
        agent = gradflow_agent.attach(model, _cfg(directory), optimizer=opt)
        losses = _train(model, opt, steps=25, agent=agent)
        agent.detach()
    finally:
        logging.getLogger("gradflow_agent").removeHandler(lines)
    return {"dir": directory, "losses": losses, "norms": seen, "agent": agent, "log": lines.lines}


def test_a_nan_at_a_known_step_writes_exactly_one_bundle_naming_where_it_started(nan_run):
    files = _bundles(nan_run["dir"])
    assert len(files) == 1, files
    path = files[0]
    assert path.name == f"gradflow-flight-default-rank0-step{NAN_STEP}-nonfinite.json"
    assert is_bundle(path)
    bundle = read_bundle(path)
    trigger = bundle["trigger"]
    assert trigger["kind"] == "nonfinite" and trigger["severity"] == "critical"
    assert trigger["step"] == NAN_STEP and trigger["layer"] == NAN_LAYER and trigger["layer_type"] == "Linear"
    assert trigger["snapshot_step"] == 15  # the first snapshot after the NaN
    assert bundle["origin"] == {"step": NAN_STEP, "layer": NAN_LAYER, "tensor": "activation"}
    assert bundle["run"] == "default" and bundle["rank"] == 0
    assert path.stat().st_size <= bundle["bounds"]["max_bytes"]
    assert [s["step"] for s in bundle["snapshots"]] == [0, 5, 10, 15]
    assert nan_run["agent"].errors.counts.get("flight_recorder", 0) == 0
    # one log line, naming the file
    named = [line for line in nan_run["log"] if path.name in line]
    assert len(named) == 1 and "nonfinite" in named[0], nan_run["log"]


def test_the_history_holds_the_steps_before_the_trigger_with_their_real_step_numbers(nan_run):
    h = read_bundle(_bundles(nan_run["dir"])[0])["history"]
    assert h["steps"] == list(range(NAN_STEP - KEEP, NAN_STEP + 1))  # KEEP steps before, then the trigger's
    col = h["layers"].index(NAN_LAYER)
    for k, step in enumerate(h["steps"][:-1]):
        assert h["loss"][k] == pytest.approx(nan_run["losses"][step - 1], rel=1e-5)
        assert h["layer_grad_norm"][k][col] == pytest.approx(nan_run["norms"][step], rel=1e-5)
        assert all(isinstance(h["layer_grad_norm"][k][h["layers"].index(name)], float) for name in ("0", "2", "4"))
        assert math.isfinite(h["grad_norm"][k]) and h["grad_norm"][k] > 0
    assert h["loss"][-1] == "nan"  # the trigger step's loss: a real NaN, not a missing value


def test_a_healthy_run_writes_no_bundle_and_starts_no_thread(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, _cfg(tmp_path / "flight"), optimizer=opt)
    assert agent.flight is not None  # on by default
    _train(model, opt, steps=30, agent=agent)
    assert not any(t.name == "gradflow-flight_recorder" for t in threading.enumerate())
    agent.detach()
    assert not (tmp_path / "flight").exists()
    assert agent.errors.total == 0


def test_the_recorder_is_on_by_default_for_nonfinite_only():
    agent = gradflow_agent.attach(_model(), QUIET)
    try:
        assert agent.flight is not None and agent.flight.triggers == frozenset({"nonfinite"})
        assert agent.config.flight_recorder.directory == "gradflow-flight"
    finally:
        agent.detach()


def _exploding_run(directory, steps, loud, **flight):
    """SGD with lr 0 (the weights never move); the loss is scaled x1e4 on the `loud` steps."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = _cfg(directory, triggers=["nonfinite", "exploding"], **flight)
    cfg["thresholds"]["exploding"] = 100.0
    agent = gradflow_agent.attach(model, cfg, optimizer=opt)
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = torch.randn(16, 8, generator=g)
        loss = (model(x) - x[:, :1]).pow(2).mean() * (1e4 if step in loud else 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)
    agent.detach()
    return agent


def test_an_incident_writes_once_while_active_and_again_after_it_clears(tmp_path):
    loud = set(range(11, 21)) | set(range(31, 41))  # active at the snapshots of 15 and 20, then of 35 and 40
    agent = _exploding_run(tmp_path, 45, loud)
    files = _bundles(tmp_path)
    assert [read_bundle(f)["trigger"]["step"] for f in files] == [15, 35], files
    for f in files:
        b = read_bundle(f)
        assert b["trigger"]["kind"] == "exploding" and b["origin"] is None
        assert {i["layer"] for i in b["issues"]} == {"0", "2", "4"}  # one incident, every layer it hit
        assert b["history"]["steps"] == list(range(b["trigger"]["step"] - KEEP, b["trigger"]["step"] + 1))
    assert agent.errors.total == 0


def test_max_bundles_bounds_the_run(tmp_path):
    _exploding_run(tmp_path, 45, set(range(11, 21)) | set(range(31, 41)), max_bundles=1)
    assert len(_bundles(tmp_path)) == 1


def test_a_bundle_stays_under_max_bytes_leaving_out_the_oldest_snapshots_first(tmp_path):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(12)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _plant_nan(model[6], 23)
    cfg = config(sampling={"export_every_n_steps": 2},
                 flight_recorder={"directory": str(tmp_path), "steps": 16, "snapshots": 6, "max_bytes": 24000})
    agent = gradflow_agent.attach(model, cfg, optimizer=opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randn(4, 8, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)
    agent.detach()
    (path,) = _bundles(tmp_path)
    b = read_bundle(path)
    assert path.stat().st_size <= 24000
    assert b["bounds"]["snapshots_left_out"] > 0 and 1 <= len(b["snapshots"]) < 6
    assert b["snapshots"][-1]["step"] == 24  # the newest stay
    assert b["trigger"]["step"] == 23 and b["origin"]["layer"] == "6"
    done = subprocess.run([sys.executable, "-m", "gradflow_agent", "report", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_report_renders_a_bundle_in_80_columns_and_as_html(nan_run, tmp_path):
    (path,) = _bundles(nan_run["dir"])
    done = subprocess.run([sys.executable, "-m", "gradflow_agent", "report", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    trigger = next(line for line in lines if line.startswith("TRIGGER"))
    assert "nonfinite" in trigger and f"layer {NAN_LAYER} (Linear)" in trigger and f"step {NAN_STEP}" in trigger
    assert any(line.startswith("ORIGIN") and f"layer {NAN_LAYER}" in line for line in lines)
    assert any(line.split()[:1] == [str(NAN_STEP - KEEP)] for line in lines)  # the history's first step
    out = tmp_path / "bundle.html"
    done = subprocess.run([sys.executable, "-m", "gradflow_agent", "report", str(path), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    html = out.read_text()
    assert "Flight recorder" in html and "Steps before the trigger" in html


def test_an_unwritable_directory_is_counted_and_training_goes_on(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the bundle directory should be")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _plant_nan(model[0], 4)
    agent = gradflow_agent.attach(model, _cfg(blocker / "flight"), optimizer=opt)
    losses = _train(model, opt, steps=20, agent=agent)  # raises nothing
    assert len(losses) == 20 and agent.steps == 20
    agent.detach()
    assert agent.errors.counts["flight_recorder"] == 1
    assert blocker.read_text().startswith("a file")


def test_each_rank_names_its_bundles_and_ranks_zero_keeps_rank_0_only(tmp_path, monkeypatch):
    from gradflow_agent import agent as agent_module
    monkeypatch.setattr(agent_module, "_distributed", lambda: (1, 1))
    for ranks in ("all", "zero"):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        _plant_nan(model[2], 3)
        agent = gradflow_agent.attach(model, _cfg(tmp_path / ranks, ranks=ranks), optimizer=opt)
        assert (agent.flight is None) == (ranks == "zero")
        _train(model, opt, steps=6, agent=agent)
        agent.detach()
    assert [p.name for p in _bundles(tmp_path / "all")] == ["gradflow-flight-default-rank1-step3-nonfinite.json"]
    assert not (tmp_path / "zero").exists()


@pytest.mark.parametrize("flight, key", [({"triggers": ["nan"]}, "flight_recorder.triggers"),
                                         ({"max_bytes": 100}, "flight_recorder.max_bytes"),
                                         ({"steps": 0}, "flight_recorder.steps"),
                                         ({"ranks": "first"}, "flight_recorder.ranks"),
                                         ({"size": 3}, "flight_recorder.size")])
def test_bad_flight_recorder_keys_are_config_errors(flight, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        gradflow_agent.attach(_model(), config(flight_recorder=flight))


def test_a_json_bundle_is_one_line_of_json(nan_run):
    (path,) = _bundles(nan_run["dir"])
    text = path.read_text()
    assert text.count("\n") == 0 and json.loads(text)["format"] == "gradflow-flight-bundle"


def test_a_disabled_recorder_keeps_nothing_and_writes_nothing(tmp_path):
    on = gradflow_agent.attach(_model(), _cfg(tmp_path))
    off = gradflow_agent.attach(_model(), _cfg(tmp_path, enabled=False))
    try:
        assert off.flight is None and off._ring_rows == on._ring_rows - (KEEP + 1)
        assert not off.grad.keep_recent
    finally:
        on.detach()
        off.detach()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _plant_nan(model[2], 3)
    agent = gradflow_agent.attach(model, _cfg(tmp_path, enabled=False), optimizer=opt)
    _train(model, opt, steps=10, agent=agent)
    agent.detach()
    assert any(i.kind == "nonfinite" for i in agent.latest.issues) and not _bundles(tmp_path)
