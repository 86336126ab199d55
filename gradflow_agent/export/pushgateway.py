"""Pushgateway: push the agent's registry at an interval and at detach, grouped by job, run and rank.

For jobs Prometheus cannot scrape (short runs, batch clusters). Pushes run on a BackgroundSink thread
(component "pushgateway" in gradflow_agent_errors_total). Every request waits at most
`exporters.prometheus.pushgateway.timeout_seconds`; a failed push is counted and the next one waits for
the next interval (doubling up to 4 intervals while the gateway keeps failing), so a dead gateway costs
one short request per interval, never a busy retry loop. `close(deadline)` pushes the final state when
time remains (with `keep_at_exit`; otherwise it deletes the group), every request bounded by the time
left, and ends a request still blocked at the deadline by shutting its socket down.
"""

from __future__ import annotations

import http.client
import time
import urllib.request
from collections.abc import Callable

from prometheus_client import delete_from_gateway, push_to_gateway

from .worker import ABORT_MARGIN, SocketAborter, remaining, resolve_deadline

# A request is not worth starting with less time than this before the close deadline.
_MIN_REQUEST_SECONDS = 0.05
_MAX_BACKOFF_INTERVALS = 4


class _Handlers:
    """urllib handlers whose connections register their sockets with an aborter (proxies still apply)."""

    def __init__(self, aborter: SocketAborter) -> None:
        class HTTPConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                super().connect()
                aborter.add(self.sock)

        class HTTPSConnection(http.client.HTTPSConnection):
            def connect(self) -> None:
                super().connect()
                aborter.add(self.sock)

        class HTTPHandler(urllib.request.HTTPHandler):
            def do_open(self, http_class, req, **kwargs):
                return super().do_open(HTTPConnection, req, **kwargs)

        class HTTPSHandler(urllib.request.HTTPSHandler):
            def do_open(self, http_class, req, **kwargs):
                return super().do_open(HTTPSConnection, req, **kwargs)

        self.handlers = (HTTPHandler(), HTTPSHandler())

    def __call__(self, url: str, method: str, timeout: float | None, headers: list, data: bytes) -> Callable[[], None]:
        """prometheus_client's handler interface: a callable that performs the request."""
        def handle() -> None:
            request = urllib.request.Request(url, data=data, method=method)
            for k, v in headers:
                request.add_header(k, v)
            with urllib.request.build_opener(*self.handlers).open(request, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise OSError(f"error talking to pushgateway: {resp.status} {resp.reason}")
        return handle


class PushgatewaySink:
    """Pushes the registry every `interval_seconds`; meant to run inside a BackgroundSink."""

    latest_only = True  # a push sends the registry's current state: queued snapshots are superseded

    def __init__(self, registry, cfg, labels: dict[str, str]) -> None:
        self.registry = registry
        self.url = cfg.url
        self.job = cfg.job
        self.interval = cfg.interval_seconds
        self.timeout = cfg.timeout_seconds
        self.keep = cfg.keep_at_exit
        self.grouping_key = {"run": labels["run"], "rank": labels["rank"]}
        self.attempts = 0
        self.failures = 0  # consecutive failed pushes
        self._next = 0.0  # monotonic time of the next interval push
        self._aborter = SocketAborter()
        self._handler = _Handlers(self._aborter)

    def publish(self, snap) -> None:
        """Push when the interval (or the backoff after failures) has passed; raise on failure (counted)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval  # set before the attempt: a failure waits too
        try:
            self._push(self.timeout)
        except Exception:
            self.failures += 1
            self._next = now + self.interval * min(2 ** (self.failures - 1), _MAX_BACKOFF_INTERVALS)
            raise
        self.failures = 0

    def _push(self, timeout: float) -> None:
        self.attempts += 1
        push_to_gateway(self.url, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                        timeout=timeout, handler=self._handler)

    def _delete(self, timeout: float) -> None:
        self.attempts += 1
        delete_from_gateway(self.url, job=self.job, grouping_key=self.grouping_key, timeout=timeout,
                            handler=self._handler)

    def abort(self) -> None:
        """End a request blocked in the network now (called by BackgroundSink at the close deadline)."""
        self._aborter.abort()

    def close(self, deadline: float | None = None) -> None:
        """The end-of-run state: push it (keep_at_exit) or delete the group, by `deadline`; raise on failure."""
        deadline = resolve_deadline(deadline)
        end = deadline - ABORT_MARGIN
        left = remaining(end)
        what = "final push" if self.keep else "delete of the group"
        if left < _MIN_REQUEST_SECONDS:
            raise TimeoutError(f"pushgateway {self.url}: no time left for the {what} before the close deadline")
        timeout = min(self.timeout, left)
        if self.keep:
            self._push(timeout)
        else:
            self._delete(timeout)
