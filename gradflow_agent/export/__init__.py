"""Exporters and recorders: each reads published snapshots only. One file per sink.

Every sink has `publish(snap)` and `close(deadline)` (an absolute `time.monotonic()`; it returns by
then). A sink that cannot start raises: `attach()` then releases what was started and reports one
error, rather than training on with a sink silently left out.
"""

from __future__ import annotations

import logging

from .worker import BackgroundSink

log = logging.getLogger("gradflow_agent")


def build_exporters(agent) -> list:
    """The sinks the config turns on, each named by its component (the `component` label of errors).

    Sinks are appended to `agent.exporters` as they start, so that a failure of a later one leaves the
    earlier ones for `attach()` to close."""
    cfg = agent.config.exporters
    sinks = agent.exporters
    prometheus = None
    if cfg.prometheus.enabled:
        from .prometheus import PrometheusExporter
        prometheus = PrometheusExporter(agent, cfg.prometheus)
        prometheus.name = "prometheus"
        sinks.append(prometheus)
    if cfg.prometheus.pushgateway.url:
        from .prometheus import snapshot_registry
        from .pushgateway import PushgatewaySink
        # pushing needs no HTTP server: a job that cannot be scraped pushes its own registry
        registry = prometheus.registry if prometheus is not None else snapshot_registry(agent)
        sink = PushgatewaySink(registry, cfg.prometheus.pushgateway, agent.constant_labels())
        sinks.append(BackgroundSink(sink, agent.errors, "pushgateway"))
    if cfg.otel.enabled:
        from .otel import OtelExporter
        otel = OtelExporter(agent, cfg.otel)
        otel.name = "otel"
        sinks.append(otel)
    if cfg.jsonl.enabled:
        from .jsonl import JsonlRecorder
        sinks.append(BackgroundSink(JsonlRecorder(cfg.jsonl.path, agent.constant_labels()), agent.errors, "jsonl"))
    from .flight import FlightRecorder, wanted
    if wanted(agent.config, agent.rank):  # post-mortem bundles; its writer thread starts at the first incident
        agent.flight = FlightRecorder(agent)
        sinks.append(agent.flight)
    # tracker bridges (docs/bridges.md): each in its own thread, names bounded by its max_layers
    if cfg.tensorboard.enabled:
        from .tensorboard import TensorBoardSink
        sink = TensorBoardSink(cfg.tensorboard.log_dir, cfg.tensorboard.max_layers, agent.constant_labels())
        sinks.append(BackgroundSink(sink, agent.errors, "tensorboard"))
    if cfg.mlflow.enabled:
        from .mlflow import MlflowSink
        sink = MlflowSink(cfg.mlflow, agent.constant_labels(), agent.config.run.name or "gradflow")
        sinks.append(BackgroundSink(sink, agent.errors, "mlflow"))
    if cfg.wandb.enabled:
        from .wandb import WandbSink
        sink = WandbSink(cfg.wandb, agent.constant_labels(), agent.config.run.name or "gradflow")
        sinks.append(BackgroundSink(sink, agent.errors, "wandb"))
    return sinks
