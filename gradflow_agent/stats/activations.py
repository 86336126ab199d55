"""Activation statistics: reduced on the device in a few fused reductions per hooked output.

Cost model. Each reduction is one read of the output, and the physical floor of observing a layer is
one read. So: the sum (exact mean, and a non-finite sum flags NaN/Inf anywhere) runs over the whole
output; the second moment, min/max, exact zeros and saturation run over a fixed strided view of at most
`sample_elements` elements (every k-th item along the leading dimensions, never along the unit,
softmax or last dimension, so rows and units stay whole). Outputs up to that size are reduced exactly.

Where the numbers go. Each call yields 0-d reductions. On an accelerator they go to a pending list
that `fold()` stacks once per step and adds into per-layer device buffers with two indexed ops: no
hook reads a device value back. On the CPU the device *is* the host, so a read-back is a plain memory
load: values are added into host buffers directly, which saves the per-step stack. Both paths fill the
same buffers; a test runs both.

Cost per hooked output (small output, its own view). Accelerator: 6 ops - `nan_to_num`, a compare and
its sum (non-finite count), the sum, `aminmax`, the norm - plus `count_nonzero` for zero-producing
layers and amax/maximum for dead units (it was 12, 16 and 18). Squaring the norm and adding the view's
non-finite count to its non-zero count happen once per step for all calls (`_columns`). CPU: numpy on
the same memory (sum, dot, min, max, and a bool count for zeros), read back directly.

Non-finite values never poison the summary: on CUDA the view is always reduced over its finite part
and non-finite elements are counted over the whole output; on the CPU the masked, exact reductions run
only when the plain sum came out non-finite (reading it back is free there).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .engine import as_numpy, device_index
from .kinds import OutputKind
from .sharding import is_dtensor

# Per-call columns: sum and non-finite count of the whole output; sum, sum of squares, non-zero,
# saturated and non-finite counts of the view. Then min and max of the view (folded into absmax).
COLS = ("sum", "view_sum", "view_sumsq", "view_nonzero", "view_saturated", "nonfinite", "view_nonfinite")
N_COLS = len(COLS)
_WIDE = (torch.float16, torch.bfloat16)


def _nonzero(v: torch.Tensor) -> torch.Tensor:
    """Non-zero elements of a finite tensor. `count_nonzero` branches per element and slows down ~6x on
    outputs that are half zeros (ReLU, 64K elements: ~300 us vs ~30 us; bench/reductions.py)."""
    return torch.sign(v).abs_().sum(dtype=torch.float64)


def _columns(v: torch.Tensor) -> torch.Tensor:
    """COLS sums from `_reduce_masked` values (rows of calls, or one call): the view's norm squared, and
    the non-finite elements of the view counted as non-zero (they were replaced by 0). Per step, not
    per call: two ops over all the calls of the step."""
    sq = v[..., 2:3].square()
    nonzero = v[..., 3:4] + v[..., 6:7]
    return torch.cat([v[..., :2], sq, nonzero, v[..., 4:N_COLS]], dim=-1)


def strided_view(y: torch.Tensor, limit: int, keep: set[int]) -> torch.Tensor:
    """At most ~`limit` elements of `y`: every k-th index along leading dims not in `keep`."""
    factor = y.numel() / limit
    if factor <= 1 or limit <= 0:
        return y
    index: list[slice] = [slice(None)] * y.ndim
    for d in range(y.ndim - 1):
        if factor <= 1:
            break
        if d in keep or y.shape[d] <= 1:
            continue
        step = min(y.shape[d], math.ceil(factor))
        index[d] = slice(None, None, step)
        factor /= step
    # one small copy makes the view contiguous: reductions over strided tensors take several times longer
    # (vector_norm over a (64, 1024) row-strided view: ~100 us vs ~12 us contiguous: bench/reductions.py)
    return y[tuple(index)].contiguous()


class ActivationStats:
    def __init__(self, kinds: list[OutputKind], device: torch.device, *, margin: float, dead_units: bool,
                 window: int, sample_elements: int = 0, robust: bool | None = None, origin=None) -> None:
        self.kinds = kinds
        self.device = device
        self.origin = origin  # NonfiniteOrigin: where NaN/Inf first appeared
        self.margin = margin
        self.track_dead = dead_units
        self.window = window
        self.sample_elements = sample_elements
        self.robust = device.type != "cpu" if robust is None else robust
        self.on_host = device.type == "cpu"
        n = len(kinds)
        self.acc = torch.zeros(n, N_COLS, dtype=torch.float64, device=device)
        self.absmax = torch.zeros(n, dtype=torch.float32, device=device)
        self._host_rows = [[0.0] * (N_COLS + 1) for _ in range(n)]  # CPU: N_COLS sums + absmax
        # per layer, host counts: elements seen, elements in the reduced views, saturation denominator
        # (elements, or rows for softmax), calls. Plain lists: the cheapest thing to add to in a hook.
        self._counts = [[0, 0, 0, 0] for _ in range(n)]
        self._plans: list[tuple | None] = [None] * n
        self._zero = torch.zeros((), dtype=torch.float32, device=device)
        self._pending: list[torch.Tensor] = []
        self._pending_idx: list[int] = []
        # dead units: per ReLU-family layer, the max output of each unit over the current window
        self._unit_max: dict[int, torch.Tensor] = {}
        self._unit_steps = 0
        # torch.compile: hooks traced into the user's graph add straight into these device buffers
        self.traced_counts = torch.zeros(n, 4, dtype=torch.float64, device=device)
        self._nf_seen = torch.zeros(n, dtype=torch.float64, device=device)
        self._layer_index = torch.arange(n, device=device)
        self.traced = False
        self._dead_ratio = np.full(n, np.nan)
        self._last: dict[str, np.ndarray] = {}
        self.nonfinite_total = np.zeros(n)  # a counter: never reset

    # -- hot path -------------------------------------------------------------------------------------
    def _prepare(self, i: int, y: torch.Tensor, channels_first: bool) -> tuple | None:
        """(output, its reduced view, dims reduced per unit, kind) of one output; None when not measured."""
        if is_dtensor(y):  # a wrapper's hooks ran after ours (until the agent re-registers them): local part
            if any(pl.is_partial() for pl in y.placements):
                return None  # pending sums: no local value to measure without a collective
            y = y.to_local()
        n = y.numel()
        if n == 0 or not y.is_floating_point():
            return None
        plan = self._plans[i]
        if plan is None or plan[0] != y.ndim:
            plan = self._plan(i, y, channels_first)
        _, keep, unit_reduce, kind = plan
        y = y.detach()
        view = y if n <= self.sample_elements or not self.sample_elements else strided_view(
            y, self.sample_elements, keep)
        return y, view, unit_reduce, kind

    def observe(self, i: int, y: torch.Tensor, channels_first: bool = False) -> None:
        """Reduce one output of layer `i` (called from its forward hook)."""
        prepared = self._prepare(i, y, channels_first)
        if prepared is None:
            return
        y, view, unit_reduce, kind = prepared
        n = y.numel()
        counts = self._counts[i]
        if self.on_host and not self.robust:
            vals = self._reduce_plain(y, None if view is y else view, kind)
            self._add_host(i, *(self._masked_on_host(y, view, kind) if vals is None else vals))
        elif self.on_host:
            self._add_host(i, *self._masked_on_host(y, view, kind))
        else:
            self._pending.extend(self._reduce_masked(y, view, kind))
            self._pending_idx.append(i)
        vn = view.numel()
        counts[0] += n
        counts[1] += vn
        counts[3] += 1
        if kind.bounded:
            counts[2] += vn // max(view.shape[kind.softmax_dim], 1) if kind.softmax_dim is not None else vn
        if unit_reduce is not None and self.track_dead:
            self._track_units(i, view, unit_reduce)
        if len(self._pending_idx) > 4096:  # a loop that never steps (inference): bound the list
            self.fold()

    def observe_traced(self, i: int, y: torch.Tensor, channels_first: bool = False) -> None:
        """`observe` inside a torch.compile'd graph: the same reductions as device ops added into device
        buffers in place - no read-back, no Python state but the plan - so the hook adds no graph break
        and no recompilation (each layer's hook is inlined at its own call site)."""
        prepared = self._prepare(i, y, channels_first)
        if prepared is None:
            return
        y, view, unit_reduce, kind = prepared
        n = y.numel()
        v = torch.stack([t.to(torch.float64) for t in self._reduce_masked(y, view, kind)])
        self.acc[i] += _columns(v)
        self.absmax[i] = torch.maximum(self.absmax[i], torch.maximum(-v[N_COLS], v[N_COLS + 1]).float())
        vn = view.numel()
        den = (vn // max(view.shape[kind.softmax_dim], 1) if kind.softmax_dim is not None else vn) \
            if kind.bounded else 0
        self.traced_counts[i] += torch.tensor([float(n), float(vn), float(den), 1.0], dtype=torch.float64,
                                              device=self.device)
        if unit_reduce is not None and self.track_dead:
            unit_max = view.amax(dim=unit_reduce).float()
            buf = self._unit_max.get(i)
            if buf is None or buf.shape != unit_max.shape:
                self._unit_max[i] = unit_max.clone()
            else:
                buf.copy_(torch.maximum(buf, unit_max))
        self.traced = True

    @property
    def calls(self) -> list[int]:
        """Forward calls seen per layer in the current interval."""
        return [c[3] for c in self._counts]

    def _plan(self, i: int, y: torch.Tensor, channels_first: bool) -> tuple:
        """Per-layer facts decided once: (ndim, dims the view keeps whole, dims reduced per unit, kind)."""
        kind = self.kinds[i]
        unit_dim = None
        if kind.relu_family and y.ndim > 1:
            unit_dim = 1 if channels_first and y.ndim >= 3 else y.ndim - 1
        keep = {y.ndim - 1}
        if unit_dim is not None:
            keep.add(unit_dim)
        if kind.softmax_dim is not None and y.ndim:
            keep.add(kind.softmax_dim % y.ndim)
        reduce_dims = None if unit_dim is None else tuple(d for d in range(y.ndim) if d != unit_dim)
        self._plans[i] = (y.ndim, keep, reduce_dims, kind)
        return self._plans[i]

    def _reduce_plain(self, y: torch.Tensor, view: torch.Tensor | None, kind: OutputKind) -> list[float] | None:
        """CPU fast path: plain reductions read back (a read-back is a memory load there); None when the
        sum is not finite (a NaN/Inf somewhere, or an overflow: the caller runs the masked reductions).

        float32/float64 outputs are reduced by numpy on the same memory: the same sums in a quarter of the
        per-call cost of torch's dispatch (and no branchy zero count). `view` None: the output is small
        enough to be its own view, so its sum is already known."""
        a = as_numpy(y)
        if a is None:  # half precision, a tensor subclass, a negative-bit view: torch, as before
            wide = y.dtype in _WIDE
            total = (torch.sum(y, dtype=torch.float32) if wide else torch.sum(y)).item()
            if not math.isfinite(total):
                return None
            if view is None:
                vsum, view = total, y
            else:
                vsum = (torch.sum(view, dtype=torch.float32) if wide else torch.sum(view)).item()
            norm = (torch.linalg.vector_norm(view, dtype=torch.float32) if wide else
                    torch.linalg.vector_norm(view)).item()
            mn, mx = torch.aminmax(view)
            nonzero = _nonzero(view).item() if kind.has_zeros else view.numel()
            sat = self._saturated(kind, view).item() if kind.bounded else 0
            return [total, vsum, norm * norm, nonzero, sat, 0, 0, mn.item(), mx.item()]
        total = float(a.sum())
        if not math.isfinite(total):  # a finite sum means every element is finite
            return None
        if view is None:
            vsum, v = total, a
        else:
            v = view.numpy()  # a contiguous copy made by strided_view
            vsum = float(v.sum())
        flat = v.reshape(-1)
        sumsq = float(np.dot(flat, flat))
        nonzero = int(np.count_nonzero(v != 0)) if kind.has_zeros else v.size  # a bool count: the fast one
        sat = self._saturated(kind, view if view is not None else y).item() if kind.bounded else 0
        return [total, vsum, sumsq, nonzero, sat, 0, 0, float(v.min()), float(v.max())]

    def _reduce_masked(self, y: torch.Tensor, view: torch.Tensor, kind: OutputKind) -> list[torch.Tensor]:
        """Reductions over the finite part as 0-d device tensors; non-finite elements counted over the whole
        output. Six ops for an output that is its own view (seven with zeros): non-finite elements are
        replaced by 0 in one `nan_to_num` and counted where it changed the value; the view's norm and its
        zero count are turned into the COLS sums once per step for all calls (`_columns`)."""
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        yc = torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
        nonfinite = (yc != y).sum()  # NaN != 0 and +-Inf != 0: exactly the replaced elements
        total = torch.sum(yc, dtype=acc)
        if view is y:
            vc, vsum, view_nonfinite = yc, total, nonfinite
        else:
            vc = torch.nan_to_num(view, nan=0.0, posinf=0.0, neginf=0.0)
            view_nonfinite = (vc != view).sum()
            vsum = torch.sum(vc, dtype=acc)
        mn, mx = torch.aminmax(vc)
        if kind.has_zeros:  # count_nonzero branches per element on the CPU (bench/reductions.py)
            nonzero = _nonzero(vc) if vc.device.type == "cpu" else torch.count_nonzero(vc)
        else:
            nonzero = self._zero
        sat = self._saturated(kind, view) if kind.bounded else self._zero
        return [total, vsum, torch.linalg.vector_norm(vc, dtype=acc), nonzero, sat, nonfinite, view_nonfinite,
                mn, mx]

    def _masked_on_host(self, y: torch.Tensor, view: torch.Tensor, kind: OutputKind) -> list[float]:
        """`_reduce_masked` read back as the COLS sums (CPU: a NaN/Inf somewhere, or the robust path)."""
        vals = [v.item() for v in self._reduce_masked(y, view, kind)]
        vals[2] *= vals[2]  # the view's norm -> its sum of squares
        vals[3] += vals[6]  # non-finite elements were replaced by 0: they are not zeros
        return vals

    def _saturated(self, kind: OutputKind, y: torch.Tensor) -> torch.Tensor:
        """Saturated outputs in `y` (comparisons with NaN are false, so NaN never counts)."""
        if kind.softmax_dim is not None:
            dim = kind.softmax_dim if y.ndim else 0
            return torch.count_nonzero(y.amax(dim=dim) > 1.0 - self.margin)
        lo, hi = kind.bounds
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        centred = y if mid == 0 else y - mid
        return torch.count_nonzero(centred.abs() > half * (1.0 - self.margin))

    def _add_host(self, i: int, total, vsum, vsumsq, nonzero, sat, nonfinite, view_nonfinite, mn, mx) -> None:
        row = self._host_rows[i]
        row[0] += total
        row[1] += vsum
        row[2] += vsumsq
        row[3] += nonzero
        row[4] += sat
        row[5] += nonfinite
        if nonfinite and self.origin is not None:
            self.origin.note_host(i, 0)
        row[6] += view_nonfinite
        row[7] = max(row[7], -mn, mx)

    def _track_units(self, i: int, y: torch.Tensor, dims: tuple[int, ...]) -> None:
        buf = self._unit_max.get(i)
        a = as_numpy(y) if self.on_host else None
        if a is not None and buf is not None and buf.dtype == torch.float32:
            unit_max = a.max(axis=dims)  # numpy on the same memory: cheaper than torch's dispatch
            if unit_max.shape == buf.shape:
                out = buf.numpy()
                np.maximum(out, unit_max, out=out)
                return
        unit_max = y.amax(dim=dims)
        if buf is None or buf.shape != unit_max.shape:
            self._unit_max[i] = unit_max.float().clone()
        else:
            torch.maximum(buf, unit_max, out=buf)

    # -- step boundary --------------------------------------------------------------------------------
    def fold(self) -> None:
        """Add the pending per-call reductions into the device buffers: one stack, two indexed ops."""
        if not self._pending_idx:
            return
        idx = device_index(self._pending_idx, self.device)
        v = torch.stack(self._pending).view(-1, N_COLS + 2).double()
        self._pending, self._pending_idx = [], []
        self.acc.index_add_(0, idx, _columns(v))
        if self.origin is not None:  # calls are in forward order
            self.origin.note(idx, v[:, COLS.index("nonfinite")], 0)
        self.absmax.scatter_reduce_(0, idx, torch.maximum(-v[:, N_COLS], v[:, N_COLS + 1]).float(), "amax")

    def end_step(self) -> None:
        self.fold()
        if self.traced and self.origin is not None:  # compiled hooks: this step's new non-finite counts
            nonfinite = self.acc[:, COLS.index("nonfinite")]
            self.origin.note(self._layer_index, nonfinite - self._nf_seen, 0)
            self._nf_seen.copy_(nonfinite)
        if self._unit_max:
            self._unit_steps += 1

    # -- snapshot ---------------------------------------------------------------------------------------
    def combine_across_ranks(self, group=None) -> None:
        """Make this interval's reductions those of every rank of a data-parallel job (called at the
        snapshot, which every rank reaches at the same step): sums and counts are added, maxima taken,
        and a unit fired if it fired on any rank. Two or three collectives per snapshot, whatever the
        depth, and one host read of the combined host-side sums (the snapshot synchronises anyway);
        afterwards every rank holds the job's activation statistics, exported once."""
        import torch.distributed as dist
        self.fold()
        n = len(self.kinds)
        host = torch.tensor([row[:N_COLS] + [float(c) for c in counts]
                             for row, counts in zip(self._host_rows, self._counts)],
                            dtype=torch.float64, device=self.device).reshape(n, N_COLS + 4)
        sums = torch.cat([self.acc, self.traced_counts, host], dim=1)
        keys = sorted(self._unit_max)
        units = [self._unit_max[k].reshape(-1) for k in keys]
        # the dead-unit buffers are combined only where every rank holds the same ones (a signature's
        # max and -max over the ranks agree), so every rank takes the same branch
        sig = torch.tensor([len(keys), sum(keys), sum(u.numel() for u in units), float(self._unit_steps)],
                           dtype=torch.float64, device=self.device)
        maxes = torch.cat([self.absmax.double(),
                           torch.tensor([row[N_COLS] for row in self._host_rows], dtype=torch.float64,
                                        device=self.device), sig, -sig])
        dist.all_reduce(sums, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        self.acc.copy_(sums[:, :N_COLS])
        self.traced_counts.copy_(sums[:, N_COLS:N_COLS + 4])
        rest = sums[:, N_COLS + 4:].tolist()
        self._host_rows = [r[:N_COLS] + [0.0] for r in rest]
        self._counts = [r[N_COLS:] for r in rest]
        self.absmax.copy_(torch.maximum(maxes[:n], maxes[n:2 * n]).float())
        agreed = bool(torch.equal(maxes[2 * n:2 * n + 4], -maxes[2 * n + 4:]))
        if units and agreed:
            flat = torch.cat(units)
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
            for k, part in zip(keys, flat.split([u.numel() for u in units])):
                self._unit_max[k].copy_(part.view_as(self._unit_max[k]))

    def device_parts(self) -> list[torch.Tensor]:
        self.fold()
        parts = [self.acc, self.absmax, self.traced_counts]
        if self._unit_max and self._unit_steps >= self.window:
            dead = torch.full((len(self.kinds),), float("nan"), dtype=torch.float64, device=self.device)
            for i, buf in self._unit_max.items():
                dead[i] = (buf <= 0).double().mean()
            parts.append(dead)
        return parts

    def finish(self, host: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Turn the transferred buffers into interval statistics and reset the interval."""
        rows = np.array(self._host_rows).reshape(-1, N_COLS + 1)
        acc = host[0].reshape(-1, N_COLS) + rows[:, :N_COLS]
        absmax = np.maximum(host[1], rows[:, N_COLS])
        traced = host[2].reshape(-1, 4)
        if len(host) > 3:  # a dead-unit window completed: publish it and start the next one
            self._dead_ratio = np.where(np.isnan(host[3]), self._dead_ratio, host[3])
            self._unit_max.clear()
            self._unit_steps = 0
        total, vsum, vsumsq, nonzero, sat, nonfinite, view_nonfinite = acc.T
        numel, view_numel, sat_den, calls = (np.array(self._counts, dtype=np.float64).reshape(-1, 4) + traced).T
        seen = calls > 0
        has_zeros = np.array([k.has_zeros for k in self.kinds], dtype=bool)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / np.maximum(numel - nonfinite, 1)
            view_finite = np.maximum(view_numel - view_nonfinite, 1)
            vmean = vsum / view_finite
            std = np.sqrt(np.maximum(vsumsq / view_finite - vmean * vmean, 0.0))
            zero = np.where(has_zeros, 1.0 - nonzero / view_numel, np.nan)
            saturation = np.where(sat_den > 0, sat / np.maximum(sat_den, 1), np.nan)
        fresh = {"activation_mean": mean, "activation_std": std, "activation_absmax": absmax,
                 "activation_zero_ratio": zero, "activation_saturation_ratio": saturation}
        # a layer not called in this interval keeps its last values (no flapping series)
        self._last = {k: np.where(seen, v, self._last.get(k, np.nan)) for k, v in fresh.items()}
        self.nonfinite_total += nonfinite
        out = {k: v.copy() for k, v in self._last.items()}
        out["activation_dead_unit_ratio"] = self._dead_ratio.copy()
        out["nonfinite_activation"] = self.nonfinite_total.copy()
        self.acc.zero_()
        self.absmax.zero_()
        self.traced_counts.zero_()
        self._nf_seen.zero_()
        self._host_rows = [[0.0] * (N_COLS + 1) for _ in self.kinds]
        self._counts = [[0, 0, 0, 0] for _ in self.kinds]
        return out
