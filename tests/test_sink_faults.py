"""Sinks against endpoints that hang, refuse or fail: bounded close, counted errors, intervals kept, torn files.

Every endpoint is real: a hung endpoint is a local listening socket that never answers (accepting and
holding the connection, or never accepting), a closed one is a port with nothing listening, a failing one
is an HTTP server that answers 503, and the happy path is a real Pushgateway and the OTLP receiver.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradflow_agent
from gradflow_agent.errors import ErrorCounter
from gradflow_agent.export.jsonl import JsonlPathError, JsonlRecorder, read_snapshots, scan_snapshots
from gradflow_agent.export.otel import OtelExporter, resolve_service_name
from gradflow_agent.export.pushgateway import PushgatewaySink
from gradflow_agent.export.worker import BackgroundSink
from gradflow_agent.report.cli import main as report_main
from tests.conftest import config
from tests.support.prometheus import free_port, pushgateway

DETACH_LIMIT = 2.0  # seconds: Agent.detach() whatever the endpoints do


# -- endpoints ----------------------------------------------------------------------------------------
class HungServer:
    """A TCP port that takes connections and never answers: `accept=True` accepts and holds them
    (counting them), `accept=False` only listens (the kernel completes the handshake)."""

    def __init__(self, accept: bool = True) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._thread = None
        if accept:
            self.sock.settimeout(0.05)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._accept, name="test-hung-server", daemon=True)
            self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self._held.append(conn)  # never read, never answered

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
        for conn in self._held:
            conn.close()
        self.sock.close()

    def __enter__(self) -> HungServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FailingServer:
    """An HTTP server that answers every request with 503 and counts the requests."""

    def __init__(self) -> None:
        owner = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def _fail(self):
                owner.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = do_DELETE = _fail  # noqa: N815 - http.server's naming

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="test-failing-server", daemon=True)
        self._thread.start()

    def __enter__(self) -> FailingServer:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def gateway_samples(url: str, name: str) -> list:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def _wait_for(probe, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"no {what} after {timeout} s")


# -- training -----------------------------------------------------------------------------------------
def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def _train(agent, model, opt, steps: int | None = None, seconds: float | None = None) -> int:
    done, t0 = 0, time.monotonic()
    while (steps is not None and done < steps) or (seconds is not None and time.monotonic() - t0 < seconds):
        x = torch.randn(16, 8)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)
        done += 1
        if seconds is not None:
            time.sleep(0.01)
    return done


def _attach(**exporters):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    sections = {"exporters": exporters}
    if "sampling" in exporters:
        sections["sampling"] = exporters.pop("sampling")
    agent = gradflow_agent.attach(model, config(**sections), optimizer=opt)
    return agent, model, opt


def _push_cfg(url: str, **kw) -> dict:
    return {"prometheus": {"enabled": True, "port": 0, "addr": "127.0.0.1",
                           "pushgateway": {"url": url, **kw}}}


def _our_threads(before: set) -> list[str]:
    """Threads started since `before` that are still alive: ours (gradflow-*) and the OTel SDK's reader."""
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


def _timed_detach(agent) -> float:
    t0 = time.monotonic()
    agent.detach()
    return time.monotonic() - t0


# -- Pushgateway --------------------------------------------------------------------------------------
def _direct_pushgateway(url: str, errors: ErrorCounter, **kw) -> tuple[BackgroundSink, PushgatewaySink]:
    registry = CollectorRegistry()
    Gauge("gradflow_test_value", "a value", registry=registry).set(1)
    cfg = gradflow_agent.load_config(config(exporters=_push_cfg(url, **kw))).exporters.prometheus.pushgateway
    sink = PushgatewaySink(registry, cfg, {"run": "faults", "rank": "0"})
    return BackgroundSink(sink, errors, "pushgateway"), sink


@pytest.mark.parametrize("accept", [True, False], ids=["accepts-never-answers", "listens-never-accepts"])
def test_pushgateway_close_returns_by_its_deadline_on_a_hung_gateway(accept):
    with HungServer(accept=accept) as server:
        before = set(threading.enumerate())
        errors = ErrorCounter()
        worker, sink = _direct_pushgateway(server.url, errors, interval_seconds=0.2)  # 2 s request timeout
        worker.publish(object())
        time.sleep(0.3)  # the interval push is now blocked in its read
        t0 = time.monotonic()
        worker.close(deadline=t0 + 1.0)
        took = time.monotonic() - t0
        assert took < 1.1, took
        assert _our_threads(before) == []
        assert errors.counts["pushgateway"] >= 1


