"""Extra forward hooks for the offline analyzers, registered the way `gradflow_agent.hooks` registers its own.

The agent's HookManager measures what a live monitor can afford. The analyzers need a few things more
(effective ranks of layer inputs/outputs, attention maps, recurrent inputs); they get them from forward
hooks on the same `hooks.Layer` objects the agent selected, with the same conventions: per-module
registration with every handle kept and removed, forward re-runs inside backward (activation
checkpointing) ignored, tensor hooks for gradients (never full backward hooks, which break with in-place
ops), and a failing probe counted in the agent's ErrorCounter instead of raised into the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ErrorCounter
from ..hooks import HandleSet, Layer, _in_backward
from ..stats.kinds import CHANNELS_FIRST, first_tensor


class Probes(HandleSet):
    """Owns the analyzers' hook handles; every callback is guarded."""

    def __init__(self, errors: ErrorCounter | None = None) -> None:
        self.errors = errors if errors is not None else ErrorCounter()
        self.enabled = True
        self._handles: list[Any] = []

    def _guard(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            if not self.enabled or _in_backward():
                return None
            try:
                return fn(*args)
            except Exception as exc:  # never hurt the run
                self.errors.record(name, exc)
                return None
        return run

    def forward(self, module: nn.Module, fn: Callable[..., Any], *, name: str = "probe",
                with_kwargs: bool = False) -> None:
        """fn(module, args, output) (or (module, args, kwargs, output)) after each forward call."""
        guarded = self._guard(name, fn)

        def hook(*a: Any) -> None:
            guarded(*a)
            return None

        self._handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def pre(self, module: nn.Module, fn: Callable[..., Any], *, name: str = "probe-pre",
            with_kwargs: bool = False) -> None:
        """fn(module, args) (or (module, args, kwargs)) before each forward call; may return new arguments."""
        self._handles.append(module.register_forward_pre_hook(self._guard(name, fn), with_kwargs=with_kwargs))

    def on_grad(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], None], *, name: str = "probe-grad") -> None:
        """fn(gradient of `tensor`) once, during the backward pass (a tensor hook: safe with in-place ops)."""
        if not (isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled()):
            return

        def hook(grad: torch.Tensor) -> None:
            try:
                fn(grad.detach())
            except Exception as exc:
                self.errors.record(name, exc)

        tensor.register_hook(hook)


# -- effective rank -------------------------------------------------------------------------------------
def feature_matrix(t: torch.Tensor, channels_first: bool, max_rows: int = 1024, max_cols: int = 1024,
                   seed: int = 0) -> torch.Tensor | None:
    """Rows = observations, columns = features of one layer input/output, sub-sampled to a bounded size.

    (N, F) as is; (N, C, ...) channels-first: channels are the features, every position an observation;
    (N, T, D) and other layouts: the last dimension is the feature.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < 2 or t.numel() == 0:
        return None
    x = t.detach()
    if channels_first and x.ndim >= 3:
        x = x.movedim(1, -1)
    x = x.reshape(-1, x.shape[-1])
    if x.shape[1] < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > max_rows:
        x = x[torch.randperm(x.shape[0], generator=g)[:max_rows].to(x.device)]
    if x.shape[1] > max_cols:
        x = x[:, torch.randperm(x.shape[1], generator=g)[:max_cols].to(x.device)]
    return x


def participation_ratio(x: torch.Tensor | np.ndarray) -> float:
    """Effective dimensionality (sum lambda)^2 / sum lambda^2 of the covariance eigenvalues of rows of `x`.

    1 when every observation lies on one line, the number of features when variance is spread evenly.
    """
    x = torch.as_tensor(x).double()
    if x.ndim != 2 or x.shape[0] < 2:
        return float("nan")
    x = x - x.mean(0, keepdim=True)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    lam = torch.linalg.svdvals(x).square()
    total = float(lam.sum())
    if total <= 0 or not math.isfinite(total):
        return float("nan")
    return total * total / float(lam.square().sum())


class LayerFlowProbe:
    """Per layer: forward execution order, output width, effective rank of input and output, backward gain.

    Backward gain = ||dL/d input|| / ||dL/d output||, per backward pass, where `input` is the tensor entering
    the layer (its gradient includes every consumer of that tensor: exact on a chain of layers).
    """

    def __init__(self, layers: list[Layer], probes: Probes, *, measure_rank: bool = True) -> None:
        self.layers = layers
        self.probes = probes
        self.measure_rank = measure_rank
        L = len(layers)
        self.order = np.full(L, -1, dtype=np.int64)
        self.width = np.zeros(L, dtype=np.int64)
        self.rank_in: list[list[float]] = [[] for _ in range(L)]
        self.rank_out: list[list[float]] = [[] for _ in range(L)]
        self._log_gain: list[list[float]] = [[] for _ in range(L)]
        self._in_norm = np.zeros(L)
        self._out_norm = np.zeros(L)
        self._calls = 0
        self._rank_now = False
        self._channels_first = False
        for layer in layers:
            probes.forward(layer.module, self._hook(layer), name="layer-flow-probe")

    def begin_step(self, rank_now: bool) -> None:
        self._rank_now = rank_now and self.measure_rank
        self._in_norm[:] = 0.0
        self._out_norm[:] = 0.0

    def end_step(self) -> None:
        """Fold this step's backward norms into the per-layer log gains."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = self._in_norm / self._out_norm
        for i in np.flatnonzero((self._in_norm > 0) & (self._out_norm > 0) & np.isfinite(ratio)):
            self._log_gain[i].append(math.log(ratio[i]))

    def _hook(self, layer: Layer) -> Callable[..., None]:
        i = layer.index
        owns = next(layer.module.parameters(recurse=False), None) is not None
        is_cf = isinstance(layer.module, CHANNELS_FIRST)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = first_tensor(output)
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if self.order[i] < 0:
                self.order[i] = self._calls
                self._calls += 1
            cf = is_cf or self._channels_first
            if y is not None and y.ndim >= 2:
                self.width[i] = y.shape[1] if (cf and y.ndim >= 3) else y.shape[-1]
            if self._rank_now:
                for t, sink in ((x, self.rank_in[i]), (y, self.rank_out[i])):
                    m = feature_matrix(t, cf) if t is not None else None
                    if m is not None:
                        sink.append(participation_ratio(m))
            if y is not None:
                self.probes.on_grad(y, lambda g: self._add(self._out_norm, i, g))
            if x is not None:
                self.probes.on_grad(x, lambda g: self._add(self._in_norm, i, g))
            if owns or is_cf:
                self._channels_first = is_cf

        return hook

    @staticmethod
    def _add(acc: np.ndarray, i: int, g: torch.Tensor) -> None:
        acc[i] += float(torch.linalg.vector_norm(torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)))

    # -- results -----------------------------------------------------------------------------------------
    def effective_rank_in(self) -> np.ndarray:
        return np.array([_nanmean(r) for r in self.rank_in])

    def effective_rank_out(self) -> np.ndarray:
        return np.array([_nanmean(r) for r in self.rank_out])

    def log_gain(self) -> np.ndarray:
        """Mean over backward passes of ln(||dL/d input|| / ||dL/d output||): the layer's divergence."""
        return np.array([_nanmean(g) for g in self._log_gain])


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")
