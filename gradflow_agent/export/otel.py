"""OpenTelemetry exporter: observable instruments fed from the latest snapshot, pushed over OTLP/HTTP.

The MeterProvider is private to the agent (never the global one) and created lazily in the process
that trains (the SDK's reader thread is not fork-safe). Callbacks run at collection time on the
reader's thread and read only the last published snapshot. Failed exports are counted in
gradflow_agent_errors_total{component="otel"}.

Bounded by time: every OTLP request waits at most `timeout_seconds`, and at close no longer than the
close deadline leaves. A failed request is not retried with the exporter's own backoff (which could
sleep past a deadline): the next periodic export is the retry, and a stale keep-alive connection is
retried once at once. `close(deadline)` gives the final flush the time left but a short reserve for the
SDK's shutdown (which then sends nothing: its last collection would repeat the flush); at the end of the
flush's share it shuts down the sockets of a request still blocked, so that the reader's thread ends and
is joined by the deadline.

Service name: an explicit `service_name` other than the default (gradflow-agent) wins; otherwise the
standard `OTEL_SERVICE_NAME`, then `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, then the default.
Other `OTEL_RESOURCE_ATTRIBUTES` are kept, below the agent's own attributes (run, rank, labels).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

import requests
import urllib3
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExportResult, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .. import __version__
from .budget import Budget
from .metrics import ALL, samples
from .worker import ABORT_MARGIN, SocketAborter, begin_close, close_at_exit

DEFAULT_SERVICE_NAME = "gradflow-agent"  # exporters.otel.service_name in default.yaml
_SHUTDOWN_RESERVE = 0.1  # seconds of a close kept for the SDK's shutdown (thread joins, no network)


class OtlpRequestError(Exception):
    """An OTLP request failed or ran out of time; not a `requests` error, so the exporter does not back off."""


def _tracked_pool_classes(aborter: SocketAborter) -> dict[str, type]:
    """urllib3 pool classes whose connections register their sockets with `aborter`."""
    class HTTPConnection(urllib3.connection.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            aborter.add(self.sock)

    class HTTPSConnection(urllib3.connection.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            aborter.add(self.sock)

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = HTTPConnection

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = HTTPSConnection

    for cls, like in ((HTTPConnection, urllib3.connection.HTTPConnection),
                      (HTTPSConnection, urllib3.connection.HTTPSConnection),
                      (HTTPPool, HTTPConnectionPool), (HTTPSPool, HTTPSConnectionPool)):
        cls.__name__ = cls.__qualname__ = like.__name__  # error messages name the familiar classes
    return {"http": HTTPPool, "https": HTTPSPool}


class _TrackedAdapter(HTTPAdapter):
    def __init__(self, aborter: SocketAborter) -> None:
        self._pool_classes = _tracked_pool_classes(aborter)
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy: str, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        if type(manager) is urllib3.ProxyManager:  # not SOCKS: it has pool classes of its own
            manager.pool_classes_by_scheme = self._pool_classes
        return manager


class DeadlineSession(requests.Session):
    """The OTLP exporter's HTTP session: every request ends by the export's or the close's deadline.

    `export_window(seconds)` bounds the requests of the current export (per thread); `close_by(t)`
    bounds every later request by the absolute monotonic time `t`; `abort()` ends the requests in
    flight by shutting their sockets down. Failures are raised as OtlpRequestError.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aborter = SocketAborter()
        self._close_deadline: float | None = None
        self._local = threading.local()
        adapter = _TrackedAdapter(self.aborter)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def export_window(self, seconds: float | None) -> None:
        """Bound this thread's requests to `seconds` from now (None: no export bound)."""
        self._local.deadline = None if seconds is None else time.monotonic() + seconds

    def close_by(self, deadline: float) -> None:
        """Every later request ends by `deadline` (absolute monotonic)."""
        self._close_deadline = deadline

    def abort(self) -> None:
        """End the requests in flight now (their sockets are shut down); later ones fail at once."""
        self.aborter.abort()

    def _end(self) -> float:
        ends = [t for t in (getattr(self._local, "deadline", None), self._close_deadline) if t is not None]
        return min(ends) if ends else float("inf")

    def request(self, method, url, *args, timeout=None, **kwargs) -> requests.Response:
        """`Session.request` with the timeout bounded by the deadlines and one immediate retry."""
        for attempt in range(2):
            left = self._end() - time.monotonic()
            if left <= 0 or self.aborter.aborted:
                raise OtlpRequestError(f"OTLP request to {url}: no time left before the deadline")
            bound = left if timeout is None else min(timeout, left)
            try:
                return super().request(method, url, *args, timeout=bound, **kwargs)
            except requests.ConnectionError as exc:
                # Once more at once: a keep-alive connection the collector closed between exports.
                if attempt or isinstance(exc, requests.ConnectTimeout) or self.aborter.aborted:
                    raise OtlpRequestError(f"OTLP request to {url} failed: {exc}") from exc
                first = exc
            except requests.RequestException as exc:
                raise OtlpRequestError(f"OTLP request to {url} failed: {exc}") from exc
        raise OtlpRequestError(f"OTLP request to {url} failed: {first}")  # pragma: no cover


