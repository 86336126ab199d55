"""The immutable interval snapshot: the only thing detectors, exporters and recorders ever read."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Per-layer statistics, in export order. NaN means "no data for this layer". Each is exported as a gauge
# (export/metrics.py LAYER_GAUGES) except the views only the detectors judge (`update_ratio_last`: the
# latest measured update ratio, where `update_ratio` is the interval's mean) and PLUGIN_STATS.
# PLUGIN_STATS are filled by plug-ins (`plugin.layer_statistics()`, Agent._layer_columns) on the layers they
# report: attention modules and MoE routers, which the snapshot lists after the hooked layers when the agent
# does not hook them. The plug-ins export them as their own gauges (gradflow_attention_*, gradflow_moe_*).
PLUGIN_STATS = (
    "attention_entropy", "attention_max_prob", "attention_head_diversity",  # integrations/attention.py
    "moe_load_imbalance_ratio", "moe_dead_expert_ratio", "moe_router_entropy_ratio",  # integrations/moe.py
)
LAYER_STATS = (
    "grad_pressure", "grad_pressure_max", "grad_turbulence", "grad_velocity", "grad_zero_ratio",
    "activation_mean", "activation_std", "activation_absmax", "activation_zero_ratio",
    "activation_dead_unit_ratio", "activation_saturation_ratio", "param_norm", "update_ratio",
    "output_grad_norm", "update_ratio_last", *PLUGIN_STATS,
)
NONFINITE_TENSORS = ("grad", "activation", "param")


@dataclass(frozen=True)
class Snapshot:
    """Per-layer statistics of one export interval, plus run-wide counters, as plain numpy data."""

    step: int  # optimizer steps so far
    time: float  # unix time of the snapshot
    interval_steps: int  # steps covered by this snapshot
    layers: tuple[str, ...]
    layer_types: tuple[str, ...]
    stats: Mapping[str, np.ndarray]  # LAYER_STATS key -> float array over layers
    nonfinite: Mapping[str, np.ndarray]  # "grad" | "activation" | "param" -> cumulative counts per layer
    grad_norm: float  # global gradient L2 norm at the last computed step
    loss: float | None  # mean loss over the last interval that had one (None until a loss is given)
    counters: Mapping[str, float]  # run-wide: steps_total, overhead_seconds_total, errors_total, ...
    errors: Mapping[str, int] = field(default_factory=dict)  # component -> errors so far
    extra: tuple = ()  # (export.metrics.Metric, labels, value) published by plug-ins (Agent.add_plugin)
    issues: tuple = ()  # detect.Issue, filled in by the detectors
    health: np.ndarray | None = None  # per-layer health score 0-100 (NaN: unknown), filled in by the detectors
    # (step, layer index, tensor) where the first NaN/Inf appeared (stats/nonfinite.py), None if none yet
    nonfinite_origin: tuple[int, int, str] | None = None
    degraded: tuple[str, ...] = ()  # statistics components that failed for this snapshot (their data: NaN)
    disabled: tuple[str, ...] = ()  # components switched off after repeated failures ("hook:<layer>": one layer)

    def _repr_html_(self) -> str:
        """Jupyter's view: headline numbers, issues and one row per layer (escaped: names may hold `<`)."""
        from .report.html import snapshot_html
        return snapshot_html(self)

    def with_diagnosis(self, issues: tuple, health: np.ndarray) -> Snapshot:
        return dataclasses.replace(self, issues=tuple(issues), health=health)

    def _layer_name(self, index: int) -> str | None:
        return self.layers[index] if 0 <= index < len(self.layers) else None

    def layer(self, name: str) -> dict[str, float]:
        """All statistics of one layer, by name."""
        i = self.layers.index(name)
        out = {k: float(v[i]) for k, v in self.stats.items()}
        out.update({f"nonfinite_{k}": float(v[i]) for k, v in self.nonfinite.items()})
        if self.health is not None:
            out["health_score"] = float(self.health[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (NaN -> None), one entry per layer."""

        def clean(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        layers = []
        for i, name in enumerate(self.layers):
            row: dict[str, Any] = {"layer": name, "type": self.layer_types[i]}
            row.update({k: clean(v[i]) for k, v in self.stats.items()})
            row.update({f"nonfinite_{k}": float(v[i]) for k, v in self.nonfinite.items()})
            if self.health is not None:
                row["health_score"] = clean(self.health[i])
            layers.append(row)
        return {
            "step": self.step, "time": self.time, "interval_steps": self.interval_steps,
            "grad_norm": clean(self.grad_norm), "loss": clean(self.loss),
            "counters": dict(self.counters), "errors": dict(self.errors),
            "nonfinite_origin": None if self.nonfinite_origin is None else
            dict(zip(("step", "layer", "tensor"), (self.nonfinite_origin[0],
                                                   self._layer_name(self.nonfinite_origin[1]),
                                                   self.nonfinite_origin[2]))),
            "degraded": list(self.degraded), "disabled": list(self.disabled),
            "issues": [i.to_dict() for i in self.issues], "layers": layers,
            "extra": [{"name": m.name, "labels": labels, "value": clean(v)} for m, labels, v in self.extra],
        }
