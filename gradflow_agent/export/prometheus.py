"""Prometheus exporter: a private registry whose Collector yields families from the latest snapshot.

Scrapes never touch the device, nor the training thread. The exposition of each published snapshot is
rendered once, on the exporter's own render thread (text and every OpenMetrics variant asked for so
far, each also gzipped), and a scrape serves those bytes: a scrape costs a dictionary lookup and a
socket write, whatever the model's depth, and a second Prometheus (an HA pair) or a curl costs no
second rendering. Only `gradflow_agent_errors_total` is built at each scrape from the live error
counter (a few lines, appended to the cached body; gzip members concatenate), so an error shows at
the next scrape. What is exported per layer is bounded by the series budget (budget.py).

A fault while building families (a plug-in metric with bad labels, anything raising) is counted as
`gradflow_agent_errors_total{component="prometheus_scrape"}` and logged once; the scrape still answers
200 with every family that could be built.

/metrics is served by prometheus_client's WSGI pieces behind the exporter-toolkit web configuration
(webconfig.py): TLS with client certificates, basic auth, headers. TLS handshakes run on each
connection's own thread, so a client that stalls its handshake cannot block the accept loop.
"""

from __future__ import annotations

import errno
import gzip
import logging
import socket
import ssl
import sys
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import (
    ThreadingWSGIServer,
    _SilentHandler,
    choose_encoder,
    gzip_accepted,
    make_wsgi_app,
)
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector

from .budget import Budget
from .metrics import ERRORS, Metric, samples
from .webconfig import WebConfig, web_config_for

log = logging.getLogger("gradflow_agent")

SCRAPE = "prometheus_scrape"  # the errors component of faults while rendering a scrape
ALL_INTERFACES = ("", "0.0.0.0", "::")
HANDSHAKE_TIMEOUT = 10.0  # seconds a client has to finish the TLS handshake
REQUEST_TIMEOUT = 30.0  # seconds a connection may sit idle before its thread lets it go
CLOSE_TIMEOUT = 5.0  # close() without a deadline
RENDER_WAIT = 2.0  # seconds a scrape waits for the render thread to finish the latest snapshot
RENDER_AHEAD_FOR = 600.0  # seconds a format is rendered ahead after it was last scraped


# -- collection -------------------------------------------------------------------------------------------
class _FamilyCache:
    """The families of the last snapshot seen, shared by every collector of one agent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.families: list[Family] = []


_caches: weakref.WeakKeyDictionary[Any, _FamilyCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _cache_for(agent: Any) -> _FamilyCache:
    with _caches_lock:
        cache = _caches.get(agent)
        if cache is None:
            cache = _caches[agent] = _FamilyCache()
        return cache


class SnapshotCollector(Collector):
    """Yields the latest snapshot's families (built once per snapshot) and the live error counter."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._cache = _cache_for(agent)

    def collect(self) -> Iterator[Family]:
        yield from self.body()
        yield from self.tail()

    def body(self) -> list[Family]:
        """The snapshot's families (everything but the live error counter), built once per snapshot."""
        try:
            return self._families()
        except Exception as exc:  # never a failed scrape: what could be built is served
            self.agent.errors.record(SCRAPE, exc)
            return []

    def tail(self) -> Iterator[Family]:
        """The live error counter, built at each scrape (cheap: one family of a few components)."""
        try:
            yield self._errors_family()
        except Exception as exc:
            self.agent.errors.record(SCRAPE, exc)
        succeeded = getattr(self.agent.errors, "succeeded", None)
        if succeeded is not None:  # the scrape went through: a faulty family is no reason to disable it
            succeeded(SCRAPE)

    def state(self) -> tuple:
        """What a rendering depends on: (snapshot, labels, live error counts). Compare [0] with `is`."""
        return (self.agent.latest, (tuple(self.agent.constant_labels().items()), tuple(self.agent.info.items()),
                                    tuple(sorted(dict(self.agent.errors.counts).items()))))

    def _families(self) -> list[Family]:
        snap = self.agent.latest
        if snap is None:
            return []
        const = self.agent.constant_labels()
        info = self.agent.info
        key = (tuple(const.items()), tuple(info.items()))
        cache = self._cache
        with cache.lock:  # concurrent scrapes of a new snapshot build it once
            if cache.key is not None and cache.key[0] is snap and cache.key[1] == key:
                return cache.families
            families = self._build(snap, const, info)
            cache.key, cache.families = (snap, key), families
            return families

    def _build(self, snap: Any, const: dict[str, str], info: dict[str, str]) -> list[Family]:
        """Group `samples()` per metric and build each family on its own: one bad family drops only itself."""
        grouped: dict[Metric, list[tuple[dict[str, str], float]]] = defaultdict(list)
        try:
            for metric, labels, value in samples(snap, info, Budget.for_agent(self.agent)):
                if metric.name != ERRORS.name:  # built live at each scrape
                    grouped[metric].append((labels, value))
        except Exception as exc:  # keep the samples grouped before the fault
            self.agent.errors.record(SCRAPE, exc)
        families, names = [], set()
        for metric, rows in grouped.items():
            try:
                family = _family(metric, rows, const)
                if family.name in names:
                    raise ValueError(f"two metric families are named {family.name}")
                names.add(family.name)
                families.append(family)
            except Exception as exc:
                self.agent.errors.record(SCRAPE, exc)
        return families

    def _errors_family(self) -> Family:
        live = dict(self.agent.errors.counts)
        snap = self.agent.latest
        published = dict(snap.errors) if snap is not None else {}
        const = self.agent.constant_labels()
        family = CounterMetricFamily(ERRORS.name, ERRORS.help, labels=[*const, *ERRORS.labels])
        for component in sorted(set(live) | set(published) | {"hook", SCRAPE}):
            value = max(live.get(component, 0), published.get(component, 0))
            family.add_metric([*const.values(), component], float(value))
        return family


