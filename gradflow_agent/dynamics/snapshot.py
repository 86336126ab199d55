"""Immutable primitives: `ParameterSnapshot` (W at a step) and `ParameterDelta` (Δ = W_new - W_old).

Memory is the constraint: a 1.5-billion-parameter model needs 6 GB for a float32 snapshot (3 GB in
float16/bfloat16), so snapshots live on the CPU by default and a delta is never materialised. Its
statistics are computed by streaming, one chunk of one parameter at a time on the parameter's own
device (`chunk_elements` bounds the temporaries), with one host transfer at the end.

Low-precision snapshots: the current weights are rounded to the snapshot dtype before subtracting, so an
unchanged weight gives Δ = 0 exactly; changes smaller than the snapshot's rounding step (about
|w| * 2^-11 in float16, |w| * 2^-8 in bfloat16) read as unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

DEFAULT_CHUNK = 1 << 24


class ParameterMismatchError(ValueError):
    """The model's parameters no longer match the snapshot's names or shapes (architecture changed)."""


def named_parameters(model: nn.Module, trainable_only: bool = True) -> dict[str, nn.Parameter]:
    """The model's parameters by name, shared (tied) ones once, optionally only the trainable ones."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1)


def delta_chunk(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new - old on new's device, in float32 (float64 if either is). When the dtypes differ (a
    low-precision snapshot), `new` is first rounded to old's dtype so that unchanged weights give 0."""
    old = old.to(new.device, non_blocking=True)
    dt = _compute_dtype(new.dtype, old.dtype)
    if new.dtype != old.dtype:
        new = new.to(old.dtype)
    return new.to(dt) - old.to(dt)


