"""Thousand-layer models: the series budget, the depth profile, the render thread, paging once.

Real parts: the agent's own /metrics server, a real Prometheus scraping it (and a second one federating
the first), promtool. The 1000-layer model is 1000 Linear(16, 16) layers whose first layer's gradient
is scaled to vanish and whose last layer's gradient is scaled to explode.
"""

from __future__ import annotations

import gzip
import http.server
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import gradflow_agent
from gradflow_agent.export.budget import PER_LAYER_SERIES, Budget, depth_bins, named_layers
from gradflow_agent.export.prometheus import PROMETHEUS_ACCEPT
from tests.conftest import config
from tests.support.prometheus import PrometheusServer, require_binary, rules_without_delay

ROOT = Path(__file__).resolve().parents[1]
FEDERATION = ROOT / "deploy/prometheus/federation/global.yml"
DEPTH = 1000
VANISHING, EXPLODING = 1e-6, 100.0  # the default thresholds


def _deep(depth: int = DEPTH) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(depth)])
    for layer in model:  # near-identity: a healthy gradient reaches every layer
        nn.init.eye_(layer.weight)
        nn.init.zeros_(layer.bias)
    model[0].weight.register_hook(lambda g: g * 1e-12)  # the first block's gradient vanishes
    model[0].bias.register_hook(lambda g: g * 1e-12)
    model[-1].weight.register_hook(lambda g: g * 1e6)  # the last block's explodes
    return model, torch.optim.SGD(model.parameters(), lr=1e-9)


def _train(model: nn.Module, opt: torch.optim.Optimizer, agent, steps: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)


def _scrape(url: str, accept: str | None = None, gz: bool = False) -> tuple[str, dict[str, str]]:
    headers = {}
    if accept:
        headers["Accept"] = accept
    if gz:
        headers["Accept-Encoding"] = "gzip"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
        body = resp.read()
        info = dict(resp.headers)
    if info.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return body.decode(), info


def _series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _value(lines: list[str], name: str, **labels: str) -> list[float]:
    out = []
    for line in lines:
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


@pytest.fixture(scope="module")
def deep_agent():
    """1000 layers, a budget of 2500 per-layer series (a rank's share of 20000 on 8 ranks)."""
    model, opt = _deep()
    cfg = config(exporters={"prometheus": {"enabled": True, "port": 0, "addr": "127.0.0.1",
                                           "series_budget": 2500}})
    agent = gradflow_agent.attach(model, cfg, optimizer=opt)
    _train(model, opt, agent)
    agent.snapshot()
    yield agent
    agent.detach()


def _fresh_scrape(agent) -> list[str]:
    """A scrape of the latest snapshot (the render thread may be one snapshot behind for a moment)."""
    deadline = time.monotonic() + 10
    while True:
        text, _ = _scrape(agent.prometheus_url)
        lines = _series(text)
        stamp = _value(lines, "gradflow_last_snapshot_timestamp_seconds")
        if stamp and abs(stamp[0] - agent.latest.time) < 1e-3 or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_a_thousand_layers_stay_within_the_budget_and_the_whole_depth_is_visible(deep_agent) -> None:
    agent = deep_agent
    lines = _fresh_scrape(agent)
    layer_series = [s for s in lines if 'layer="' in s and not s.startswith("gradflow_issue_extreme")]
    assert len(layer_series) <= 2500, len(layer_series)
    assert len(lines) <= 2500 + 700, len(lines)  # plus the depth profile and the run-wide series
    named = {m.group(1) for s in lines for m in [re.search(r'gradflow_layer_info\{.*layer="([^"]+)"', s)] if m}
    assert len(named) == 2500 // PER_LAYER_SERIES == _value(lines, "gradflow_agent_layers_exported")[0]
    assert {"0", str(DEPTH - 1)} <= named  # both ends are always named
    # the vanishing first block and the exploding last block, in the depth profile and by name
    bins = depth_bins(DEPTH, 32)
    first, last = "00", str(len(bins) - 1)
    assert _value(lines, "gradflow_depth_profile", statistic="grad_pressure", agg="min", bin=first)[0] < VANISHING
    assert _value(lines, "gradflow_depth_profile", statistic="grad_pressure", agg="max", bin=last)[0] > EXPLODING
    assert _value(lines, "gradflow_issue", layer="0", kind="vanishing")
    assert _value(lines, "gradflow_issue", layer=str(DEPTH - 1), kind="exploding")
    # the per-kind counts cover every layer: equal to the detector's own verdict
    issues = agent.issues()
    for kind in {i.kind for i in issues}:
        counted = sum(_value(lines, "gradflow_issue_layers", kind=kind))
        assert counted == sum(1 for i in issues if i.kind == kind), kind
    # every layer is still judged in process and kept in the snapshot
    assert len(agent.latest.layers) == DEPTH


