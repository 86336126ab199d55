"""Exporters and recorders: each reads published snapshots only. One file per sink."""

from __future__ import annotations

import logging

from .worker import BackgroundSink

log = logging.getLogger("gradflow_agent")


def build_exporters(agent) -> list:
    """The sinks the config turns on. A sink that cannot start is reported and left out; training goes on."""
    cfg = agent.config.exporters
    sinks: list = []
    prometheus = None
    if cfg.prometheus.enabled:
        try:
            from .prometheus import PrometheusExporter
            prometheus = PrometheusExporter(agent, cfg.prometheus)
            sinks.append(prometheus)
        except Exception as exc:
            agent.errors.record("prometheus", exc)
    if prometheus is not None and cfg.prometheus.pushgateway.url:
        from .pushgateway import PushgatewaySink
        sink = PushgatewaySink(prometheus.registry, cfg.prometheus.pushgateway, agent.constant_labels())
        sinks.append(BackgroundSink(sink, agent.errors, "pushgateway"))
    if cfg.otel.enabled:
        try:
            from .otel import OtelExporter
            sinks.append(OtelExporter(agent, cfg.otel))
        except Exception as exc:
            agent.errors.record("otel", exc)
    if cfg.jsonl.enabled:
        try:
            from .jsonl import JsonlRecorder
            sinks.append(BackgroundSink(JsonlRecorder(cfg.jsonl.path, agent.constant_labels()), agent.errors,
                                        "jsonl"))
        except Exception as exc:
            agent.errors.record("jsonl", exc)
    return sinks