class _CountingExporter(OTLPMetricExporter):
    """The OTLP exporter, counting failed exports as agent errors and bounding each export by its timeout."""

    def __init__(self, errors, session: DeadlineSession, timeout: float, **kwargs) -> None:
        super().__init__(session=session, timeout=timeout, **kwargs)
        self._errors = errors
        self._session = session
        self._timeout_seconds = timeout
        self._sending = True
        self.failures = 0

    def stop_sending(self) -> None:
        """Later exports succeed without a request (after close's final flush: they would repeat it)."""
        self._sending = False

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        if not self._sending:
            return MetricExportResult.SUCCESS
        window = self._timeout_seconds if timeout_millis is None else min(self._timeout_seconds,
                                                                          timeout_millis / 1000)
        self._session.export_window(window)
        try:
            result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            self.failures += 1
            self._errors.record("otel", exc)
            return MetricExportResult.FAILURE
        finally:
            self._session.export_window(None)
        if result is not MetricExportResult.SUCCESS:
            self.failures += 1
            self._errors.record("otel", ConnectionError(f"OTLP export to {self._endpoint} failed"))
        elif hasattr(self._errors, "succeeded"):
            self._errors.succeeded("otel")  # a failure streak ends
        return result


def resolve_endpoint(cfg) -> str:
    """The full signal URL: the config's endpoint, or $OTEL_EXPORTER_OTLP_ENDPOINT + /v1/metrics."""
    if cfg.endpoint:
        return cfg.endpoint
    base = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/metrics")
    return base


def resolve_service_name(cfg) -> str:
    """A non-default config value, else $OTEL_SERVICE_NAME / service.name in $OTEL_RESOURCE_ATTRIBUTES, else
    the default: the standard variables work unless the config names the service itself."""
    if cfg.service_name and cfg.service_name != DEFAULT_SERVICE_NAME:
        return cfg.service_name
    from_env = OTELResourceDetector().detect().attributes.get("service.name")  # OTEL_SERVICE_NAME first
    return str(from_env) if from_env else DEFAULT_SERVICE_NAME