def test_scrapes_serve_bytes_rendered_once_per_snapshot_off_the_training_thread(deep_agent) -> None:
    agent = deep_agent
    app = agent.exporters[0].app
    _scrape(agent.prometheus_url, PROMETHEUS_ACCEPT, gz=True)  # scraped once: rendered ahead from now on
    agent.snapshot()
    deadline = time.monotonic() + 10
    while app._renderings and any(r.snap is not agent.latest for r in app._renderings.values()):
        assert time.monotonic() < deadline, "the render thread did not render the new snapshot"
        time.sleep(0.02)
    before = -1
    while before != app.renders:  # the render thread has finished every format of this snapshot
        before = app.renders
        time.sleep(0.3)
    names = set()
    t0 = time.perf_counter()
    for _ in range(20):
        text, info = _scrape(agent.prometheus_url, PROMETHEUS_ACCEPT, gz=True)
        assert info["Content-Type"].startswith("application/openmetrics-text")
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    per_scrape = (time.perf_counter() - t0) / 20
    assert app.renders == before, f"a scrape rendered the snapshot again ({before} -> {app.renders})"
    assert per_scrape < 0.5, per_scrape  # generous on a loaded 2-core machine; typically a few ms
    plain, info = _scrape(agent.prometheus_url)
    assert info["Content-Type"].startswith("text/plain")
    assert "gradflow_agent_errors_total" in plain  # the live tail
    for line in _series(plain):
        names.add(line.split("{")[0].split(" ")[0])
    assert "gradflow_depth_profile" in names and "gradflow_grad_pressure" in names
    # the threads that rendered are the exporter's, never the training thread
    assert any(t.name == "gradflow-prometheus-render" for t in threading.enumerate())


def test_promtool_accepts_the_folded_scrape(deep_agent, tmp_path: Path) -> None:
    import subprocess
    promtool = require_binary("promtool", "prometheus")
    text, _ = _scrape(deep_agent.prometheus_url)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_max_layers_spreads_over_the_whole_depth_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(100)])
    agent = gradflow_agent.attach(model, config(modules={"max_layers": 10}))
    try:
        names = [layer.name for layer in agent.layers]
        assert len(names) == 10 and names[0] == "0" and names[-1] == "99"
        gaps = {int(b) - int(a) for a, b in zip(names, names[1:])}
        assert max(gaps) - min(gaps) <= 1, names  # evenly spread
        assert agent.layers_skipped == 90
        assert "evenly spread" in caplog.text and "90 left out" in caplog.text
    finally:
        agent.detach()


def test_budget_share_and_unlimited() -> None:
    cfg = gradflow_agent.config.load_config({"exporters": {"prometheus": {"series_budget": 20000}}}, {})
    assert Budget.from_config(cfg.exporters.prometheus, world_size=8).series == 2500
    assert Budget.from_config(cfg.exporters.prometheus, world_size=1).series == 20000
    unlimited = gradflow_agent.config.load_config({"exporters": {"prometheus": {"series_budget": 0}}}, {})
    assert Budget.from_config(unlimited.exporters.prometheus, 8).max_named == 0


# -- a real Prometheus: scrape cost, one page per run, rule evaluation, federation -----------------------