def _family(metric: Metric, rows: list[tuple[dict[str, str], float]], const: dict[str, str]) -> Family:
    """One family; raises on rows whose labels do not match the catalogue or repeat a series.

    Either would make Prometheus reject the whole scrape, so the family is left out instead.
    """
    expected = set(metric.labels)
    seen = set()
    if metric.kind == "info":
        family = InfoMetricFamily(metric.name.removesuffix("_info"), metric.help, labels=list(const))
        for labels, _ in rows:
            values = {str(k): str(v) for k, v in labels.items()}
            ident = tuple(sorted(values.items()))
            if ident in seen:
                raise ValueError(f"{metric.name}: the series {values} appears twice")
            seen.add(ident)
            family.add_metric(list(const.values()), values)
        return family
    cls = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
    family = cls(metric.name, metric.help, labels=[*const, *metric.labels])
    for labels, value in rows:
        if labels.keys() != expected:
            raise ValueError(f"{metric.name}: sample labels {sorted(labels)} do not match the metric's "
                             f"labels {sorted(expected)}")
        label_values = tuple(str(labels[k]) for k in metric.labels)
        if label_values in seen:
            raise ValueError(f"{metric.name}: the series {dict(labels)} appears twice")
        seen.add(label_values)
        family.add_metric([*const.values(), *label_values], float(value))
    return family


def snapshot_registry(agent: Any) -> CollectorRegistry:
    """A private registry serving `agent`'s snapshots: for /metrics, or a Pushgateway push without a server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(agent))
    return registry


# -- serving ----------------------------------------------------------------------------------------------
class _Adapter(Collector):
    """A registry view of one part of a SnapshotCollector (its body or its live tail)."""

    def __init__(self, part: Callable[[], Iterable[Family]]) -> None:
        self.part = part

    def collect(self) -> Iterable[Family]:
        return self.part()


_EOF = b"# EOF\n"
#: What Prometheus 2.x sends: its OpenMetrics rendering is made ahead like the plain text one.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


class _Rendering:
    """One snapshot's body in one format: plain and gzipped (OpenMetrics without its `# EOF`)."""

    def __init__(self, snap: Any, plain: bytes) -> None:
        self.snap = snap
        self.plain = plain
        self.gzipped = gzip.compress(plain, compresslevel=6)


