"""Gradient statistics, read once per optimizer step (after accumulation, DDP averaging, unscaling).

Per step the hot path reads every trainable gradient's norm into a row of a device ring buffer (`ring[step]
= per-parameter norms`): on the CPU with numpy straight from each `p.grad`, on an accelerator with one
fused `torch._foreach_norm`. Everything per layer - pressure
mean and max over the interval, turbulence (coefficient of variation over the window), the global norm -
is derived from the ring once per export interval. A NaN in the ring means "this parameter had no
gradient at this step"; real non-finite gradients are counted and their finite part is summarised.

Sharded (DTensor) gradients are read on the local shard; the ring keeps their local norms and the
per-parameter counts stay per parameter, so that at the snapshot one collective adds the squares and
counts of the sharded columns over their shard group (stats/sharding.py): the statistics of the whole
tensor on every rank.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .engine import LaggedFlag, as_numpy, device_index
from .sharding import ShardSums, is_dtensor, local

# Gradients read by numpy one by one on the CPU, at most: numpy's read costs less than torch's fused norm
# plus its stack and check (~45 against ~51 us for a 4-layer MLP's 8), but its Python loop costs more
# per tensor (4.1 against 3.5 ms for 1002 small ones): `python bench/hot_path.py`.
NUMPY_READ_MAX = 64


def _dense(g: torch.Tensor) -> torch.Tensor:
    g = local(g)
    return g.coalesce()._values() if g.is_sparse else g


def _dense_all(grads: list[torch.Tensor], sharded: bool) -> list[torch.Tensor]:
    """`_dense` of every gradient, without a Python call per gradient in the common case (no DTensor
    parameter - whose gradients are the only DTensor ones - and no sparse gradient): ~0.5 us per
    parameter per step otherwise, 0.5 ms/step for 1000 tensors."""
    if not sharded and not any(g.is_sparse for g in grads):
        return grads
    return [_dense(g) for g in grads]


def _count_nonzero_cpu(g: torch.Tensor) -> float:
    """Non-zero elements of a CPU gradient: numpy on the same memory for float32/float64."""
    a = as_numpy(g)
    return float(np.count_nonzero(a != 0)) if a is not None else float(torch.count_nonzero(g))


def _param_norms_numpy(params: list[torch.nn.Parameter], out: np.ndarray) -> float | None:
    """The CPU hot path: every trainable parameter's gradient norm into `out` (its ring row), straight
    from `p.grad` with numpy, and the sum of their squares (finite when every gradient is); no list or
    array built per step, and no numpy reduction call (each costs microseconds in place, cold after the
    backward). None - nothing taken - as soon as one gradient is missing, frozen, not contiguous or not
    one `as_numpy` reads (sparse, half precision, a subclass, ...): the general path reads those."""
    total = 0.0
    for k, p in enumerate(params):
        g = p.grad
        a = as_numpy(g) if g is not None and p.requires_grad else None
        if a is None or not a.flags.c_contiguous:  # a copy would cost more than torch's own read
            return None
        a = a.reshape(-1)
        sq = float(a.dot(a))
        total += sq
        out[k] = math.sqrt(sq)  # nan and inf pass through
    return total


class GradientStats:
    def __init__(self, params: list[torch.nn.Parameter], layer_of_param: list[int], n_layers: int,
                 device: torch.device, *, rows: int, window: int, robust: bool | None = None,
                 origin=None, keep_recent: bool = False) -> None:
        self.params = params
        self.n_layers = n_layers
        self.device = device
        self.window = window
        self.origin = origin
        self.robust = device.type != "cpu" if robust is None else robust
        # robust (accelerators): one fused norm per step watches for non-finite gradients until the run
        # shows one; from then on (`exact`) every gradient's finite part and non-finite elements are measured
        self.exact = False
        self._nonfinite_seen = LaggedFlag()
        self.layer_idx = torch.tensor(layer_of_param, dtype=torch.long, device=device)
        n = len(params)
        self.ring = torch.full((rows, max(n, 1)), float("nan"), dtype=torch.float32, device=device)
        self.pos = -1  # row of the latest step
        self._n_rows = rows
        self._rows = self.ring.unbind(0)  # a view per row, made once (indexing makes one per call)
        self._ring_np = self.ring.numpy() if self.ring.device.type == "cpu" else None  # the same memory
        self.row_step = np.full(rows, -1, dtype=np.int64)  # the step each row was read at (-1: not given)
        # keep_recent (the flight recorder): the last snapshot's per-layer rows stay on the device for recent()
        self.keep_recent = keep_recent
        self._recent: tuple[np.ndarray, torch.Tensor] | None = None
        self.filled = 0  # rows written so far (capped at the ring size)
        self.in_interval = 0  # rows written since the last snapshot
        # per parameter (added per layer at the snapshot, after the shard sums): non-finite elements so far,
        # non-zero elements and elements counted on the parameter cadence since the last snapshot
        self.nonfinite = torch.zeros(max(n, 1), dtype=torch.float64, device=device)
        self.nonzero = torch.zeros(max(n, 1), dtype=torch.float64, device=device)
        self.counted = torch.zeros(max(n, 1), dtype=torch.float64, device=device)
        self._numel = torch.tensor([float(local(p).numel()) for p in params] or [0.0], dtype=torch.float64,
                                   device=device)
        self.shards = ShardSums(params, device)
        self._dtensors = any(map(is_dtensor, params))
        # plain CPU gradients: read by `_param_norms_numpy` (`_read_general` when it declines) - up to
        # NUMPY_READ_MAX of them: past that torch's fused loop in C++ is faster (bench/hot_path.py)
        self._numpy_first = self._ring_np is not None and not self.robust and not self._dtensors and \
            n <= NUMPY_READ_MAX
        self._layer_of_param = list(layer_of_param)
        self._last_zero_ratio = np.full(n_layers, np.nan)
        self._last_peak = np.full(n_layers, np.nan)
        self._prev_pressure = np.full(n_layers, np.nan)
        self._last_pressure = np.full(n_layers, np.nan)

    # -- hot path -------------------------------------------------------------------------------------
    def read(self, count_zeros: bool = False, step: int = -1) -> None:
        """Record the current gradients of every trainable parameter as one ring row (of step `step`)."""
        if not self.params:
            return
        self.pos = pos = (self.pos + 1) % self._n_rows
        self.row_step[pos] = step
        sq = _param_norms_numpy(self.params, self._ring_np[pos]) if self._numpy_first else None
        if sq is not None and math.isfinite(sq):  # the CPU hot path: every gradient plain and finite
            if count_zeros:
                self._count_nonzero([p.grad for p in self.params], range(len(self.params)))
        else:  # some gradient missing, sharded, sparse, unusual or not finite; or an accelerator
            self._read_general(self._rows[pos], count_zeros, finite=sq is None)
        self.filled = min(self.filled + 1, self._n_rows)
        self.in_interval = min(self.in_interval + 1, self._n_rows)

    def _read_general(self, row: torch.Tensor, count_zeros: bool, finite: bool) -> None:
        """Every other case, into `row`: `finite` False when the CPU hot path saw a non-finite norm."""
        # a frozen parameter has no gradient now, even if a stale one is left in .grad (frozen mid-run)
        grads = [p.grad if p.requires_grad else None for p in self.params]
        if all(g is not None for g in grads):
            present, dense = range(len(grads)), _dense_all(grads, self._dtensors)
        else:
            present = [k for k, g in enumerate(grads) if g is not None]
            dense = [_dense(grads[k]) for k in present]
            row.fill_(float("nan"))
        if not dense:
            return
        if self.robust and not self.exact and not self._nonfinite_seen.seen():
            norms = self._flagged_norms(dense, present)
        elif self.robust or not finite:
            if self.robust:  # the run has shown a non-finite gradient: exact from now on
                self.exact = True
            norms = self._masked_norms(dense, present)
        else:  # every gradient present: stacked straight into the ring row (no copy; out= has no autograd)
            into_row = len(present) == len(grads) and not dense[0].requires_grad
            norms = torch.stack(torch._foreach_norm(dense), out=row if into_row else None)
            if not math.isfinite(norms.sum().item()):  # CPU only: reading back is free there
                norms = self._masked_norms(dense, present)
        if norms is not row:  # masked norms, or some gradients missing
            if len(present) == len(grads):
                row.copy_(norms)
            else:
                row.index_copy_(0, device_index(present, self.device), norms.float())
        if count_zeros:
            self._count_nonzero(dense, present)

    def _count_nonzero(self, dense: list[torch.Tensor], present) -> None:
        """Exact-zero gradient elements per layer (run on the parameter cadence: one op per tensor)."""
        if self.device.type == "cpu":  # numpy is 5-30x torch's count_nonzero on the CPU (bench/reductions.py)
            nz = torch.tensor([_count_nonzero_cpu(g) for g in dense], dtype=torch.float64)
        else:
            nz = torch.stack([torch.count_nonzero(g) for g in dense]).double()
        if len(present) == len(self.params):
            self.nonzero += nz
            self.counted += self._numel
        else:
            idx = device_index(present, self.device)
            self.nonzero.index_add_(0, idx, nz)
            self.counted.index_add_(0, idx, self._numel[idx])

    def _flagged_norms(self, dense: list[torch.Tensor], present) -> torch.Tensor:
        """The accelerator watch: one fused `_foreach_norm` (a few multi-tensor kernels, whatever the
        number of parameters) instead of four ops per gradient. A non-finite norm flags its parameter at
        this step exactly (origin, counts); the ring holds no reading for it (NaN), and the count is a
        lower bound (one per flagged parameter and step) until the flag reaches the host - without a
        sync, a step or two later, or at the snapshot - and the exact path takes over for the run."""
        norms = torch.stack(torch._foreach_norm(dense))
        bad = ~torch.isfinite(norms)
        flagged = bad.double()
        if len(present) == len(self.params):
            self.nonfinite += flagged
            layers = self.layer_idx
        else:
            idx = device_index(present, self.device)
            self.nonfinite.index_add_(0, idx, flagged)
            layers = self.layer_idx[idx]
        if self.origin is not None:  # backward runs from the deepest layer
            self.origin.note(layers, flagged, 1, last=True)
        self._nonfinite_seen.push(bad.any())
        return norms.masked_fill(bad, float("nan"))

    def _masked_norms(self, dense: list[torch.Tensor], present) -> torch.Tensor:
        """Norms of the finite part; count the non-finite elements per layer. One gradient at a time, so
        that the masks and cleaned copies alive at once are one gradient's, not a copy of all of them
        (which on a large model would be gigabytes per step): four ops per gradient, as before."""
        finite, norms = [], []
        for g in dense:
            ok = torch.isfinite(g)
            finite.append(ok.sum())
            norms.append(torch.linalg.vector_norm(g.nan_to_num(0.0, 0.0, 0.0)))
        # elements of what was reduced (a sparse gradient's values, not the parameter): a cached device tensor
        numel = device_index([g.numel() for g in dense], self.device)
        bad = (numel - torch.stack(finite)).double()
        full = len(present) == len(self.params)
        if full:
            self.nonfinite += bad
        else:
            self.nonfinite.index_add_(0, device_index(present, self.device), bad)
        if self.origin is not None:  # backward runs from the deepest layer
            layers = self.layer_idx if full else self.layer_idx[device_index(present, self.device)]
            self.origin.note(layers, bad, 1, last=True)
        return torch.stack(norms).float()

    # -- snapshot ---------------------------------------------------------------------------------------
    def device_parts(self) -> list[torch.Tensor]:
        """Per-layer pressure per ring row -> interval mean/max, window turbulence, last global norm."""
        n_rows = self.ring.shape[0]
        L = self.n_layers
        nan = torch.full((L,), float("nan"), dtype=torch.float64, device=self.device)
        self._recent = None
        if not self.params:
            return [nan, nan, nan, nan[:1], nan.nan_to_num(0.0), nan.nan_to_num(0.0), nan.nan_to_num(0.0)]
        order = torch.arange(self.pos - self.filled + 1, self.pos + 1, device=self.device) % n_rows
        rows = self.ring.index_select(0, order).double().square()  # oldest first; squares add over shards
        counts = torch.cat([rows, torch.stack([self.nonfinite, self.nonzero, self.counted])])
        counts = self.shards.reduce_columns(counts)  # one collective for a model sharded over one mesh
        rows, (nonfinite_p, nonzero_p, counted_p) = counts[:-3], counts[-3:]
        per_param = [torch.zeros(L + 1, dtype=torch.float64, device=self.device).index_add_(0, self.layer_idx, v)[:L]
                     for v in (nonfinite_p, nonzero_p, counted_p)]
        self.nonzero.zero_()
        self.counted.zero_()
        if self.filled == 0:
            return [nan, nan, nan, nan[:1], *per_param]
        present = ~torch.isnan(rows)
        sq = torch.where(present, rows, 0.0)
        per_layer = torch.zeros(rows.shape[0], L + 1, dtype=torch.float64, device=self.device)
        per_layer.index_add_(1, self.layer_idx, sq)
        counts = torch.zeros_like(per_layer).index_add_(1, self.layer_idx, present.double())
        norms = torch.where(counts > 0, per_layer.sqrt(), float("nan"))  # column L: outside the layers
        pressure = norms[:, :L]
        if self.keep_recent:
            self._recent = (self.row_step[np.arange(self.pos - self.filled + 1, self.pos + 1) % n_rows], norms)
        interval = pressure[-self.in_interval:] if self.in_interval else pressure[:0]
        mean = interval.nanmean(0)
        peak = torch.nan_to_num(interval, nan=-1.0).amax(0) if len(interval) else nan
        peak = torch.where(peak < 0, float("nan"), peak)
        win = pressure[-self.window:]
        w_mean = win.nanmean(0)
        w_n = (~torch.isnan(win)).sum(0)
        w_var = torch.nan_to_num((win - w_mean).square(), nan=0.0).sum(0) / (w_n - 1).clamp(min=1)
        turbulence = torch.where(w_n >= 3, w_var.sqrt() / w_mean, float("nan"))
        global_norm = per_layer[-1].sum().sqrt().reshape(1)
        return [mean, peak, turbulence, global_norm, *per_param]

    def recent(self, first: int, last: int) -> tuple[np.ndarray, torch.Tensor] | None:
        """(steps, per-step norms on the device: one column per layer, then one for parameters outside
        the layers; NaN = no gradient) of the rows read at steps first..last, from the rows the last
        snapshot reduced: exact under sharding without another collective, and no device work until the
        flight recorder asks (None before the first snapshot with rows)."""
        if self._recent is None:
            return None
        steps, norms = self._recent
        keep = np.flatnonzero((steps >= first) & (steps <= last))
        if len(keep) == 0 or keep[-1] - keep[0] + 1 == len(keep):  # steps rise row by row: a slice, no copy
            lo = int(keep[0]) if len(keep) else 0
            return steps[keep], norms[lo:lo + len(keep)]
        return steps[keep], norms.index_select(0, torch.as_tensor(keep, dtype=torch.long, device=norms.device))

    def finish(self, host: list[np.ndarray]) -> dict[str, np.ndarray]:
        mean, peak, turbulence, global_norm, nonfinite, nonzero, counted = host
        if self.robust and nonfinite.any():  # the run has shown a non-finite gradient: exact from now on
            self.exact = True
        if self.in_interval:  # otherwise nothing new: carry the last interval forward
            self._prev_pressure = self._last_pressure
            self._last_pressure, self._last_peak = mean, peak
        if counted.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = 1.0 - nonzero / counted
            self._last_zero_ratio = np.where(counted > 0, ratio, self._last_zero_ratio)
        with np.errstate(invalid="ignore", divide="ignore"):
            velocity = (self._last_pressure - self._prev_pressure) / self._prev_pressure
        self.in_interval = 0
        return {
            "grad_pressure": self._last_pressure.copy(),
            "grad_pressure_max": self._last_peak.copy(),
            "grad_turbulence": turbulence,
            "grad_velocity": np.where(np.isfinite(velocity), velocity, np.nan),
            "grad_zero_ratio": self._last_zero_ratio.copy(),
            "grad_norm": float(global_norm[0]) if self.filled else float("nan"),
            "nonfinite_grad": nonfinite,
        }
