"""Parameter norms and update-to-weight ratios ||dw|| / ||w||, on the parameter cadence.

The update is measured between two consecutive step boundaries (parameters only move in the optimizer
step). By default no copy of the model is kept: each parameter contributes a fixed, seeded sample of at
most `sample_size` elements (all of them when it is smaller), read with `torch.take`, and its squared
norms are scaled by numel / sample to estimate the full ones. `exact` keeps a full copy instead.
The sample indices come from a private generator: the training run's random streams are never touched.

Sharded (DTensor) parameters are measured on the local shard: each measurement's per-parameter squares
are kept until the snapshot, where one collective adds the sharded columns over their shard group
(stats/sharding.py) before the per-layer norms and ratios are formed.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from .sharding import ShardSums, local

# Measurements of sharded parameters kept for the snapshot's collective (older ones are dropped).
MAX_PENDING = 64


class ParameterStats:
    def __init__(self, params: list[torch.nn.Parameter], layer_of_param: list[int], n_layers: int,
                 device: torch.device, *, mode: str, sample_size: int, seed: int, origin=None) -> None:
        self.params = params
        self.n_layers = n_layers
        self.origin = origin
        self.device = device
        self.mode = mode
        self.layer_idx = torch.tensor(layer_of_param, dtype=torch.long, device=device)
        self._has_params = np.zeros(n_layers, dtype=bool)  # layers owning a trainable parameter
        self._has_params[[i for i in layer_of_param if i < n_layers]] = True
        L1 = n_layers + 1
        self.norm_sq = torch.zeros(L1, dtype=torch.float64, device=device)  # last measured, per layer
        self.ratio_sum = torch.zeros(L1, dtype=torch.float64, device=device)
        self.ratio_n = torch.zeros(L1, dtype=torch.float64, device=device)
        self.ratio_last = torch.full((L1,), float("nan"), dtype=torch.float64, device=device)  # latest measure
        self.nonfinite = torch.zeros(len(params), dtype=torch.float64, device=device)  # per parameter
        self._nonfinite_base = np.zeros(n_layers)  # counts of the statistics this one replaced
        self._last_nonfinite = np.zeros(n_layers)
        self.shards = ShardSums(params, device)
        self._pending: deque = deque(maxlen=MAX_PENDING)  # (per-parameter squares, has a ratio)
        self._before: list[torch.Tensor] | torch.Tensor | None = None
        self._measured = False
        self._last_ratio = np.full(n_layers, np.nan)
        self._latest_ratio = np.full(n_layers, np.nan)
        gen = torch.Generator().manual_seed(seed)
        self._index: list[torch.Tensor | None] = []
        sample_param, scale = [], []
        for k, p in enumerate(params):
            numel = local(p).numel()
            if mode == "sampled" and numel > sample_size:
                # clone: a slice would keep the whole permutation (8 bytes per element) alive
                idx = torch.randperm(numel, generator=gen)[:sample_size].clone().to(device)
                self._index.append(idx)
                sample_param += [k] * sample_size
                scale.append(numel / sample_size)
            else:
                self._index.append(None)
                sample_param += [k] * numel
                scale.append(1.0)
        self._sample_param = torch.tensor(sample_param, dtype=torch.long, device=device)
        self._scale = torch.tensor(scale, dtype=torch.float64, device=device)
        # unsharded: each sampled element goes straight to its layer, scaled (one index_add per measurement)
        sample_layer = self.layer_idx[self._sample_param] if len(params) else self._sample_param
        self._sample_layer2 = torch.cat([sample_layer, sample_layer + L1])  # rows d^2, then w^2, of (2, L+1)
        self._sample_scale = self._scale[self._sample_param] if len(params) else self._scale

    def _sample(self) -> torch.Tensor:
        with torch.no_grad():
            # no detach under no_grad: it would be one more op per parameter
            parts = [local(p).reshape(-1) if idx is None else torch.take(local(p), idx)
                     for p, idx in zip(self.params, self._index)]
            return torch.cat(parts).double() if parts else torch.zeros(0, dtype=torch.float64)

    def take_before(self) -> None:
        """Remember the parameters (or their sample) before the update to be measured."""
        if not self.params or self.mode == "off":
            return
        if self.mode == "exact":
            with torch.no_grad():
                if self._before is None:
                    self._before = [local(p).detach().clone() for p in self.params]
                else:
                    torch._foreach_copy_(self._before, [local(p).detach() for p in self.params])
        else:
            self._before = self._sample()

    def drop_before(self) -> None:
        """Forget the sample taken before an update (the next measurement has norms but no ratio)."""
        if self.mode != "exact":
            self._before = None

    def measure(self, keep_as_before: bool) -> None:
        """Parameter norms now, and the update ratio since `take_before` (if it was taken)."""
        if not self.params:
            return
        with torch.no_grad():
            detached = [local(p) for p in self.params]  # under no_grad: no graph, no detach needed
            norms = torch.stack(torch._foreach_norm(detached)).double()
            sq = norms.square()
            # On CPU a read-back is free, so count only when a norm is non-finite; on CUDA always count
            # (one op per tensor, on the parameter cadence) rather than synchronise.
            if self.device.type != "cpu" or not math.isfinite(sq.sum().item()):
                counts = torch.stack([(~torch.isfinite(p)).sum() for p in detached]).double()
                self.nonfinite += counts
                if self.origin is not None:
                    self.origin.note(self.layer_idx, counts, 2)
                sq = torch.where(torch.isfinite(norms), sq, 0.0)
            self._measured = True
            if self.mode == "off" or self._before is None:
                self._record(sq, None, None)
                self._before = None
                if keep_as_before:
                    self.take_before()
                return
            if self.mode == "exact":
                diff = torch.stack(torch._foreach_norm(torch._foreach_sub(detached, self._before))).double()
                d_sq = diff.square()
                w_sq = torch.stack(torch._foreach_norm(self._before)).double().square()
                after = None
            else:
                after = self._sample()
                if not self.shards.any:  # per layer at once: 6 ops instead of 13 (the same sums)
                    both = torch.stack([after - self._before, self._before]).square_().mul_(self._sample_scale)
                    # one 1-d index_add_ (on a 2-d tensor it is a scatter, ~30 us on the CPU)
                    layers = torch.zeros(2 * (self.n_layers + 1), dtype=torch.float64, device=self.device)
                    layers = layers.index_add_(0, self._sample_layer2, both.view(-1)).view(2, -1)
                    self.norm_sq.zero_().index_add_(0, self.layer_idx, sq)
                    self._add_ratio(layers[0], layers[1])
                    self._before = after if keep_as_before else None
                    return
                d_sq = torch.zeros(len(self.params), dtype=torch.float64, device=self.device)
                d_sq.index_add_(0, self._sample_param, (after - self._before).square())
                w_sq = torch.zeros_like(d_sq).index_add_(0, self._sample_param, self._before.square())
                d_sq, w_sq = d_sq * self._scale, w_sq * self._scale
            self._record(sq, d_sq, w_sq)
            if keep_as_before:
                if after is None:
                    self.take_before()
                else:
                    self._before = after
            else:
                self._before = None

    def _record(self, sq: torch.Tensor, d_sq: torch.Tensor | None, w_sq: torch.Tensor | None) -> None:
        """One measurement's per-parameter squares: folded now, or at the snapshot for sharded parameters."""
        if self.shards.any:
            self._pending.append((torch.stack([sq, d_sq, w_sq]) if d_sq is not None else sq[None], d_sq is not None))
        else:
            self._fold(sq, d_sq, w_sq)

    def _fold(self, sq: torch.Tensor, d_sq: torch.Tensor | None, w_sq: torch.Tensor | None) -> None:
        """Per-layer norm and update ratio of one measurement (squares of whole tensors)."""
        self.norm_sq.zero_().index_add_(0, self.layer_idx, sq)
        if d_sq is None:
            return
        d_layer = torch.zeros_like(self.norm_sq).index_add_(0, self.layer_idx, d_sq)
        w_layer = torch.zeros_like(self.norm_sq).index_add_(0, self.layer_idx, w_sq)
        self._add_ratio(d_layer, w_layer)

    def _add_ratio(self, d_layer: torch.Tensor, w_layer: torch.Tensor) -> None:
        """Add one measurement's per-layer update ratio sqrt(||dw||^2 / ||w||^2) where it is defined."""
        ratio = (d_layer / w_layer).sqrt_()
        ok = torch.isfinite(ratio)  # w = 0 gives Inf or NaN, a non-finite w NaN: both left out
        self.ratio_sum += torch.where(ok, ratio, 0.0)
        self.ratio_n += ok.double()
        self.ratio_last.copy_(torch.where(ok, ratio, self.ratio_last))

    def carry_over(self, old: ParameterStats) -> None:
        """The trainable set changed and this replaces `old`: keep the run's non-finite counts, and the
        last update ratio of layers that are still trained (a frozen layer's ratio is no longer known)."""
        self._nonfinite_base = old._nonfinite_base + old._last_nonfinite
        self._last_ratio = np.where(self._has_params, old._last_ratio, np.nan)
        self._latest_ratio = np.where(self._has_params, old._latest_ratio, np.nan)

    def device_parts(self) -> list[torch.Tensor]:
        """Per-layer buffers; for sharded parameters, first the one collective over the pending squares."""
        L = self.n_layers
        pending, self._pending = list(self._pending), deque(maxlen=MAX_PENDING)
        if self.shards.any:
            flat = torch.cat([rows for rows, _ in pending] + [self.nonfinite[None]])
            flat = self.shards.reduce_columns(flat)
            nonfinite, k = flat[-1], 0
            for rows, has_ratio in pending:
                n = rows.shape[0]
                part = flat[k:k + n]
                k += n
                self._fold(part[0], part[1] if has_ratio else None, part[2] if has_ratio else None)
        else:
            nonfinite = self.nonfinite
        per_layer = torch.zeros(L + 1, dtype=torch.float64, device=self.device).index_add_(0, self.layer_idx,
                                                                                           nonfinite)
        return [self.norm_sq[:L], self.ratio_sum[:L], self.ratio_n[:L], per_layer[:L], self.ratio_last[:L]]

    def finish(self, host: list[np.ndarray]) -> dict[str, np.ndarray]:
        norm_sq, ratio_sum, ratio_n, nonfinite, ratio_last = host
        if ratio_n.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                self._last_ratio = np.where(ratio_n > 0, ratio_sum / ratio_n, self._last_ratio)
            self._latest_ratio = np.where(ratio_n > 0, ratio_last, self._latest_ratio)
        self.ratio_sum.zero_()
        self.ratio_n.zero_()
        self._last_nonfinite = nonfinite
        nonfinite = nonfinite + self._nonfinite_base
        return {
            "param_norm": np.where(self._has_params & self._measured, np.sqrt(norm_sq), np.nan),
            "update_ratio": self._last_ratio.copy(),
            "update_ratio_last": self._latest_ratio.copy(),
            "nonfinite_param": nonfinite,
        }
