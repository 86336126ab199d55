"""Prometheus exporter: a private registry whose Collector yields families from the latest snapshot.

Scrapes never touch the device: they read the last published Snapshot on the HTTP server's thread.
"""

from __future__ import annotations

import errno
import logging
from collections import defaultdict

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .metrics import samples

log = logging.getLogger("gradflow_agent")


class SnapshotCollector(Collector):
    def __init__(self, agent) -> None:
        self.agent = agent

    def collect(self):
        snap = self.agent.latest
        if snap is None:
            return
        const = self.agent.constant_labels()
        grouped = defaultdict(list)
        for metric, labels, value in samples(snap, self.agent.info):
            grouped[metric].append((labels, value))
        for metric, rows in grouped.items():
            names = list(const) + list(metric.labels)
            if metric.kind == "info":
                family = InfoMetricFamily(metric.name.removesuffix("_info"), metric.help,
                                          labels=list(const))
                for labels, _ in rows:
                    family.add_metric(list(const.values()), labels)
            else:
                cls = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
                family = cls(metric.name, metric.help, labels=names)
                for labels, value in rows:
                    family.add_metric([*const.values(), *(labels[k] for k in metric.labels)], value)
            yield family


class PrometheusExporter:
    """Serves /metrics on exporters.prometheus.addr:port (+ local rank); port 0 = a free port."""

    def __init__(self, agent, cfg) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(agent))
        port = cfg.port + agent.local_rank if cfg.port else 0
        tls = {"certfile": cfg.certfile, "keyfile": cfg.keyfile} if cfg.certfile else {}
        try:
            self.server, self.thread = start_http_server(port, addr=cfg.addr, registry=self.registry, **tls)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            log.error("gradflow_agent: exporters.prometheus.port %d on %s is in use; serving /metrics on a "
                      "free port instead (see agent.prometheus_url)", port, cfg.addr)
            self.server, self.thread = start_http_server(0, addr=cfg.addr, registry=self.registry, **tls)
        host = cfg.addr if cfg.addr not in ("", "0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if tls else "http"
        self.port = self.server.server_address[1]
        self.url = f"{scheme}://{host}:{self.port}/metrics"
        log.info("gradflow_agent: serving Prometheus metrics at %s", self.url)

    def publish(self, snap) -> None:
        """Nothing to do: the collector reads the agent's latest snapshot at scrape time."""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
