"""End to end: real demo trainers, a real Prometheus with the shipped rules, a real Alertmanager.

One stack for the module: every `gradflow-agent demo` pathology and a healthy run train at the same
time, each a scrape target of one Prometheus (1 s scrape and evaluation intervals) that loads the
shipped rule file, plus one target where nothing listens. The assertions read what Prometheus recorded
(`ALERTS`, the agents' `gradflow_issue`) over the whole run, so they do not depend on when a test runs.

The one change to the shipped rules is `for:` -> 0s (5s for GradflowAgentDown, so that a scrape that
times out on this loaded machine is not an outage): the shipped durations, up to 10 minutes, are pinned
by the promtool unit tests instead. Thresholds and expressions are the shipped ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradflow_agent.alerting.rules import ALERTS
from tests.support.prometheus import PrometheusServer, free_port, require_binary, rules_without_delay

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules/gradflow-alerts.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy/alertmanager/alertmanager.yml"
DASHBOARDS = ROOT / "grafana/dashboards"

#: The demo's pathology -> the alert it must fire (and no other).
EXPECTED = {
    "vanishing": "GradientVanishing",
    "exploding": "GradientExploding",
    "dead": "DeadNeurons",
    "nonfinite": "NonFiniteValues",
    "saturated": "ActivationSaturation",
    "stalled": "TrainingStalled",
    "unstable": "GradientUnstable",
}
KIND = {a.name: a.kind for a in ALERTS}
STEPS = 150
JOB = "gradflow"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval becomes in these checks (1 s scrapes)


class _Webhook(BaseHTTPRequestHandler):
    """Alertmanager's webhook receiver: keeps every notification, keyed by the request path."""

    received: list[tuple[str, dict[str, Any]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Stack:
    prometheus: PrometheusServer
    instances: dict[str, str]  # pathology ("healthy", "ghost", ...) -> instance label
    start: float
    webhook: type[_Webhook]
    demo_logs: dict[str, Path] = field(default_factory=dict)

    def pathology_of(self, instance: str) -> str:
        return {v: k for k, v in self.instances.items()}[instance]

    def ever(self, expr: str) -> list[dict[str, Any]]:
        """Series of `expr` that had a sample at any time since the stack started."""
        window = max(1, int(time.time() - self.start) + 5)
        return self.prometheus.query(f"max_over_time(({expr})[{window}s:1s])")


def _alertmanager_config(webhook_url: str) -> dict[str, Any]:
    """The shipped routing tree and inhibitions, every receiver pointed at the test's webhook and every
    wait shortened so that a notification arrives within seconds."""
    cfg = yaml.safe_load(ALERTMANAGER_CONFIG.read_text(encoding="utf-8"))

    def fast(route: dict[str, Any]) -> None:
        for key, value in (("group_wait", "0s"), ("group_interval", "1s"), ("repeat_interval", "1h")):
            if key in route or route is cfg["route"]:
                route[key] = value
        for child in route.get("routes", []):
            fast(child)

    fast(cfg["route"])
    for receiver in cfg["receivers"]:
        receiver.pop("webhook_configs", None)
        receiver["webhook_configs"] = [{"url": f"{webhook_url}/{receiver['name']}", "send_resolved": False}]
    return cfg


def _start_demo(pathology: str | None, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "gradflow_agent", "demo", "--steps", str(STEPS), "--port", str(port),
            "--addr", "127.0.0.1", "--linger", "150", "--step-delay", "0.02", "--quiet"]
    if pathology:
        args += ["--pathology", pathology]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("GRADFLOW_")}
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=ROOT, start_new_session=True)