@pytest.mark.parametrize("accept", [True, False], ids=["accepts-never-answers", "listens-never-accepts"])
def test_detach_is_bounded_and_stops_the_push_thread_on_a_hung_gateway(accept):
    with HungServer(accept=accept) as server:
        before = set(threading.enumerate())
        agent, model, opt = _attach(**_push_cfg(server.url, interval_seconds=0.5),
                                    sampling={"export_every_n_steps": 1})
        _train(agent, model, opt, seconds=0.6)  # an interval push is in flight (2 s timeout)
        took = _timed_detach(agent)
        assert took < DETACH_LIMIT, took
        assert _our_threads(before) == []
        assert agent.errors.counts["pushgateway"] >= 1
        pushes = server.accepted
        time.sleep(0.6)
        assert server.accepted == pushes  # nothing pushes after detach


def test_pushgateway_keeps_its_interval_after_failures():
    """A gateway that fails fast (503) must not be hammered: at most one push per interval."""
    with FailingServer() as server:
        agent, model, opt = _attach(**_push_cfg(server.url, interval_seconds=0.5, keep_at_exit=False),
                                    sampling={"export_every_n_steps": 1})
        t0 = time.monotonic()
        steps = _train(agent, model, opt, seconds=2.5)
        during = server.requests
        elapsed = time.monotonic() - t0
        took = _timed_detach(agent)
        assert steps > 50  # a snapshot (and a chance to push) at every step
        assert 1 <= during <= elapsed / 0.5 + 1, during
        assert agent.errors.counts["pushgateway"] >= during
        assert took < DETACH_LIMIT


def test_pushgateway_timeout_is_the_configured_one():
    with HungServer() as server:
        errors = ErrorCounter()
        worker, sink = _direct_pushgateway(server.url, errors, timeout_seconds=0.3, interval_seconds=60.0)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            sink.publish(object())  # on this thread: one push, bounded by timeout_seconds
        assert 0.25 < time.monotonic() - t0 < 1.0
        worker.close(deadline=time.monotonic() + 0.5)


def test_a_refused_gateway_is_counted_and_detach_is_quick():
    before = set(threading.enumerate())
    agent, model, opt = _attach(**_push_cfg(f"http://127.0.0.1:{free_port()}", interval_seconds=0.2))
    _train(agent, model, opt, steps=5)
    took = _timed_detach(agent)
    assert took < DETACH_LIMIT
    assert agent.errors.counts["pushgateway"] >= 2  # the push at attach and the final push
    assert _our_threads(before) == []


def test_a_working_pushgateway_has_the_final_snapshot_after_detach(tmp_path):
    with pushgateway(tmp_path) as url:
        agent, model, opt = _attach(**_push_cfg(url, interval_seconds=60.0, keep_at_exit=True))
        first = _wait_for(lambda: gateway_samples(url, "gradflow_steps_total"), what="the push at attach")
        assert first[0].value == 0
        _train(agent, model, opt, steps=12)  # no interval push: the last state comes from close
        took = _timed_detach(agent)
        steps = gateway_samples(url, "gradflow_steps_total")
        assert len(steps) == 1 and steps[0].value == 12
        assert steps[0].labels["run"] == "default" and steps[0].labels["rank"] == "0"
        assert took < DETACH_LIMIT and agent.errors.total == 0


def test_pushgateway_close_pushes_the_latest_state_directly(tmp_path):
    with pushgateway(tmp_path) as url:
        errors = ErrorCounter()
        worker, sink = _direct_pushgateway(url, errors, interval_seconds=60.0)
        worker.close(deadline=time.monotonic() + 1.0)
        assert [s.value for s in gateway_samples(url, "gradflow_test_value")] == [1.0]
        assert errors.total == 0