class _MetricsApp:
    """/metrics from bytes rendered once per snapshot on the render thread (see the module docstring).

    A scrape looks up the rendering of its content type and appends the live error counter. A scrape
    just after a snapshot waits (up to RENDER_WAIT) for the render thread to finish it, else it gets
    the previous one. Only the first scrape of a content type renders on the server's thread; from
    then on that format is rendered ahead for every snapshot while it keeps being scraped
    (RENDER_AHEAD_FOR), so a job nobody scrapes spends nothing on rendering.
    Anything but a plain GET (OPTIONS, POST, `name[]` filters, /favicon.ico) goes to the stock app.
    """

    MAX_FORMATS = 8  # formats differ by Accept header; a few are ever used

    def __init__(self, registry: CollectorRegistry, collector: SnapshotCollector) -> None:
        self.registry = registry
        self.collector = collector
        self.stock = make_wsgi_app(registry)
        self.body = CollectorRegistry(auto_describe=False)
        self.body.register(_Adapter(collector.body))
        self.tail = CollectorRegistry(auto_describe=False)
        self.tail.register(_Adapter(collector.tail))
        self._lock = threading.Lock()
        self._rendered = threading.Condition(self._lock)  # notified after each rendering
        self._renderings: dict[str, _Rendering] = {}
        self._encoders: dict[str, Callable] = {}  # content type -> encoder, for every format asked for
        self._asked: dict[str, float] = {}  # content type -> when it was last asked for (monotonic)
        self.renders = 0  # renderings made (a test reads it: one per snapshot and format)
        self._wake = threading.Event()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="gradflow-prometheus-render", daemon=True)
        self.thread.start()

    # -- the render thread ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """A new snapshot was published: render it on the render thread (called on the training thread)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            now = time.monotonic()
            with self._lock:  # only formats someone scraped lately: an unscraped job renders nothing
                formats = {t: e for t, e in self._encoders.items() if now - self._asked[t] < RENDER_AHEAD_FOR}
            for content_type, encoder in formats.items():
                try:
                    self._render(content_type, encoder)
                except Exception as exc:
                    self.collector.agent.errors.record(SCRAPE, exc)

    def _render(self, content_type: str, encoder: Callable) -> _Rendering:
        snap = self.collector.agent.latest
        plain = encoder(self.body)
        if plain.endswith(_EOF):
            plain = plain[: -len(_EOF)]
        rendering = _Rendering(snap, plain)
        with self._rendered:
            self._renderings[content_type] = rendering
            self.renders += 1
            self._rendered.notify_all()
        return rendering

    def _wait_for(self, content_type: str, snap: Any) -> _Rendering | None:
        """The render thread is rendering a newer snapshot: wait for it a moment (a scrape right after a
        snapshot gets that snapshot), then settle for the previous one."""
        deadline = time.monotonic() + RENDER_WAIT
        with self._rendered:
            while time.monotonic() < deadline:
                rendering = self._renderings.get(content_type)
                if rendering is not None and rendering.snap is snap:
                    return rendering
                self._rendered.wait(timeout=max(0.0, deadline - time.monotonic()))
        return None

    def close(self) -> None:
        self._stop = True
        self._wake.set()

    # -- a scrape ---------------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico" \
                or "name[]" in parse_qs(environ.get("QUERY_STRING", "")):
            return self.stock(environ, start_response)
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT"))
        compress = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING"))
        with self._lock:
            rendering = self._renderings.get(content_type)
            if content_type in self._encoders or len(self._encoders) < self.MAX_FORMATS:
                self._encoders[content_type] = encoder  # rendered ahead for the next snapshots
                self._asked[content_type] = time.monotonic()
        latest = self.collector.agent.latest
        if rendering is not None and rendering.snap is not latest:
            rendering = self._wait_for(content_type, latest) or rendering
        if rendering is None or (rendering.snap is None and latest is not None):
            rendering = self._render(content_type, encoder)
        tail = encoder(self.tail)
        headers = [("Content-Type", content_type)]
        if compress:
            output = [rendering.gzipped, gzip.compress(tail, compresslevel=1)]
            headers.append(("Content-Encoding", "gzip"))
        else:
            output = [rendering.plain, tail]
        start_response("200 OK", [*headers, ("Content-Length", str(sum(map(len, output))))])
        return output


def _contained(app: Callable, errors: Any) -> Callable:
    """Any exception left in the WSGI app: counted and logged once, a short 500 instead of a stderr traceback."""

    def wsgi(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        except Exception as exc:
            errors.record(SCRAPE, exc)
            body = b"gradflow_agent: the scrape failed; see gradflow_agent_errors_total\n"
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8"),
                                                        ("Content-Length", str(len(body)))], sys.exc_info())
            return [body]

    return wsgi


class _Handler(_SilentHandler):
    timeout = REQUEST_TIMEOUT  # an idle or stalled client frees its thread


