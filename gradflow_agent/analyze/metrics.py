"""FlowMetrics: one layer's gradient-flow numbers over an analysis (seed 004's pressure, turbulence, velocity)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..snapshot import Snapshot
from .base import jsonable
from .history import History


@dataclass(frozen=True)
class FlowMetrics:
    """Per-layer statistics aggregated over the analysed steps (NaN = not measured for this layer).

    mean_pressure / max_pressure: mean and max over steps of the L2 norm of the layer's parameter gradient.
    turbulence: coefficient of variation (sample std / mean) of pressure over the steps.
    velocity: mean relative change of pressure between consecutive steps.
    output_grad_norm: mean L2 norm of dL/d(output); gradient_gain: exp of the mean ln(||dL/d in|| / ||dL/d out||).
    effective_rank_in / _out: participation ratio of the input / output features over the batch.
    """

    layer: str
    layer_type: str
    depth: int  # forward execution order (-1: never called)
    mean_pressure: float
    max_pressure: float
    turbulence: float
    velocity: float
    grad_zero_ratio: float
    output_grad_norm: float
    activation_mean: float
    activation_std: float
    activation_zero_ratio: float
    dead_unit_ratio: float
    saturation_ratio: float
    param_norm: float
    update_ratio: float
    nonfinite: float
    effective_rank_in: float = float("nan")
    effective_rank_out: float = float("nan")
    gradient_gain: float = float("nan")
    width: int = 0
    pressure_history: tuple[float, ...] = field(default=(), repr=False)

    @property
    def has_gradient(self) -> bool:
        return math.isfinite(self.mean_pressure)

    @property
    def compression_ratio(self) -> float:
        """effective_rank_in / effective_rank_out (> 1: the layer compresses its input)."""
        if self.effective_rank_out > 0 and math.isfinite(self.effective_rank_in):
            return self.effective_rank_in / self.effective_rank_out
        return float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}
        d["compression_ratio"] = jsonable(self.compression_ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowMetrics:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            v = d.get(f.name)
            if f.name in ("layer", "layer_type"):
                kw[f.name] = v or ""
            elif f.name in ("depth", "width"):
                kw[f.name] = int(v) if v is not None else (-1 if f.name == "depth" else 0)
            elif f.name == "pressure_history":
                kw[f.name] = tuple(float("nan") if x is None else float(x) for x in (v or ()))
            else:
                kw[f.name] = float("nan") if v is None else float(v)
        return cls(**kw)


def compute_metrics(history: History, aggregate: Snapshot, *, order: np.ndarray | None = None,
                    rank_in: np.ndarray | None = None, rank_out: np.ndarray | None = None,
                    log_gain: np.ndarray | None = None, width: np.ndarray | None = None) -> list[FlowMetrics]:
    """FlowMetrics of every layer, in layer order."""
    L = len(history.layers)
    nan = np.full(L, np.nan)
    order = np.arange(L) if order is None else order
    rank_in = nan if rank_in is None else rank_in
    rank_out = nan if rank_out is None else rank_out
    gain = nan if log_gain is None else np.exp(log_gain)
    width = np.zeros(L, dtype=np.int64) if width is None else width
    s = aggregate.stats
    bad = sum(np.asarray(v, dtype=np.float64) for v in aggregate.nonfinite.values())
    p_hist = history.pressure_series()
    out = []
    for i, name in enumerate(history.layers):
        out.append(FlowMetrics(
            layer=name, layer_type=history.layer_types[i], depth=int(order[i]),
            mean_pressure=float(s["grad_pressure"][i]), max_pressure=float(s["grad_pressure_max"][i]),
            turbulence=float(s["grad_turbulence"][i]), velocity=float(s["grad_velocity"][i]),
            grad_zero_ratio=float(s["grad_zero_ratio"][i]), output_grad_norm=float(s["output_grad_norm"][i]),
            activation_mean=float(s["activation_mean"][i]), activation_std=float(s["activation_std"][i]),
            activation_zero_ratio=float(s["activation_zero_ratio"][i]),
            dead_unit_ratio=float(s["activation_dead_unit_ratio"][i]),
            saturation_ratio=float(s["activation_saturation_ratio"][i]), param_norm=float(s["param_norm"][i]),
            update_ratio=float(s["update_ratio"][i]), nonfinite=float(bad[i]),
            effective_rank_in=float(rank_in[i]), effective_rank_out=float(rank_out[i]),
            gradient_gain=float(gain[i]), width=int(width[i]),
            pressure_history=tuple(float(x) for x in p_hist[:, i])))
    return out