EXIT_SCRIPT = """
import sys, time, torch
from torch import nn
import gradflow_agent
url, detach = sys.argv[1], sys.argv[2] == "detach"
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters())
agent = gradflow_agent.attach(model, {
    "exporters": {"prometheus": {"enabled": True, "port": 0, "addr": "127.0.0.1",
                                 "pushgateway": {"url": url, "interval_seconds": 0.3}},
                  "otel": {"enabled": True, "endpoint": url + "/v1/metrics", "interval_seconds": 0.2}},
    "sampling": {"export_every_n_steps": 1}}, optimizer=opt)
t0 = time.monotonic()
while time.monotonic() - t0 < 0.8:
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad(); agent.step(loss=loss)
    time.sleep(0.01)
if detach:
    agent.detach()
print("exiting", flush=True)
"""


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "not-detached"])
def test_a_process_with_hung_endpoints_exits_cleanly_and_promptly(detach, tmp_path):
    """Before: a 40 s detach, push threads alive at exit, once `terminate called without an active exception`."""
    stderr = tmp_path / "stderr.txt"
    with HungServer() as server, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", EXIT_SCRIPT, server.url, "detach" if detach else "exit"],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout.readline().strip() == "exiting"
            t0 = time.monotonic()
            rc = proc.wait(30)
            exit_took = time.monotonic() - t0
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    text = stderr.read_text()
    assert rc == 0, text[-2000:]
    assert "terminate called" not in text
    # after a detach nothing is left to wait for; without one, the sinks' atexit closes are bounded
    assert exit_took < (1.5 if detach else DETACH_LIMIT + 1.0), exit_took


# -- OpenTelemetry ------------------------------------------------------------------------------------
def _otel_cfg(endpoint: str, **kw) -> dict:
    return {"otel": {"enabled": True, "endpoint": endpoint, **kw}}


def test_detach_is_bounded_with_a_closed_otlp_endpoint():
    before = set(threading.enumerate())
    agent, model, opt = _attach(**_otel_cfg(f"http://127.0.0.1:{free_port()}/v1/metrics"))  # 10 s interval
    _train(agent, model, opt, steps=5)
    took = _timed_detach(agent)
    assert took < DETACH_LIMIT, took
    assert agent.errors.counts["otel"] >= 1  # the final flush of a short run failed: visible
    assert _our_threads(before) == []


@pytest.mark.parametrize("accept", [True, False], ids=["accepts-never-answers", "listens-never-accepts"])
def test_detach_is_bounded_with_a_hung_otlp_endpoint(accept):
    with HungServer(accept=accept) as server:
        before = set(threading.enumerate())
        agent, model, opt = _attach(**_otel_cfg(f"{server.url}/v1/metrics", interval_seconds=0.2))
        _train(agent, model, opt, steps=5)
        time.sleep(0.4)  # a periodic export is blocked in its read (10 s timeout)
        took = _timed_detach(agent)
        assert took < DETACH_LIMIT, took
        assert agent.errors.counts["otel"] >= 1
        assert _our_threads(before) == []  # the SDK's reader thread too


def test_otel_close_returns_by_its_deadline():
    with HungServer() as server:
        agent, model, opt = _attach()
        before = set(threading.enumerate())
        cfg = gradflow_agent.load_config(config(exporters=_otel_cfg(f"{server.url}/v1/metrics",
                                                                    interval_seconds=0.1))).exporters.otel
        exporter = OtelExporter(agent, cfg)
        time.sleep(0.3)
        t0 = time.monotonic()
        exporter.close(deadline=t0 + 0.8)
        took = time.monotonic() - t0
        agent.detach()
        assert took < 0.9, took
        assert _our_threads(before) == []
        assert agent.errors.counts["otel"] >= 1


def test_otel_service_name_follows_the_standard_variables(monkeypatch):
    def name(**otel):
        return resolve_service_name(gradflow_agent.load_config(config(exporters={"otel": otel})).exporters.otel)

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert name() == "gradflow-agent"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,team=ml")
    assert name() == "from-attributes"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert name() == "from-env"
    assert name(service_name="explicit") == "explicit"