def _listening(instance: str) -> bool:
    host, port = instance.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the demo detaches the agent on KeyboardInterrupt
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def stack():
    """The whole stack, up and past the end of every demo's training."""
    alertmanager_bin = require_binary("prometheus-alertmanager", "prometheus-alertmanager")
    require_binary("prometheus", "prometheus")
    tmp = Path(tempfile.mkdtemp(prefix="gradflow-e2e-"))
    procs: list[subprocess.Popen[bytes]] = []
    webhook_server = None
    prometheus = None
    try:
        _Webhook.received = []
        webhook_server = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
        threading.Thread(target=webhook_server.serve_forever, daemon=True).start()
        webhook_url = f"http://127.0.0.1:{webhook_server.server_address[1]}"

        am_port = free_port()
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump(_alertmanager_config(webhook_url)), encoding="utf-8")
        with open(tmp / "alertmanager.log", "wb") as am_log:
            procs.append(subprocess.Popen(
                [alertmanager_bin, f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'am'}",
                 f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                stdout=am_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

        instances: dict[str, str] = {}
        logs: dict[str, Path] = {}
        demos: dict[str, subprocess.Popen[bytes]] = {}
        for pathology in ("healthy", *EXPECTED):
            port = free_port()
            instances[pathology] = f"127.0.0.1:{port}"
            logs[pathology] = tmp / f"demo-{pathology}.log"
            demos[pathology] = _start_demo(None if pathology == "healthy" else pathology, port, logs[pathology])
            procs.append(demos[pathology])
        instances["ghost"] = f"127.0.0.1:{free_port()}"  # nothing listens there: GradflowAgentDown

        def explain() -> str:
            return "\n".join(f"--- {p} ---\n" + logs[p].read_text(errors="replace")[-1500:] for p in logs)

        # Scrape only once every demo listens, so that a demo importing torch is not a down target.
        deadline = time.monotonic() + 90
        for pathology, instance in instances.items():
            if pathology == "ghost":
                continue
            while not _listening(instance):
                if demos[pathology].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"demo {pathology} does not serve /metrics on {instance}\n{explain()}",
                                pytrace=False)
                time.sleep(0.2)

        config = {
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": sorted(instances.values())}]}],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
        }
        # the shipped rules, `for:` -> 0s (5s for GradflowAgentDown; TrainingHung keeps its own: the demos
        # linger without stepping by design)
        rules = rules_without_delay(tmp, keep=("TrainingHung",), durations={"GradflowAgentDown": "5s"})
        prometheus = PrometheusServer(config, rule_files=[rules]).start()
        start = time.time()
        stack = Stack(prometheus, instances, start, _Webhook, logs)
        try:
            prometheus.wait_for_targets(len(EXPECTED) + 1, timeout=60)
            # Training is over when no run has published a snapshot for 3 s (they publish every second
            # while they train); then let the rules evaluate the final state.
            prometheus.wait_until(
                lambda: len(prometheus.query(f'time() - gradflow_last_snapshot_timestamp_seconds{{job="{JOB}"}} > 3'))
                == len(EXPECTED) + 1, timeout=120, what="every demo to finish training", interval=1)
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{explain()}", pytrace=False)
        time.sleep(3)
        yield stack
    finally:
        for proc in procs:
            _stop(proc)
        if prometheus is not None:
            prometheus.stop()
        if webhook_server is not None:
            webhook_server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _pathology(stack: Stack, labels: dict[str, str]) -> str:
    """Per-target alerts carry the instance; per-run alerts the run (`demo-<pathology>`, or `demo`)."""
    if "instance" in labels:
        return stack.pathology_of(labels["instance"])
    run = labels.get("run", "")
    return run.removeprefix("demo-") if run.startswith("demo-") else "healthy"


def _fired(stack: Stack) -> dict[str, dict[str, int]]:
    """pathology -> alert name -> how many distinct alerts (label sets) of it fired at any time."""
    out: dict[str, dict[str, int]] = {}
    for series in stack.ever('ALERTS{alertstate="firing"}'):
        names = out.setdefault(_pathology(stack, series["metric"]), {})
        names[series["metric"]["alertname"]] = names.get(series["metric"]["alertname"], 0) + 1
    return out


def _flagged(stack: Stack, pathology: str, kind: str) -> set[str]:
    """Layers the in-process detector flagged with `kind` at any time (the agent's gradflow_issue)."""
    instance = stack.instances[pathology]
    return {s["metric"]["layer"]
            for s in stack.ever(f'gradflow_issue{{instance="{instance}", kind="{kind}"}}')}


def test_every_rule_loads_and_evaluates(stack: Stack) -> None:
    rules = [r for g in stack.prometheus.rules() for r in g["rules"]]
    shipped = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    assert len(rules) == sum(len(g["rules"]) for g in shipped)
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad


#: Alert -> the raw metric its threshold reads, shown when an assertion fails.
RAW = {
    "GradientVanishing": "gradflow_grad_pressure", "GradientExploding": "gradflow_grad_pressure",
    "DeadNeurons": "gradflow_activation_dead_unit_ratio", "NonFiniteValues": "gradflow_nonfinite_total",
    "GradientUnstable": "gradflow_grad_turbulence", "ActivationSaturation": "gradflow_activation_saturation_ratio",
    "TrainingStalled": "gradflow_update_ratio",
}


def _history(stack: Stack, pathology: str, fired: dict[str, int]) -> str:
    """What Prometheus recorded for the alerts that fired: their raw metric, the steps, the issues."""
    instance = stack.instances[pathology]
    lines = []
    exprs = [f'gradflow_steps_total{{instance="{instance}"}}', f'gradflow_issue{{instance="{instance}"}}',
             f'ALERTS{{instance="{instance}", alertstate="firing"}}']
    for name in fired:
        if name in RAW:
            exprs.append(f'{RAW[name]}{{instance="{instance}"}}')
    for expr in exprs:
        for series in stack.prometheus.query_range(expr, stack.start, time.time(), step=1):
            labels = {k: v for k, v in series["metric"].items() if k not in ("instance", "job", "rank", "run")}
            points = [f"{float(t) - stack.start:.0f}s={float(v):.3g}" for t, v in series["values"]]
            lines.append(f"  {labels}: {' '.join(points[:40])}")
    return "\n".join(lines)


@pytest.mark.parametrize("pathology", sorted(EXPECTED))
def test_pathology_pages_once_with_its_alert_naming_the_flagged_layers(stack: Stack, pathology: str) -> None:
    """Its own alert and no other, once for the run (one label set), and the first and worst layer
    its annotation names are layers the in-process detector flagged."""
    alert = EXPECTED[pathology]
    fired = _fired(stack).get(pathology, {})
    assert set(fired) == {alert}, (
        f"demo --pathology {pathology}: expected only {alert} to fire, Prometheus fired {fired}\n"
        f"{_history(stack, pathology, fired)}")
    assert fired[alert] == 1, f"{alert} paged {fired[alert]} times for one run\n{_history(stack, pathology, fired)}"
    flagged = _flagged(stack, pathology, KIND[alert])
    notes = [a for path, body in stack.webhook.received for a in body["alerts"]
             if a["labels"].get("alertname") == alert and a["labels"].get("run") == f"demo-{pathology}"]
    assert notes, f"no notification of {alert} reached Alertmanager's receiver"
    named = re.findall(r"(?:First|worst): (\S+) \(", notes[-1]["annotations"]["description"])
    assert len(named) == 2 and set(named) <= flagged, (notes[-1]["annotations"]["description"], sorted(flagged))


def test_healthy_run_fires_nothing(stack: Stack) -> None:
    fired = _fired(stack).get("healthy", {})
    # TrainingHung aside: every demo of the stack stops stepping and lingers by design (its own test)
    pending = [s["metric"] for s in stack.ever(f'ALERTS{{instance="{stack.instances["healthy"]}", '
                                                f'alertname!="TrainingHung"}}')]
    assert not fired and not pending, f"healthy demo: {fired or pending}"


def test_missing_target_fires_agent_down(stack: Stack) -> None:
    ghost = stack.instances["ghost"]
    stack.prometheus.wait_until(  # down since its first scrape, then `for: 5s`
        lambda: stack.prometheus.query(f'ALERTS{{instance="{ghost}", alertstate="firing"}}'), timeout=30,
        what="GradflowAgentDown on the target where nothing listens")
    # the 1 s-step subquery behind _fired() sees a sample only once an aligned step has passed it
    stack.prometheus.wait_until(lambda: _fired(stack).get("ghost"), timeout=10, what="the alert in the history")
    assert _fired(stack).get("ghost") == {"GradflowAgentDown": 1}


def test_alertmanager_routes_a_firing_alert_to_the_webhook(stack: Stack) -> None:
    def page() -> list[dict[str, Any]]:
        return [a for path, body in stack.webhook.received if path.endswith("/gradflow-page")
                for a in body["alerts"] if a["labels"].get("alertname") == "GradientExploding"]

    alerts = stack.prometheus.wait_until(page, timeout=20, what="GradientExploding at the page receiver")
    labels = alerts[0]["labels"]
    assert labels["severity"] == "critical" and labels["run"] == "demo-exploding" and "layer" not in labels
    assert "layer(s) of run demo-exploding" in alerts[0]["annotations"]["summary"]
    assert alerts[0]["annotations"]["runbook_url"].endswith("/GradientExploding.md")
    # Warnings go to the default receiver, never to the pager.
    default = {a["labels"]["alertname"] for path, body in stack.webhook.received
               if path.endswith("/gradflow-default") for a in body["alerts"]}
    paged = {a["labels"]["alertname"] for path, body in stack.webhook.received
             if path.endswith("/gradflow-page") for a in body["alerts"]}
    assert paged <= {"GradientExploding", "NonFiniteValues"}, paged
    assert default & {"GradientVanishing", "DeadNeurons", "TrainingStalled"}, default


# --- dashboards against the data of the demo runs ----------------------------------------------------

def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.extend(panel.get("panels", []))
        if panel["type"] != "row":
            out.append(panel)
    return out


def _substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation for these dashboards: `$name` and `${name}`."""
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def _dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def _exported(stack: Stack, exprs: list[str]) -> bool:
    """Did the demo job ever export every raw series these queries read: each `gradflow_*` name and each
    `statistic="..."` of the depth profile? (The demo MLPs have no attention and no MoE router.)"""
    text = " ".join(exprs)
    wanted = [f'{{__name__="{n}", job="{JOB}"}}' for n in sorted(set(re.findall(r"\bgradflow_[a-z_]+", text)))]
    wanted += [f'gradflow_depth_profile{{job="{JOB}", statistic="{st}"}}'
               for st in sorted(set(re.findall(r'statistic="(\w+)"', text)))]
    return all(stack.ever(w) for w in wanted)


@pytest.mark.parametrize("path", _dashboard_files(), ids=lambda p: p.stem)
def test_every_panel_query_returns_data_for_the_demo_runs(stack: Stack, path: Path) -> None:
    """Every panel returns data, except one reading a statistic the demo job never exports at all
    (attention, MoE routers: tests/test_hf_end_to_end.py checks those panels)."""
    prom = stack.prometheus
    runs = sorted({s["metric"]["run"] for s in prom.query(f'gradflow_steps_total{{job="{JOB}"}}')})
    layers = sorted({s["metric"]["layer"] for s in prom.query(f'gradflow_layer_info{{job="{JOB}"}}')})
    live = sorted(v for k, v in stack.instances.items() if k != "ghost")
    values = {
        "job": JOB, "run": f"({'|'.join(runs)})", "rank": "0", "instance": f"({'|'.join(live)})",
        "layer": f"({'|'.join(layers)})", "__rate_interval": RATE_INTERVAL, "datasource": "prometheus",
    }
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    end = time.time()
    empty, checked = [], []
    for panel in _panels(dashboard):
        if not _exported(stack, [_substitute(t["expr"], values) for t in panel["targets"]]):
            continue
        checked.append(panel["title"])
        got_data = False
        for target in panel["targets"]:
            expr = _substitute(target["expr"], values)
            if target.get("instant"):
                result = prom.query(expr, at=end)
            else:
                result = prom.query_range(expr, stack.start, end, step=2)
            got_data = got_data or bool(result)
        if not got_data:
            empty.append(panel["title"])
    assert checked, f"{path.name}: no panel reads only statistics the demo runs export"
    assert not empty, f"{path.name}: panels without data: {empty}"