class _Replicas(http.server.ThreadingHTTPServer):
    """Serves one agent's scrape as `ranks` targets (/rank/N: the rank label rewritten), standing in for
    the 8 ranks of a job on this 2-core machine."""

    def __init__(self, text: str, ranks: int) -> None:
        bodies = {f"/rank/{r}": re.sub(r'rank="0"', f'rank="{r}"', text).encode() for r in range(ranks)}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = bodies.get(self.path)
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_eight_ranks_of_a_thousand_layers_page_once_per_kind_and_evaluate_fast(deep_agent, tmp_path: Path) -> None:
    require_binary("prometheus", "prometheus")
    text, _ = _scrape(deep_agent.prometheus_url)
    replicas = _Replicas(text, 8)
    port = replicas.server_address[1]
    cfg = {"scrape_configs": [
        {"job_name": "gradflow-replicas",
         "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                             "labels": {"__metrics_path__": f"/rank/{r}", "instance": f"trainer-{r}:9464"}}
                            for r in range(8)]}] + [
        {"job_name": "gradflow", "static_configs": [{"targets": [deep_agent.prometheus_url.split("/")[2]]}]}]}
    try:
        with PrometheusServer(cfg, rule_files=[rules_without_delay(tmp_path)]) as prom:
            prom.wait_for_targets(9, timeout=30)
            firing = prom.wait_until(
                lambda: [a for a in prom.alerts("firing") if a["labels"]["alertname"] == "GradientVanishing"
                         and a["labels"].get("job") == "gradflow-replicas"],
                timeout=30, what="GradientVanishing for the 8-rank job")
            time.sleep(2)  # a few more evaluations
            alerts = [a for a in prom.alerts("firing") if a["labels"].get("job") == "gradflow-replicas"]
            per_kind: dict[str, int] = {}
            for a in alerts:
                per_kind[a["labels"]["alertname"]] = per_kind.get(a["labels"]["alertname"], 0) + 1
            assert per_kind.get("GradientVanishing") == 1 and per_kind.get("GradientExploding") == 1, per_kind
            assert all(v == 1 for v in per_kind.values()), per_kind
            description = firing[0]["annotations"]["description"]
            assert "First: 0 (" in description, description
            series = prom.query('count({job="gradflow-replicas"})')
            assert float(series[0]["value"][1]) <= 8 * 3200, series  # ~20k for the job
            duration = prom.query('max(scrape_duration_seconds{job="gradflow"})')
            assert float(duration[0]["value"][1]) < 1.0, duration  # the agent's own /metrics
            groups = {g["name"]: g for g in prom.rules()}
            for name in ("gradflow-agent-records", "gradflow-agent"):
                assert groups[name]["evaluationTime"] < 1.0, (name, groups[name]["evaluationTime"])
            _every_panel_has_data(prom, deep_agent.run_name)
    finally:
        replicas.shutdown()


def _exported(prom: PrometheusServer, exprs: list[str]) -> bool:
    """Does the job export every raw series these queries read (a statistic, a depth-profile row)?"""
    text = " ".join(exprs)
    wanted = [f'{{__name__="{n}", job="gradflow-replicas"}}' for n in set(re.findall(r"\bgradflow_[a-z_]+", text))]
    wanted += [f'gradflow_depth_profile{{job="gradflow-replicas", statistic="{st}"}}'
               for st in set(re.findall(r'statistic="(\w+)"', text))]
    return all(prom.query(w) for w in wanted)