def test_otel_service_name_from_the_environment_reaches_the_receiver(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trainer-7")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    port = free_port()
    out = tmp_path / "received.jsonl"
    receiver = subprocess.Popen([sys.executable, "-m", "tests.support.otlp_receiver", str(port), str(out)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        agent, model, opt = _attach(**_otel_cfg(f"http://127.0.0.1:{port}/v1/metrics"))
        _train(agent, model, opt, steps=3)
        took = _timed_detach(agent)  # the final flush is the only export
    finally:
        receiver.terminate()
        receiver.wait(10)
    resource = json.loads(out.read_text().splitlines()[0])["resource"]
    assert resource["service.name"] == "trainer-7" and resource["deployment.environment"] == "test"
    assert resource["run"] == "default"
    assert agent.errors.total == 0 and took < DETACH_LIMIT


# -- JSONL --------------------------------------------------------------------------------------------
def _record(path, steps: int) -> None:
    agent, model, opt = _attach(jsonl={"enabled": True, "path": str(path)})
    _train(agent, model, opt, steps=steps)
    agent.detach()


def test_a_torn_last_line_is_skipped_with_one_warning_and_a_resumed_run_stays_intact(tmp_path, caplog):
    path = tmp_path / "run.jsonl"
    _record(path, 3)  # two records: attach and detach
    data = path.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    path.write_bytes(data + last[: len(last) // 2])  # a third record, killed mid-write
    with caplog.at_level(logging.WARNING, logger="gradflow_agent"):
        records = read_snapshots(path)
    assert [r["step"] for r in records] == [0, 3]
    warnings = [r.getMessage() for r in caplog.records if r.name == "gradflow_agent"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "line 3" in warnings[0]

    _record(path, 2)  # a resumed run appends to the torn file
    result = scan_snapshots(path)
    assert [r["step"] for r in result.records] == [0, 3, 0, 2]  # nothing glued to the torn tail
    assert result.skipped_lines == [3]
    assert path.read_bytes().endswith(b"\n")


def test_the_report_cli_reads_a_torn_file(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    _record(path, 4)
    with open(path, "ab") as fh:
        fh.write(b'{"step": 9, "layers": [{"layer": "0", "grad_pre')
    assert report_main([str(path), "--format", "text", "-o", str(tmp_path / "r.txt")]) == 0
    captured = capsys.readouterr()
    assert "report of 2 snapshots" in captured.out and "1 undecodable lines skipped" in captured.out
    assert "line 3" in captured.err and str(path) in captured.err


def test_a_recorder_path_that_cannot_be_opened_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(JsonlPathError, match=r"exporters\.jsonl\.path .*not-a-dir.*cannot be opened"):
        JsonlRecorder(str(blocker / "run.jsonl"), {})
    with pytest.raises(JsonlPathError, match="cannot be opened"):
        JsonlRecorder(str(tmp_path), {})  # a directory


# -- BackgroundSink -----------------------------------------------------------------------------------
class _SlowSink:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.published: list = []
        self.closed_with = None

    def publish(self, snap) -> None:
        time.sleep(self.seconds)
        self.published.append(snap)

    def close(self, deadline=None) -> None:
        self.closed_with = deadline


def test_background_close_drains_what_fits_then_closes_and_counts_the_rest():
    errors = ErrorCounter()
    sink = _SlowSink(0.1)
    worker = BackgroundSink(sink, errors, "slow")
    for i in range(30):  # 3 s of work
        worker.publish(i)
    t0 = time.monotonic()
    deadline = t0 + 0.6
    worker.close(deadline)
    assert time.monotonic() - t0 < 0.7
    assert not worker._thread.is_alive()
    assert sink.closed_with == deadline
    assert 3 <= len(sink.published) < 30 and sink.published == list(range(len(sink.published)))
    assert worker.dropped == 30 - len(sink.published)
    assert errors.counts["slow"] >= 1


def test_background_close_is_bounded_when_the_sink_never_returns():
    errors = ErrorCounter()
    release = threading.Event()

    class Stuck:
        def publish(self, snap):
            release.wait(30)

        def close(self, deadline=None):
            raise RuntimeError("never reached in time")

    worker = BackgroundSink(Stuck(), errors, "stuck")
    worker.publish(1)
    time.sleep(0.05)
    t0 = time.monotonic()
    worker.close(t0 + 0.3)  # never raises
    assert time.monotonic() - t0 < 0.4
    assert errors.counts["stuck"] >= 1
    release.set()
    worker._thread.join(2)
    assert not worker._thread.is_alive()


def test_background_close_without_a_deadline_is_bounded_and_close_errors_are_counted():
    errors = ErrorCounter()

    class Failing:
        def publish(self, snap):
            raise ValueError("publish failed")

        def close(self, deadline=None):
            raise OSError("close failed")

    worker = BackgroundSink(Failing(), errors, "failing")
    worker.publish(1)
    t0 = time.monotonic()
    worker.close()
    worker.close()  # idempotent
    worker.publish(2)  # after close: ignored
    assert time.monotonic() - t0 < 2.0
    assert errors.counts["failing"] == 2


def test_pushgateway_without_the_http_server_still_pushes(tmp_path):
    """`prometheus.enabled: false` with a Pushgateway URL (a batch job nobody scrapes) pushes its registry."""
    with pushgateway(tmp_path) as url:
        cfg = {"prometheus": {"enabled": False, "pushgateway": {"url": url, "interval_seconds": 60.0}}}
        agent, model, opt = _attach(**cfg)
        assert agent.prometheus_url is None
        _train(agent, model, opt, steps=5)
        agent.detach()
        steps = gateway_samples(url, "gradflow_steps_total")
        assert len(steps) == 1 and steps[0].value == 5 and agent.errors.total == 0
