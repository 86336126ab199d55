"""The metric catalogue: one table read by every exporter, so Prometheus and OTel names stay in step.

Each metric has a Prometheus name (base units, `_total` on counters, `_ratio` on ratios) and an OTel
instrument name and UCUM unit chosen so that the OpenTelemetry -> Prometheus translation (dots become
underscores, "s" adds `_seconds`, counters add `_total`, braces are dropped)
gives back exactly the Prometheus name; a test checks that with the real OTel Prometheus exporter.
Ratios keep "ratio" in the instrument name: translators that add `_ratio` for unit "1" only do so
when the name lacks it, and those that do not (exporter-prometheus 0.66b2 here) still get it right.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from ..snapshot import Snapshot
from .budget import Budget, bin_info, depth_profile, issue_counts, issue_extremes, named_layers


@dataclass(frozen=True)
class Metric:
    name: str  # Prometheus name
    kind: str  # "gauge" | "counter" | "info"
    help: str
    unit: str = ""  # UCUM unit for OTel: "1" ratio, "s" seconds, "{step}" annotation, "" none
    labels: tuple[str, ...] = ()  # besides the constant labels

    @property
    def otel_name(self) -> str:
        base = self.name
        for suffix, unit in (("_total", None), ("_seconds", "s")):
            if base.endswith(suffix) and (unit is None or self.unit == unit):
                base = base[: -len(suffix)]
        return base.replace("_", ".")


LAYER = ("layer",)


def _layer(name: str, help: str, unit: str = "") -> Metric:
    return Metric(name, "gauge", help, unit, LAYER)


LAYER_GAUGES = {
    "grad_pressure": _layer("gradflow_grad_pressure",
                            "Mean L2 norm of the layer's parameter gradient per optimizer step over the "
                            "export interval."),
    "grad_pressure_max": _layer("gradflow_grad_pressure_max",
                                "Largest per-step gradient L2 norm of the layer in the export interval."),
    "grad_turbulence": _layer("gradflow_grad_turbulence",
                              "Coefficient of variation (std/mean) of the layer's gradient pressure over "
                              "the streaming window."),
    "grad_velocity": _layer("gradflow_grad_velocity",
                            "Relative change of the layer's gradient pressure since the previous interval."),
    "grad_zero_ratio": _layer("gradflow_grad_zero_ratio",
                              "Fraction of exactly-zero gradient elements of the layer.", "1"),
    "activation_mean": _layer("gradflow_activation_mean", "Mean of the layer's finite outputs."),
    "activation_std": _layer("gradflow_activation_std",
                             "Standard deviation of the layer's finite outputs."),
    "activation_absmax": _layer("gradflow_activation_absmax",
                                "Largest absolute finite output of the layer in the interval."),
    "activation_zero_ratio": _layer("gradflow_activation_zero_ratio",
                                    "Fraction of the layer's outputs that are exactly zero.", "1"),
    "activation_dead_unit_ratio": _layer("gradflow_activation_dead_unit_ratio",
                                         "Fraction of a ReLU-family layer's units that never fired (output "
                                         "> 0) over the last complete window.", "1"),
    "activation_saturation_ratio": _layer("gradflow_activation_saturation_ratio",
                                          "Fraction of a bounded activation's outputs within the "
                                          "saturation margin of its bounds.", "1"),
    "param_norm": _layer("gradflow_param_norm", "L2 norm of the layer's trainable parameters."),
    "output_grad_norm": _layer("gradflow_output_grad_norm",
                               "Mean L2 norm of the gradient w.r.t. the layer's output per backward pass "
                               "(opt-in: stats.gradients.output_grads)."),
    "update_ratio": _layer("gradflow_update_ratio",
                           "Update-to-weight ratio ||dw|| / ||w|| of the layer per optimizer step.", "1"),
}
HEALTH = Metric("gradflow_layer_health_score", "gauge", "Layer health score, 0 (critical) to 100 (healthy).",
                labels=LAYER)
ISSUE = Metric("gradflow_issue", "gauge", "1 while the in-process detector flags this issue kind on the layer, "
               "with its severity (the verdict the alert rules fire on).", labels=("layer", "kind", "severity"))
ISSUE_VALUE = Metric("gradflow_issue_value", "gauge", "The value of the statistic the detector judged for this "
                     "issue (what the alert reports).", labels=("layer", "kind"))
NONFINITE = Metric("gradflow_nonfinite_total", "counter", "Non-finite (NaN/Inf) elements seen in the layer.",
                   labels=("layer", "tensor"))
LAYER_INFO = Metric("gradflow_layer_info", "info", "The layer's module type and depth index.",
                    labels=("layer", "layer_type", "index"))
RUN_METRICS = {
    "steps_total": Metric("gradflow_steps_total", "counter", "Optimizer steps seen by the agent.", "{step}"),
    "grad_norm": Metric("gradflow_grad_norm", "gauge", "Global L2 norm of all trainable gradients at the last "
                        "computed step."),
    "loss": Metric("gradflow_loss", "gauge", "Mean training loss over the export interval."),
    "overhead_seconds_total": Metric("gradflow_agent_overhead_seconds_total", "counter",
                                     "Time the agent spent on the training thread.", "s"),
    "layers": Metric("gradflow_agent_layers", "gauge", "Layers monitored by the agent."),
    "layers_skipped": Metric("gradflow_agent_layers_skipped", "gauge",
                             "Layers left out by modules.max_layers."),
    "optimizer_steps_skipped_total": Metric("gradflow_optimizer_steps_skipped_total", "counter",
                                            "Steps where agent.step() saw no optimizer step (e.g. a "
                                            "GradScaler skipped it after finding inf/NaN).", "{step}"),
    "activation_every_steps": Metric("gradflow_agent_activation_every_steps", "gauge",
                                     "Activations are measured on every n-th step (raised by the agent to keep "
                                     "sampling.overhead_budget)."),
    "parameter_every_steps": Metric("gradflow_agent_parameter_every_steps", "gauge",
                                    "Parameter norms and update ratios are measured on every n-th step (raised "
                                    "by the agent, after the activation cadence, to keep "
                                    "sampling.overhead_budget; 0: off)."),
    "overhead_ratio": Metric("gradflow_agent_overhead_ratio", "gauge",
                             "The agent's share of the training step time, over its last judgment window "
                             "(32 steps, or one stretched statistics period if longer).", "1"),
    "grad_scale": Metric("gradflow_grad_scale", "gauge", "The GradScaler's loss scale (AMP), when one is given."),
    "forward_seconds": Metric("gradflow_forward_seconds", "gauge",
                              "Mean wall time of the model's forward pass per step on this rank over the "
                              "interval: compute no collective waits for, so a straggling rank shows here "
                              "(TrainingStraggler).", "s"),
    "snapshot_time": Metric("gradflow_last_snapshot_timestamp_seconds", "gauge",
                            "Unix time of the latest published snapshot.", "s"),
}
DEPTH_PROFILE = Metric("gradflow_depth_profile", "gauge",
                       "A statistic reduced over a contiguous bin of layers (agg: min or max, the direction its "
                       "rule judges), over every layer whatever the series budget.",
                       labels=("statistic", "agg", "bin"))
DEPTH_BIN_INFO = Metric("gradflow_depth_bin_info", "info", "The layers a depth bin spans.",
                        labels=("bin", "first_layer", "last_layer", "layers"))
ISSUE_LAYERS = Metric("gradflow_issue_layers", "gauge",
                      "Layers the in-process detector flags with this issue kind and severity, over every "
                      "layer (what the per-run alerts page on).", labels=("kind", "severity"))
ISSUE_EXTREME = Metric("gradflow_issue_extreme", "gauge",
                       "The judged value at the first layer flagged with this kind (earliest, then shallowest) "
                       "and at the worst one.", labels=("kind", "which", "layer"))
LAYERS_EXPORTED = Metric("gradflow_agent_layers_exported", "gauge",
                         "Layers exported by name within exporters.prometheus.series_budget (the depth profile "
                         "and the issue counts cover the others).")
DISABLED = Metric("gradflow_agent_component_disabled", "gauge",
                  "1 when a part of the agent was switched off after repeated failures (hook:<layer> for one "
                  "layer's hook).", labels=("component",))
ERRORS = Metric("gradflow_agent_errors_total", "counter", "Errors caught inside the agent (training continued).",
                labels=("component",))
AGENT_INFO = Metric("gradflow_agent_info", "info", "Agent version and where it reads gradients.",
                    labels=("version", "torch_version", "device", "grad_source", "amp_scaler"))

ALL = (*LAYER_GAUGES.values(), HEALTH, ISSUE, ISSUE_VALUE, NONFINITE, LAYER_INFO, *RUN_METRICS.values(), ERRORS,
       DISABLED, AGENT_INFO, DEPTH_PROFILE, DEPTH_BIN_INFO, ISSUE_LAYERS, ISSUE_EXTREME, LAYERS_EXPORTED)
UNLIMITED = Budget()


def samples(snap: Snapshot, info: dict[str, str],
            budget: Budget = UNLIMITED) -> Iterator[tuple[Metric, dict[str, str], float]]:
    """Every (metric, labels, value) of a snapshot. NaN per-layer statistics mean "no data": omitted.

    Per-layer series are exported for the layers `budget` names (export/budget.py); the depth profile
    and the issue counts cover every layer. A budget without `per_layer` (a rank whose per-layer series
    rank 0 exports for the job) leaves out everything per layer."""
    per_layer = budget.per_layer
    if per_layer:
        yield from _layer_samples(snap, budget)
    run_values = dict(snap.counters, grad_norm=snap.grad_norm, loss=snap.loss, snapshot_time=snap.time)
    for key, metric in RUN_METRICS.items():
        value = run_values.get(key)
        if value is not None and not (key == "grad_norm" and math.isnan(value)):
            yield metric, {}, float(value)
    for component in sorted(set(snap.errors) | {"hook"}):
        yield ERRORS, {"component": component}, float(snap.errors.get(component, 0))
    for component in getattr(snap, "disabled", ()):
        yield DISABLED, {"component": component}, 1.0
    yield AGENT_INFO, dict(info), 1.0
    for metric, labels, value in snap.extra:  # plug-in metrics (training dynamics, ...)
        if not math.isnan(value) and (per_layer or "layer" not in labels):
            yield metric, labels, float(value)


def _layer_samples(snap: Snapshot, budget: Budget) -> Iterator[tuple[Metric, dict[str, str], float]]:
    named = named_layers(snap, budget)
    names = [snap.layers[i] for i in named]
    for key, metric in LAYER_GAUGES.items():
        values = snap.stats[key]
        for i, name in zip(named, names):
            value = values[i]
            if not math.isnan(value):
                yield metric, {"layer": name}, float(value)
    if snap.health is not None:
        for i, name in zip(named, names):
            value = snap.health[i]
            if not math.isnan(value):  # unknown is never exported as healthy
                yield HEALTH, {"layer": name}, float(value)
    exported = set(names)
    for issue in snap.issues:
        if issue.layer in exported:
            yield ISSUE, {"layer": issue.layer, "kind": issue.kind, "severity": issue.severity}, 1.0
            if math.isfinite(issue.value):
                yield ISSUE_VALUE, {"layer": issue.layer, "kind": issue.kind}, float(issue.value)
    for tensor, counts in snap.nonfinite.items():
        for i, name in zip(named, names):
            yield NONFINITE, {"layer": name, "tensor": tensor}, float(counts[i])
    for i, name in zip(named, names):
        yield LAYER_INFO, {"layer": name, "layer_type": snap.layer_types[i], "index": str(i)}, 1.0
    yield LAYERS_EXPORTED, {}, float(len(named))
    for (kind, severity), count in issue_counts(snap).items():
        yield ISSUE_LAYERS, {"kind": kind, "severity": severity}, float(count)
    for kind, which, layer, value in issue_extremes(snap):
        yield ISSUE_EXTREME, {"kind": kind, "which": which, "layer": layer}, value
    for statistic, agg, label, value in depth_profile(snap, budget):
        yield DEPTH_PROFILE, {"statistic": statistic, "agg": agg, "bin": label}, value
    for labels in bin_info(snap, budget):
        yield DEPTH_BIN_INFO, labels, 1.0
