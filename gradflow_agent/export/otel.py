"""OpenTelemetry exporter: observable instruments fed from the latest snapshot, pushed over OTLP/HTTP.

The MeterProvider is private to the agent (never the global one) and created lazily in the process
that trains (the SDK's reader thread is not fork-safe). Callbacks run at collection time on the
reader's thread and read only the last published snapshot. Failed exports are counted in
gradflow_agent_errors_total{component="otel"}.
"""

from __future__ import annotations

import os
from collections import defaultdict

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExportResult, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from .. import __version__
from .metrics import ALL, samples


class _CountingExporter(OTLPMetricExporter):
    """The OTLP exporter, counting failed exports as agent errors instead of only logging them."""

    def __init__(self, errors, **kwargs) -> None:
        super().__init__(**kwargs)
        self._errors = errors

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        try:
            result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            self._errors.record("otel", exc)
            return MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self._errors.record("otel", ConnectionError(f"OTLP export to {self._endpoint} failed"))
        return result


def resolve_endpoint(cfg) -> str:
    """The full signal URL: the config's endpoint, or $OTEL_EXPORTER_OTLP_ENDPOINT + /v1/metrics."""
    if cfg.endpoint:
        return cfg.endpoint
    base = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/metrics")
    return base


class OtelExporter:
    def __init__(self, agent, cfg, reader=None) -> None:
        """`reader` replaces the OTLP push reader (tests use the OTel Prometheus reader)."""
        self.agent = agent
        self.endpoint = resolve_endpoint(cfg)
        const = agent.constant_labels()
        resource = Resource.create({"service.name": cfg.service_name, "service.version": __version__,
                                    "run": const["run"], "rank": const["rank"],
                                    **{k: v for k, v in const.items() if k not in ("run", "rank")}})
        self.timeout_millis = int(cfg.timeout_seconds * 1000)
        if reader is None:
            exporter = _CountingExporter(agent.errors, endpoint=self.endpoint, headers=dict(cfg.headers),
                                         timeout=cfg.timeout_seconds)
            reader = PeriodicExportingMetricReader(exporter, export_interval_millis=cfg.interval_seconds * 1000,
                                                   export_timeout_millis=self.timeout_millis)
        self.reader = reader
        self.provider = MeterProvider(resource=resource, metric_readers=[self.reader])
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
        for metric, labels, value in samples(snap, self.agent.info):
            rows[metric.name].append((labels, value))
        self._cache = (snap, rows)
        return rows

    def publish(self, snap) -> None:
        """Nothing to do: the reader collects from the latest snapshot on its own schedule."""

    def close(self) -> None:
        self.provider.force_flush(timeout_millis=self.timeout_millis)
        self.provider.shutdown(timeout_millis=self.timeout_millis)