class OtelExporter:
    def __init__(self, agent, cfg, reader=None) -> None:
        """`reader` replaces the OTLP push reader (tests use the OTel Prometheus reader)."""
        self.agent = agent
        self.errors = agent.errors
        self.endpoint = resolve_endpoint(cfg)
        const = agent.constant_labels()
        self.service_name = resolve_service_name(cfg)
        resource = Resource.create({"service.name": self.service_name, "service.version": __version__,
                                    "run": const["run"], "rank": const["rank"],
                                    **{k: v for k, v in const.items() if k not in ("run", "rank")}})
        self.timeout_seconds = cfg.timeout_seconds
        self.timeout_millis = int(cfg.timeout_seconds * 1000)
        self.session: DeadlineSession | None = None
        self.exporter: _CountingExporter | None = None
        if reader is None:
            self.session = DeadlineSession()
            self.exporter = _CountingExporter(agent.errors, self.session, cfg.timeout_seconds,
                                              endpoint=self.endpoint, headers=dict(cfg.headers))
            reader = PeriodicExportingMetricReader(self.exporter,
                                                   export_interval_millis=cfg.interval_seconds * 1000,
                                                   export_timeout_millis=self.timeout_millis)
        self.reader = reader
        # Not the SDK's atexit shutdown (it waits up to 30 s): close_at_exit's is bounded like detach.
        self.provider = MeterProvider(resource=resource, metric_readers=[self.reader], shutdown_on_exit=False)
        self._closed = False
        self._close_lock = threading.Lock()
        close_at_exit(self)
        self.meter = self.provider.get_meter("gradflow_agent", __version__)
        self.register(ALL)

    def register(self, metrics) -> None:
        """Create observable instruments for catalogue entries (plug-ins add theirs at any time)."""
        for metric in metrics:
            make = (self.meter.create_observable_counter if metric.kind == "counter"
                    else self.meter.create_observable_gauge)
            make(metric.otel_name, callbacks=[self._callback(metric)], unit=metric.unit,
                 description=metric.help)

    def _callback(self, metric):
        def observe(options: CallbackOptions):
            snap = self.agent.latest
            if snap is None:
                return []
            rows = self._rows(snap)
            return [Observation(value, labels) for labels, value in rows.get(metric.name, ())]
        return observe

    def _rows(self, snap) -> dict:
        """All samples of a snapshot grouped by metric name (computed once per snapshot)."""
        cached = getattr(self, "_cache", (None, None))
        if cached[0] is snap:
            return cached[1]
        rows = defaultdict(list)
        for metric, labels, value in samples(snap, self.agent.info, Budget.for_agent(self.agent)):
            rows[metric.name].append((labels, value))
        self._cache = (snap, rows)
        return rows

    def publish(self, snap) -> None:
        """Nothing to do: the reader collects from the latest snapshot on its own schedule."""

    def close(self, deadline: float | None = None) -> None:
        """Flush the latest state and shut the SDK down by `deadline` (absolute monotonic); never raises.

        The flush gets the time left but a short reserve, the shutdown (which then sends nothing: the
        reader's last collection would repeat the flush) the reserve; both run on a helper thread. At
        the end of the flush's share a request still blocked is ended by shutting its socket down, and
        every thread is joined by the deadline. A flush that fails or runs out of time is an "otel" error.
        """
        deadline = begin_close(self, deadline)
        if deadline is None:
            return
        end = deadline - ABORT_MARGIN
        flush_end = end - min(_SHUTDOWN_RESERVE, max(0.0, end - time.monotonic()) / 4)
        try:
            if self.session is not None:
                self.session.close_by(flush_end)
            worker = threading.Thread(target=self._flush_and_shutdown, args=(flush_end, end),
                                      name="gradflow-otel-close", daemon=True)
            worker.start()
            worker.join(max(0.0, flush_end - time.monotonic()))
            if worker.is_alive() and self.session is not None:
                self.session.abort()  # a request blocked in a read ends now; the SDK's threads then finish
            worker.join(max(0.0, end - time.monotonic()))
            ticker = getattr(self.reader, "_daemon_thread", None)  # the SDK's periodic reader thread
            if isinstance(ticker, threading.Thread) and ticker.is_alive():
                ticker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive() or (isinstance(ticker, threading.Thread) and ticker.is_alive()):
                self.errors.record("otel", TimeoutError("OpenTelemetry shutdown did not finish by the close "
                                                        "deadline"))
        except Exception as exc:  # never hurt the run
            self.errors.record("otel", exc)

    def _flush_and_shutdown(self, flush_end: float, end: float) -> None:
        """On the close thread: the final flush, then the SDK's shutdown (threads stopped, nothing sent)."""
        try:
            self.provider.force_flush(timeout_millis=max(0.0, (flush_end - time.monotonic()) * 1000))
        except Exception as exc:  # a failed export is counted by the exporter; this is a timeout or a bug
            self.errors.record("otel", exc)
        if self.exporter is not None:
            self.exporter.stop_sending()
        try:  # never a zero timeout: the provider would skip the reader's shutdown and its thread would live on
            self.provider.shutdown(timeout_millis=max(1.0, (end - time.monotonic()) * 1000))
        except Exception as exc:
            self.errors.record("otel", exc)