@dataclass(frozen=True)
class ParameterSnapshot:
    """Parameters of a model at one step: detached copies (CPU by default), read-only by contract."""

    tensors: Mapping[str, torch.Tensor]
    step: int = 0
    trainable_only: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @classmethod
    def capture(cls, model: nn.Module, *, step: int = 0, device: str | torch.device | None = "cpu",
                dtype: str | torch.dtype | None = torch.float32, trainable_only: bool = True,
                chunk_elements: int = DEFAULT_CHUNK) -> ParameterSnapshot:
        """Copy the model's parameters to `device` (None/"model": each parameter's own device) in `dtype`
        (None/"native": the parameter's dtype), chunk by chunk so that a dtype conversion never needs a
        whole-parameter temporary on the accelerator."""
        dev = None if device in (None, "model") else torch.device(device)
        dt = _resolve_dtype(dtype)
        out = {}
        with torch.no_grad():
            for name, p in named_parameters(model, trainable_only).items():
                target_dtype = dt if (dt is not None and p.dtype.is_floating_point) else p.dtype
                target = torch.empty(p.shape, dtype=target_dtype, device=dev or p.device)
                src, dst = p.detach().reshape(-1), target.view(-1)
                for s in range(0, src.numel(), chunk_elements):
                    dst[s:s + chunk_elements].copy_(src[s:s + chunk_elements])
                out[name] = target
        return cls(out, step=step, trainable_only=trainable_only)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], step: int = 0) -> ParameterSnapshot:
        """A snapshot of hand-made tensors (copied)."""
        return cls({k: v.detach().clone() for k, v in tensors.items()}, step=step)

    # -- read-only views ------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """Memory held by the snapshot."""
        return sum(v.numel() * v.element_size() for v in self.tensors.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def check_matches(self, current: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Raise ParameterMismatchError naming what was added, removed or reshaped since the snapshot."""
        if isinstance(current, nn.Module):
            current = named_parameters(current, self.trainable_only)
        added = sorted(set(current) - set(self.tensors))
        removed = sorted(set(self.tensors) - set(current))
        reshaped = sorted(n for n in set(current) & set(self.tensors)
                          if tuple(current[n].shape) != tuple(self.tensors[n].shape))
        if added or removed or reshaped:
            parts = []
            for label, names in (("added", added), ("removed", removed), ("reshaped", reshaped)):
                if names:
                    shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                    parts.append(f"{label}: {shown}")
            raise ParameterMismatchError(
                f"the model's parameters no longer match the snapshot taken at step {self.step} "
                f"({'; '.join(parts)}). Call reset() on the analysis manager after changing the architecture "
                f"(adding/removing layers, LoRA adapters, freezing or unfreezing parameters).")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "native": None}
    if dtype not in table:
        raise ValueError(f"snapshot dtype must be one of {', '.join(table)}, got {dtype!r}")
    return table[dtype]


# -- statistics ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorStats:
    """Statistics of a set of Δ elements; `combine` merges them exactly (Chan's parallel variance)."""

    numel: int
    mean: float
    m2: float  # sum of squared deviations from the mean
    l1: float  # sum |Δ|
    l2sq: float  # sum Δ²
    max_abs: float
    at_or_below: tuple[float, ...]  # count of |Δ| <= threshold, per threshold

    @property
    def norm_l2(self) -> float:
        return math.sqrt(self.l2sq)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.numel) if self.numel else float("nan")

    @property
    def mean_abs(self) -> float:
        return self.l1 / self.numel if self.numel else float("nan")

    def sparsity(self, index: int) -> float:
        """Fraction of elements with |Δ| <= the index-th threshold."""
        return self.at_or_below[index] / self.numel if self.numel else float("nan")

    @staticmethod
    def combine(parts: list[TensorStats], n_thresholds: int) -> TensorStats:
        n, mean, m2, l1, l2sq, mx = 0, 0.0, 0.0, 0.0, 0.0, 0.0
        counts = [0.0] * n_thresholds
        for p in parts:
            if p.numel == 0:
                continue
            total = n + p.numel
            d = p.mean - mean
            mean += d * p.numel / total
            m2 += p.m2 + d * d * n * p.numel / total
            n = total
            l1 += p.l1
            l2sq += p.l2sq
            mx = max(mx, p.max_abs) if not math.isnan(p.max_abs) else float("nan")
            counts = [a + b for a, b in zip(counts, p.at_or_below)]
        return TensorStats(n, mean if n else float("nan"), m2, l1, l2sq, mx if n else float("nan"), tuple(counts))


@dataclass(frozen=True)
class DeltaStatistics:
    """Per-parameter and total statistics of a delta for a set of thresholds."""

    thresholds: tuple[float, ...]
    per_param: Mapping[str, TensorStats]
    total: TensorStats

    def group(self, names: list[str] | tuple[str, ...]) -> TensorStats:
        """Statistics of the union of some parameters (a layer, a component)."""
        return TensorStats.combine([self.per_param[n] for n in names], len(self.thresholds))


def _chunk_row(d: torch.Tensor, thresholds: tuple[float, ...]) -> torch.Tensor:
    """[mean, m2, l1, l2, max|Δ|, count(|Δ|<=t)...] of one chunk, as float64 on its device (no sync)."""
    var, mean = torch.var_mean(d, correction=0)
    a = d.abs()
    parts = [mean, var * d.numel(), a.sum(), torch.linalg.vector_norm(d), a.max()]
    parts += [(a <= t).sum() for t in thresholds]
    return torch.stack([x.to(torch.float64) for x in parts])


@dataclass(frozen=True)
class ParameterDelta:
    """Δ = W_new - W_old per parameter, computed on demand (never stored whole) with built-in statistics.

    Built from a snapshot and the live model (`from_model`), two snapshots (`between`) or hand-made
    tensors (`from_tensors`). A delta of a live model is valid until its parameters change again.
    """

    old: ParameterSnapshot | None
    new: Mapping[str, torch.Tensor]  # live parameters, a snapshot's tensors, or Δ itself when old is None
    chunk_elements: int = DEFAULT_CHUNK
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "new", MappingProxyType(dict(self.new)))
        if self.chunk_elements < 1:
            raise ValueError("chunk_elements must be >= 1")

    @classmethod
    def from_model(cls, old: ParameterSnapshot, model: nn.Module, *,
                   chunk_elements: int = DEFAULT_CHUNK) -> ParameterDelta:
        """Δ between a snapshot and the model's current parameters (checked to match by name and shape)."""
        params = named_parameters(model, old.trainable_only)
        old.check_matches(params)
        return cls(old, params, chunk_elements)

    @classmethod
    def between(cls, old: ParameterSnapshot, new: ParameterSnapshot | Mapping[str, torch.Tensor], *,
                chunk_elements: int = DEFAULT_CHUNK) -> ParameterDelta:
        tensors = new.tensors if isinstance(new, ParameterSnapshot) else new
        old.check_matches(tensors)
        return cls(old, tensors, chunk_elements)

    @classmethod
    def from_tensors(cls, deltas: Mapping[str, torch.Tensor], *, chunk_elements: int = DEFAULT_CHUNK) -> ParameterDelta:
        """A delta given directly (tests, offline analysis)."""
        return cls(None, {k: v.detach().clone() for k, v in deltas.items()}, chunk_elements)

    # -- structure ------------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.new)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.new[name].shape)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.new.values())

    def device(self, name: str) -> torch.device:
        """Where Δ of `name` is computed: the device of the current (live) tensor."""
        return self.new[name].device

    # -- streaming --------------------------------------------------------------------------------------
    def chunks(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(flat offset, Δ chunk) pairs of one parameter, on its device, float32 (float64 for float64)."""
        cur = _flat(self.new[name])
        n = cur.numel()
        if self.old is None:
            dt = _compute_dtype(cur.dtype)
            for s in range(0, n, self.chunk_elements):
                yield s, cur[s:s + self.chunk_elements].to(dt)
            return
        ref = _flat(self.old[name])
        for s in range(0, n, self.chunk_elements):
            yield s, delta_chunk(cur[s:s + self.chunk_elements], ref[s:s + self.chunk_elements])

    def tensor(self, name: str) -> torch.Tensor:
        """Δ of one parameter, materialised (one parameter's worth of memory)."""
        parts = [d for _, d in self.chunks(name)]
        flat = torch.cat(parts) if parts else torch.zeros(0, device=self.device(name))
        return flat.reshape(self.shape(name))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, Δ) one parameter at a time."""
        for name in self.new:
            yield name, self.tensor(name)

    # -- built-in statistics ----------------------------------------------------------------------------
    def statistics(self, thresholds: tuple[float, ...] | list[float] = ()) -> DeltaStatistics:
        """Per-parameter statistics for these thresholds: one streaming pass, one host transfer, cached."""
        key = tuple(float(t) for t in thresholds)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rows: list[tuple[str, int, torch.Tensor]] = []
        with torch.no_grad():
            for name in self.new:
                for _, d in self.chunks(name):
                    if d.numel():
                        rows.append((name, d.numel(), _chunk_row(d, key)))
        k = len(key)
        per_chunk: dict[str, list[TensorStats]] = {n: [] for n in self.new}
        if rows:
            by_device: dict[torch.device, list[int]] = {}
            for i, (_, _, r) in enumerate(rows):
                by_device.setdefault(r.device, []).append(i)
            host = np.empty((len(rows), 5 + k))
            for dev_rows in by_device.values():  # one transfer per device
                host[dev_rows] = torch.stack([rows[i][2] for i in dev_rows]).cpu().numpy()
            for (name, n, _), r in zip(rows, host):
                per_chunk[name].append(TensorStats(n, float(r[0]), float(r[1]), float(r[2]), float(r[3]) ** 2,
                                                   float(r[4]), tuple(float(x) for x in r[5:])))
        per_param = {n: TensorStats.combine(parts, k) for n, parts in per_chunk.items()}
        stats = DeltaStatistics(key, MappingProxyType(per_param), TensorStats.combine(list(per_param.values()), k))
        self._cache[key] = stats
        return stats

    @property
    def norm_l2(self) -> float:
        return self.statistics().total.norm_l2

    @property
    def norm_l1(self) -> float:
        return self.statistics().total.l1

    @property
    def norm_max(self) -> float:
        return self.statistics().total.max_abs

    @property
    def mean(self) -> float:
        return self.statistics().total.mean

    @property
    def std(self) -> float:
        return self.statistics().total.std

    def sparsity(self, threshold: float) -> float:
        """Fraction of elements with |Δ| <= threshold (unchanged at that resolution)."""
        return self.statistics((threshold,)).total.sparsity(0)

    def changed_ratio(self, threshold: float) -> float:
        return 1.0 - self.sparsity(threshold)