def _every_panel_has_data(prom: PrometheusServer, run: str) -> None:
    """Every dashboard panel query returns data for the 8-rank, 1000-layer job (bounded queries only)."""
    import json

    from tests.alerting.test_alerting_e2e import _panels, _substitute
    values = {"job": "gradflow-replicas", "run": run, "rank": "0", "instance": ".+", "layer": ".+",
              "__rate_interval": "10s", "datasource": "prometheus"}
    empty = []
    for path in sorted((ROOT / "grafana/dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in _panels(dashboard):
            if "ALERTS" in json.dumps(panel["targets"]):
                continue  # alert panels: the e2e test; here only some kinds fire
            local = dict(values, layer="0") if path.stem == "gradflow-layer" else values
            exprs = [_substitute(t["expr"], local) for t in panel["targets"]]
            if not _exported(prom, exprs):
                continue  # the statistic does not exist for this model (no bounded activation, ...)
            if not any(prom.query(e) for e in exprs):
                empty.append(f"{path.stem}: {panel['title']}")
    assert not empty, empty


def test_a_global_prometheus_federating_the_per_run_series_fires_the_same_alerts(deep_agent, tmp_path: Path) -> None:
    require_binary("prometheus", "prometheus")
    rules = rules_without_delay(tmp_path)
    local = {"scrape_configs": [{"job_name": "gradflow",
                                 "static_configs": [{"targets": [deep_agent.prometheus_url.split("/")[2]]}]}]}
    with PrometheusServer(local, rule_files=[rules]) as cluster:
        shipped = yaml.safe_load(FEDERATION.read_text(encoding="utf-8"))
        federate = shipped["scrape_configs"][0]
        federate["static_configs"] = [{"targets": [cluster.url.removeprefix("http://")]}]
        federate.setdefault("scrape_interval", "1s")
        shipped.pop("rule_files", None)
        with PrometheusServer({"scrape_configs": [federate]}, rule_files=[rules]) as world:
            alert = world.wait_until(
                lambda: [a for a in world.alerts("firing") if a["labels"]["alertname"] == "GradientVanishing"],
                timeout=40, what="GradientVanishing at the global Prometheus")
            assert alert[0]["labels"]["run"] == deep_agent.run_name and alert[0]["labels"]["job"] == "gradflow"
            assert "First: 0 (" in alert[0]["annotations"]["description"]
            raw = world.query('count({__name__=~"gradflow_.+"})')
            assert not raw, "the global Prometheus should hold only the per-run recorded series"


def test_remote_write_ships_only_the_per_run_series_to_a_long_term_store(deep_agent, tmp_path: Path) -> None:
    """deploy/prometheus/federation/remote-write.yml, pointed at a second Prometheus that accepts remote
    write: the per-run recorded series arrive there, the raw per-layer ones do not."""
    require_binary("prometheus", "prometheus")
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/federation/remote-write.yml").read_text(encoding="utf-8"))
    with PrometheusServer({}, extra_args=["--web.enable-remote-write-receiver"]) as store:
        remote = shipped["remote_write"][0]
        remote["url"] = f"{store.url}/api/v1/write"
        remote.setdefault("queue_config", {})["batch_send_deadline"] = "1s"
        local = {"scrape_configs": [{"job_name": "gradflow",
                                     "static_configs": [{"targets": [deep_agent.prometheus_url.split("/")[2]]}]}],
                 "remote_write": [remote]}
        with PrometheusServer(local, rule_files=[rules_without_delay(tmp_path)]):
            store.wait_until(lambda: store.query('job_run:gradflow_issue_layers:max{kind="vanishing"} > 0'),
                             timeout=40, what="the per-run series at the long-term store")
            assert not store.query('{__name__=~"gradflow_.+"}'), "raw per-layer series left the cluster"


def test_named_layers_selection_unit() -> None:
    import numpy as np

    from gradflow_agent.detect.issues import Issue
    from gradflow_agent.snapshot import LAYER_STATS, NONFINITE_TENSORS, Snapshot
    n = 400
    stats = {k: np.full(n, np.nan) for k in LAYER_STATS}
    stats["grad_pressure"] = np.linspace(1.0, 2.0, n)
    stats["grad_pressure"][123] = 1e-9
    issues = tuple(Issue("dead", str(i), "critical" if i == 300 else "warning", 1.0, 0.5, 10, "", "")
                   for i in range(200, 400))
    snap = Snapshot(step=10, time=0.0, interval_steps=1, layers=tuple(str(i) for i in range(n)),
                    layer_types=("Linear",) * n, stats=stats,
                    nonfinite={t: np.zeros(n) for t in NONFINITE_TENSORS}, grad_norm=1.0, loss=None,
                    counters={}, issues=issues)
    chosen = named_layers(snap, Budget(series=20 * PER_LAYER_SERIES, worst_k=3))
    assert len(chosen) == 20 and chosen == sorted(chosen)
    assert {0, n - 1, 123, 300} <= set(chosen)  # ends, the worst pressure, the critical issue
    assert {n - 2, n - 3} <= set(chosen)  # the largest pressures
    assert named_layers(snap, Budget()) == list(range(n))


def test_a_job_nobody_scrapes_renders_nothing_and_the_first_scrape_is_current() -> None:
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(exporters={"prometheus": {"enabled": True, "port": 0,
                                                                          "addr": "127.0.0.1"}}), optimizer=opt)
    try:
        app = agent.exporters[0].app
        for _ in range(3):
            _train(model, opt, agent, steps=2)
            agent.snapshot()
        time.sleep(0.3)
        assert app.renders == 0  # published three times, scraped never: nothing rendered
        lines = _series(_scrape(agent.prometheus_url)[0])
        assert _value(lines, "gradflow_steps_total") == [6.0]  # the latest snapshot, rendered on demand
        assert app.renders == 1
    finally:
        agent.detach()