class _Server(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server with the TLS handshake moved onto each request's thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, web: WebConfig | None) -> None:
        self.address_family = family
        self.web = web
        self.tls_context = web.ssl_context() if web is not None else None
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        super().server_bind()
        if self.tls_context is not None:  # accept() then wraps each socket without handshaking
            self.socket = self.tls_context.wrap_socket(self.socket, server_side=True,
                                                       do_handshake_on_connect=False)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(HANDSHAKE_TIMEOUT)
            request.do_handshake()
            tls = self.web.tls if self.web is not None else None
            if tls is not None and not tls.allows_peer(request.getpeercert()):
                log.debug("gradflow_agent: /metrics client %s: no allowed SAN in its certificate", client_address)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Refused handshakes and dropped connections are the client's business: debug, not stderr."""
        log.debug("gradflow_agent: /metrics connection from %s failed", client_address, exc_info=True)


def _family_of(addr: str, port: int) -> tuple[socket.AddressFamily, str]:
    infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0]


def _serve(addr: str, port: int, app: Callable, web: WebConfig | None) -> _Server:
    family, host = _family_of(addr, port)
    server = _Server((host, port), family, web)
    server.set_app(app)
    return server


def reachable_host(addr: str) -> str:
    """The host part of a URL that reaches a server bound to `addr`: the machine's name for all interfaces."""
    if addr not in ALL_INTERFACES:
        return f"[{addr}]" if ":" in addr else addr
    for name in (socket.getfqdn(), socket.gethostname()):
        if not name or name.startswith("localhost"):
            continue
        try:
            socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError:
            continue
        return name
    return "127.0.0.1"


class PrometheusExporter:
    """Serves /metrics on exporters.prometheus.addr:port (+ local rank); port 0 = a free port.

    Secured by `exporters.prometheus.web_config_file` (or the legacy certfile/keyfile): a bad file is a
    ConfigError and nothing listens.
    """

    def __init__(self, agent: Any, cfg: Any) -> None:
        web = web_config_for(cfg)  # ConfigError before anything binds
        self.web = web
        self._closed = False
        self.collector = SnapshotCollector(agent)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.app = _MetricsApp(self.registry, self.collector)
        app = _contained(self.app, agent.errors)
        app = web.wsgi(app) if web is not None else app
        port = cfg.port + agent.local_rank if cfg.port else 0
        try:
            self.server = self._bind(cfg.addr, port, app, web)
        except BaseException:
            self.app.close()  # the render thread ends with the failed start
            raise
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.25},
                                       name="gradflow-prometheus", daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]
        scheme = web.scheme if web is not None else "http"
        self.url = f"{scheme}://{reachable_host(cfg.addr)}:{self.port}/metrics"
        if cfg.addr not in ALL_INTERFACES:
            log.info("gradflow_agent: serving Prometheus metrics at %s", self.url)
        elif web is not None and web.secured:
            log.info("gradflow_agent: metrics at %s on all interfaces (exporters.prometheus.addr: 127.0.0.1 "
                     "restricts)", self.url)
        else:
            log.info("gradflow_agent: metrics at %s on all interfaces; restrict: exporters.prometheus.addr: "
                     "127.0.0.1, secure: web_config_file", self.url)

    @staticmethod
    def _bind(addr: str, port: int, app: Callable, web: WebConfig | None) -> _Server:
        try:
            return _serve(addr, port, app, web)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            log.error("gradflow_agent: exporters.prometheus.port %d on %s is in use; serving /metrics on a "
                      "free port instead (see agent.prometheus_url)", port, addr)
            return _serve(addr, 0, app, web)

    def publish(self, snap: Any) -> None:
        """Wake the render thread: the snapshot is rendered there, never on the training thread."""
        self.app.refresh()

    def close(self, deadline: float | None = None) -> None:
        """Stop serving by `deadline` (a time.monotonic() value; default 5 s from now), whatever the clients do."""
        if self._closed:
            return
        self._closed = True
        self.app.close()
        if deadline is None:
            deadline = time.monotonic() + CLOSE_TIMEOUT
        stopper = threading.Thread(target=self.server.shutdown, name="gradflow-prometheus-stop", daemon=True)
        stopper.start()
        stopper.join(timeout=max(0.0, deadline - time.monotonic()))
        self.server.server_close()
        self.thread.join(timeout=max(0.0, deadline - time.monotonic()))
