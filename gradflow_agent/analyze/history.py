"""A run's snapshots as arrays over (record, layer), and their aggregate as one Snapshot.

Built from live `Snapshot`s (an analysis) or from the JSONL flight record (`Snapshot.to_dict()` per line),
so that a report of a recorded run and an offline analysis go through the same detectors.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..snapshot import LAYER_STATS, NONFINITE_TENSORS, Snapshot


def _nan_reduce(fn, a: np.ndarray, axis: int = 0) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(a, axis=axis)


def last_finite(a: np.ndarray) -> np.ndarray:
    """Per column, the last finite value of a (records, layers) array (NaN when none)."""
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        col = a[:, j]
        ok = np.flatnonzero(np.isfinite(col))
        if ok.size:
            out[j] = col[ok[-1]]
    return out


@dataclass(frozen=True)
class History:
    """Per-record, per-layer statistics of one run: `stats[key]` is an array (records, layers)."""

    layers: tuple[str, ...]
    layer_types: tuple[str, ...]
    steps: np.ndarray  # optimizer step of each record
    interval_steps: np.ndarray  # steps covered by each record
    stats: dict[str, np.ndarray]
    nonfinite: dict[str, np.ndarray]  # cumulative counts (records, layers)
    grad_norm: np.ndarray
    loss: np.ndarray
    health: np.ndarray | None = None  # the agent's exported health score per record, when present

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def from_snapshots(cls, snaps: Sequence[Snapshot]) -> History:
        if not snaps:
            raise ValueError("no snapshots: run at least one step")
        last = snaps[-1]
        health = None
        if all(s.health is not None for s in snaps):
            health = np.stack([np.asarray(s.health, dtype=np.float64) for s in snaps])
        return cls(
            layers=tuple(last.layers), layer_types=tuple(last.layer_types),
            steps=np.array([s.step for s in snaps], dtype=np.int64),
            interval_steps=np.array([s.interval_steps for s in snaps], dtype=np.int64),
            stats={k: np.stack([np.asarray(s.stats[k], dtype=np.float64) for s in snaps]) for k in LAYER_STATS},
            nonfinite={k: np.stack([np.asarray(s.nonfinite[k], dtype=np.float64) for s in snaps])
                       for k in NONFINITE_TENSORS},
            grad_norm=np.array([s.grad_norm for s in snaps], dtype=np.float64),
            loss=np.array([s.loss for s in snaps], dtype=np.float64), health=health)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> History:
        """From `Snapshot.to_dict()` records (the JSONL flight record); records of another layer set are skipped."""
        records = [r for r in records if r.get("layers")]
        if not records:
            raise ValueError("no snapshot records with layers")
        names = tuple(row["layer"] for row in records[-1]["layers"])
        records = [r for r in records if tuple(row["layer"] for row in r["layers"]) == names]

        def col(r: dict[str, Any], key: str) -> np.ndarray:
            return np.array([np.nan if row.get(key) is None else float(row[key]) for row in r["layers"]])

        has_health = all(all("health_score" in row for row in r["layers"]) for r in records)
        return cls(
            layers=names, layer_types=tuple(row.get("type", "") for row in records[-1]["layers"]),
            steps=np.array([int(r.get("step", 0)) for r in records], dtype=np.int64),
            interval_steps=np.array([int(r.get("interval_steps", 1)) for r in records], dtype=np.int64),
            stats={k: np.stack([col(r, k) for r in records]) for k in LAYER_STATS},
            nonfinite={k: np.stack([col(r, f"nonfinite_{k}") for r in records]) for k in NONFINITE_TENSORS},
            grad_norm=np.array([np.nan if r.get("grad_norm") is None else r["grad_norm"] for r in records],
                               dtype=np.float64),
            loss=np.array([np.nan if r.get("loss") is None else r["loss"] for r in records], dtype=np.float64),
            health=np.stack([col(r, "health_score") for r in records]) if has_health else None)

    # -- aggregates -----------------------------------------------------------------------------------
    def pressure_series(self) -> np.ndarray:
        """Gradient pressure (records, layers); records with no new gradient reading are NaN-free carries."""
        return self.stats["grad_pressure"]

    def turbulence(self) -> np.ndarray:
        """Coefficient of variation of pressure: the agent's windowed value at the last record, or, when the
        window never filled, computed the same way (sample std / mean, >= 3 readings) over the records."""
        agent = self.stats["grad_turbulence"][-1]
        p = self.pressure_series()
        n = np.isfinite(p).sum(0)
        mean = _nan_reduce(np.nanmean, p)
        std = _nan_reduce(lambda a, axis: np.nanstd(a, axis=axis, ddof=1), p)
        with np.errstate(invalid="ignore", divide="ignore"):
            own = np.where((n >= 3) & (mean > 0), std / mean, np.nan)
        return np.where(np.isfinite(agent), agent, own)

    def aggregate(self) -> Snapshot:
        """One Snapshot summarising the whole history, for the agent's detectors.

        pressure: step-weighted mean; pressure_max, activation_absmax: max; turbulence: see `turbulence`;
        activation moments and ratios, velocity, update ratio, output-gradient norm: mean over records;
        dead-unit ratio, zero-gradient ratio, parameter norm: last measured; non-finite counts: last (cumulative).
        """
        s = self.stats
        w = self.interval_steps.astype(np.float64)[:, None] * np.ones((1, len(self.layers)))
        p = s["grad_pressure"]
        ok = np.isfinite(p)
        with np.errstate(invalid="ignore", divide="ignore"):
            weighted = np.where(ok, p * w, 0.0).sum(0) / np.where(ok, w, 0.0).sum(0)
        pressure = np.where(ok.any(0), weighted, np.nan)
        agg = {
            "grad_pressure": pressure,
            "grad_pressure_max": _nan_reduce(np.nanmax, s["grad_pressure_max"]),
            "grad_turbulence": self.turbulence(),
            "grad_velocity": _nan_reduce(np.nanmean, s["grad_velocity"]),
            "grad_zero_ratio": last_finite(s["grad_zero_ratio"]),
            "activation_mean": _nan_reduce(np.nanmean, s["activation_mean"]),
            "activation_std": _nan_reduce(np.nanmean, s["activation_std"]),
            "activation_absmax": _nan_reduce(np.nanmax, s["activation_absmax"]),
            "activation_zero_ratio": _nan_reduce(np.nanmean, s["activation_zero_ratio"]),
            "activation_dead_unit_ratio": last_finite(s["activation_dead_unit_ratio"]),
            "activation_saturation_ratio": _nan_reduce(np.nanmean, s["activation_saturation_ratio"]),
            "param_norm": last_finite(s["param_norm"]),
            "update_ratio": _nan_reduce(np.nanmean, s["update_ratio"]),
            "output_grad_norm": _nan_reduce(np.nanmean, s["output_grad_norm"]),
        }
        # the latest measured update ratio (records of older agents lack it: their interval mean)
        latest = last_finite(s["update_ratio_last"])
        agg["update_ratio_last"] = np.where(np.isnan(latest), agg["update_ratio"], latest)
        loss = _nan_reduce(np.nanmean, self.loss[None, :], axis=1)[0] if len(self.loss) else np.nan
        return Snapshot(step=int(self.steps[-1]), time=time.time(), interval_steps=int(self.interval_steps.sum()),
                        layers=self.layers, layer_types=self.layer_types,
                        stats={k: np.asarray(v, dtype=np.float64) for k, v in agg.items()},
                        nonfinite={k: v[-1].copy() for k, v in self.nonfinite.items()},
                        grad_norm=float(self.grad_norm[-1]), loss=float(loss),
                        counters={"steps_total": float(self.steps[-1])})
