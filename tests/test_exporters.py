"""Exporters against real receivers: Prometheus, promtool, an OTLP/HTTP receiver, Pushgateway, JSONL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradflow_agent
from gradflow_agent.export.jsonl import read_snapshots
from gradflow_agent.export.metrics import ALL
from tests.conftest import config
from tests.support.prometheus import PrometheusServer, free_port, pushgateway, require_binary


def _train(agent, model, opt, steps):
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)


def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


@pytest.fixture
def served():
    """A trained model whose agent serves /metrics on 127.0.0.1 (one layer planted with NaN)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    port = free_port()
    agent = gradflow_agent.attach(model, config(run={"name": "scrape-test", "labels": {"team": "ml"}},
                                                exporters={"prometheus": {"enabled": True, "port": port,
                                                                          "addr": "127.0.0.1"}}), optimizer=opt)
    _train(agent, model, opt, 25)
    model(torch.full((1, 8), float("nan")))  # non-finite activations: counters and an issue
    agent.snapshot()
    yield agent, port
    agent.detach()


def test_a_real_prometheus_scrapes_the_per_layer_series(served):
    agent, port = served
    cfg = {"scrape_configs": [{"job_name": "trainer", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}
    with PrometheusServer(cfg) as prom:
        prom.wait_for_targets(1)
        pressure = prom.wait_until(lambda: prom.query("gradflow_grad_pressure"), timeout=20, what="pressure")
        layers = {r["metric"]["layer"] for r in pressure}
        assert layers == {"0", "2", "4"}
        for r in pressure:
            assert r["metric"]["run"] == "scrape-test" and r["metric"]["rank"] == "0"
            assert r["metric"]["team"] == "ml" and r["metric"]["job"] == "trainer"
            expected = agent.latest.layer(r["metric"]["layer"])["grad_pressure"]
            assert float(r["value"][1]) == pytest.approx(expected)
        steps = prom.query('gradflow_steps_total{job="trainer"}')
        assert float(steps[0]["value"][1]) == 25
        zero = prom.query('gradflow_activation_zero_ratio{layer="1"}')
        assert 0 < float(zero[0]["value"][1]) < 1
        issue = prom.query('gradflow_issue{kind="nonfinite"}')
        assert [r["metric"]["layer"] for r in issue] == ["0"]
        bad = prom.query('gradflow_nonfinite_total{tensor="activation"} > 0')
        assert {r["metric"]["layer"] for r in bad} >= {"0"}


def test_promtool_check_metrics_passes_on_a_live_scrape(served):
    agent, _ = served
    promtool = require_binary("promtool", "prometheus")
    text = urllib.request.urlopen(agent.prometheus_url, timeout=5).read()
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert not (done.stdout + done.stderr).strip(), (done.stdout + done.stderr).decode()
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert families["gradflow_nonfinite"].type == "counter"
    assert families["gradflow_agent_info"].type == "gauge"  # info metrics are 1-valued gauges in text format
    info = families["gradflow_agent_info"].samples[0].labels
    assert info["version"] == gradflow_agent.__version__ and info["grad_source"] == "optimizer_step_pre_hook"
    assert {s.labels["layer"] for s in families["gradflow_layer_info"].samples} == {"0", "1", "2", "3", "4"}


def test_a_real_otlp_receiver_gets_the_metrics(tmp_path):
    port = free_port()
    out = tmp_path / "received.jsonl"
    receiver = subprocess.Popen([sys.executable, "-m", "tests.support.otlp_receiver", str(port), str(out)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        model = _model()
        opt = torch.optim.Adam(model.parameters())
        agent = gradflow_agent.attach(model, config(run={"name": "otel-test"}, exporters={"otel": {
            "enabled": True, "endpoint": f"http://127.0.0.1:{port}/v1/metrics", "interval_seconds": 0.5}}),
            optimizer=opt)
        _train(agent, model, opt, 20)
        agent.snapshot()
        time.sleep(1.2)  # at least one periodic export
        agent.detach()  # flushes
    finally:
        receiver.terminate()
        receiver.wait(10)
    points = [json.loads(line) for line in out.read_text().splitlines()]
    names = {p["name"] for p in points}
    assert {"gradflow.grad.pressure", "gradflow.activation.zero.ratio", "gradflow.steps",
            "gradflow.nonfinite", "gradflow.agent.overhead"} <= names
    resource = points[0]["resource"]
    assert resource["service.name"] == "gradflow-agent" and resource["run"] == "otel-test"
    assert resource["rank"] == "0"
    pressure = [p for p in points if p["name"] == "gradflow.grad.pressure"]
    assert {p["attributes"]["layer"] for p in pressure} == {"0", "2", "4"}
    steps = [p for p in points if p["name"] == "gradflow.steps"]
    assert steps[-1]["kind"] == "sum" and steps[-1]["value"] == 20
    assert agent.errors.total == 0


def test_an_unreachable_otlp_endpoint_is_counted_not_raised():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    agent = gradflow_agent.attach(model, config(exporters={"otel": {
        "enabled": True, "endpoint": f"http://127.0.0.1:{free_port()}/v1/metrics", "interval_seconds": 0.2,
        "timeout_seconds": 1.0}}), optimizer=opt)
    _train(agent, model, opt, 5)
    agent.snapshot()
    t0 = time.monotonic()
    agent.detach()
    assert time.monotonic() - t0 < 15
    assert agent.errors.counts["otel"] >= 1


def test_otel_names_translate_back_to_the_prometheus_names():
    """The real OTel Prometheus exporter turns each instrument name + unit into our Prometheus name."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, generate_latest

    from gradflow_agent.export.otel import OtelExporter

    model = _model()
    opt = torch.optim.Adam(model.parameters())
    agent = gradflow_agent.attach(model, config(run={"name": "names"}, stats={"gradients": {"output_grads": True}}),
                                  optimizer=opt)
    _train(agent, model, opt, 6)
    agent.snapshot()  # two intervals (velocity) and a full window (dead units): every statistic has data
    _train(agent, model, opt, 6)
    model(torch.full((1, 8), float("nan")))  # and an issue
    agent.snapshot()
    cfg = gradflow_agent.load_config(config(exporters={"otel": {"enabled": True}})).exporters.otel
    exporter = OtelExporter(agent, cfg, reader=PrometheusMetricReader())
    try:
        text = generate_latest(REGISTRY).decode()
    finally:
        exporter.provider.shutdown()
        agent.detach()
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for metric in ALL:
        if metric.kind == "info" or metric.name in ("gradflow_grad_scale", "gradflow_agent_component_disabled"):
            continue  # info metrics are plain gauges in OTel; no GradScaler here; nothing was disabled
        assert metric.name in exposed, (metric.otel_name, metric.unit)


def test_pushgateway_receives_the_run_grouped_by_run_and_rank(tmp_path):
    with pushgateway(tmp_path) as url:
        model = _model()
        opt = torch.optim.Adam(model.parameters())
        push = {"url": url, "interval_seconds": 0.1, "keep_at_exit": True}
        agent = gradflow_agent.attach(model, config(run={"name": "pushed"}, exporters={"prometheus": {
            "enabled": True, "port": 0, "addr": "127.0.0.1", "pushgateway": push}}), optimizer=opt)
        _train(agent, model, opt, 12)
        agent.detach()
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        steps = [s for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "gradflow_steps_total"]
        assert len(steps) == 1 and steps[0].value == 12
        assert steps[0].labels["job"] == "gradflow" and steps[0].labels["run"] == "pushed"
        assert steps[0].labels["rank"] == "0"
        push["keep_at_exit"] = False  # a second run that cleans up after itself
        agent = gradflow_agent.attach(model, config(run={"name": "pushed"}, exporters={"prometheus": {
            "enabled": True, "port": 0, "addr": "127.0.0.1", "pushgateway": push}}), optimizer=opt)
        agent.detach()
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        assert "gradflow_steps_total" not in text


def test_jsonl_recorder_writes_one_snapshot_per_interval(tmp_path):
    path = tmp_path / "run" / "snapshots.jsonl"
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    agent = gradflow_agent.attach(model, config(sampling={"export_every_n_steps": 5},
                                                exporters={"jsonl": {"enabled": True, "path": str(path)}}),
                                  optimizer=opt)
    _train(agent, model, opt, 20)
    agent.detach()
    records = read_snapshots(path)
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20, 20]
    last = records[-1]
    assert [layer["layer"] for layer in last["layers"]] == ["0", "1", "2", "3", "4"]
    assert last["layers"][0]["grad_pressure"] > 0 and last["layers"][1]["grad_pressure"] is None
    assert last["labels"] == {"run": "default", "rank": "0"}
