"""Pushgateway: push the agent's registry at an interval and at detach, grouped by job, run and rank.

For jobs Prometheus cannot scrape (short runs, batch clusters). Pushes run on a BackgroundSink thread.
"""

from __future__ import annotations

import time

from prometheus_client import delete_from_gateway, push_to_gateway


class PushgatewaySink:
    def __init__(self, registry, cfg, labels: dict[str, str]) -> None:
        self.registry = registry
        self.url = cfg.url
        self.job = cfg.job
        self.interval = cfg.interval_seconds
        self.keep = cfg.keep_at_exit
        self.grouping_key = {"run": labels["run"], "rank": labels["rank"]}
        self._last = 0.0

    def publish(self, snap) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._push()
            self._last = now

    def _push(self) -> None:
        push_to_gateway(self.url, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                        timeout=10)

    def close(self) -> None:
        self._push()  # the end-of-run state
        if not self.keep:
            delete_from_gateway(self.url, job=self.job, grouping_key=self.grouping_key, timeout=10)
