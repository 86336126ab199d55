"""Extra forward hooks for the offline analyzers, registered through the agent's one hook mechanism.

The agent's HookManager measures what a live monitor can afford, including each layer's output-gradient norm
(stats/output_grads.py). The analyzers need a few things more (effective ranks of layer inputs/outputs, input
gradients, attention maps, recurrent inputs); they get them from forward hooks on the same `hooks.Layer`
objects the agent selected, registered with `hooks.add_module_hook` (so deepcopy/torch.save of the model never
carry them), every handle kept and removed, forward re-runs inside backward (activation checkpointing) ignored,
tensor hooks for gradients (never full backward hooks, which break with in-place ops), and a failing probe
counted in the agent's ErrorCounter instead of raised into the run. Hooks never read a value to the host: they
reduce on the device and the analysis reads the results once after the pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ErrorCounter
from ..hooks import HandleSet, Layer, add_module_hook, in_backward
from ..snapshot import Snapshot
from ..stats.kinds import CHANNELS_FIRST, first_tensor
from ..stats.output_grads import OutputGradStats


class Probes(HandleSet):
    """Owns the analyzers' hook handles; every callback is guarded."""

    def __init__(self, errors: ErrorCounter | None = None) -> None:
        self.errors = errors if errors is not None else ErrorCounter()
        self.enabled = True
        self._handles: list[Any] = []

    def _guard(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            if not self.enabled or in_backward():
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

        self._handles.append(add_module_hook(module, hook, with_kwargs=with_kwargs))

    def pre(self, module: nn.Module, fn: Callable[..., Any], *, name: str = "probe-pre",
            with_kwargs: bool = False) -> None:
        """fn(module, args) (or (module, args, kwargs)) before each forward call; may return new arguments."""
        self._handles.append(add_module_hook(module, self._guard(name, fn), pre=True, with_kwargs=with_kwargs))

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
    (N, T, D) and other layouts: the last dimension is the feature. Sub-sampling takes evenly strided rows and
    columns (deterministic, and no index tensor sent to the device inside a hook); `seed` is kept for callers.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < 2 or t.numel() == 0:
        return None
    x = t.detach()
    if channels_first and x.ndim >= 3:
        x = x.movedim(1, -1)
    x = x.reshape(-1, x.shape[-1])
    if x.shape[1] < 2:
        return None
    if x.shape[0] > max_rows:
        x = x[::math.ceil(x.shape[0] / max_rows)]
    if x.shape[1] > max_cols:
        x = x[:, ::math.ceil(x.shape[1] / max_cols)]
    return x


def participation_ratio_t(x: torch.Tensor) -> torch.Tensor:
    """Effective dimensionality (sum lambda)^2 / sum lambda^2 of the covariance eigenvalues of the rows of `x`,
    as a 0-dim tensor on x's device (no host read). sum lambda = ||X||_F^2 and sum lambda^2 = ||X^T X||_F^2 of
    the centred X, so no SVD is needed (an SVD on CUDA synchronises with the host, and costs far more)."""
    x = torch.nan_to_num(x.detach().double(), nan=0.0, posinf=0.0, neginf=0.0)
    if x.ndim != 2 or x.shape[0] < 2:
        return torch.full((), float("nan"), dtype=torch.float64, device=x.device)
    x = x - x.mean(0, keepdim=True)
    gram = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    total = x.square().sum()
    pr = total * total / gram.square().sum()
    return torch.where((total > 0) & torch.isfinite(pr), pr, float("nan"))


def participation_ratio(x: torch.Tensor | np.ndarray) -> float:
    """Effective dimensionality (sum lambda)^2 / sum lambda^2 of the covariance eigenvalues of rows of `x`.

    1 when every observation lies on one line, the number of features when variance is spread evenly.
    """
    return float(participation_ratio_t(torch.as_tensor(x)))


class LayerFlowProbe:
    """Per layer: forward execution order, output width, effective rank of input and output, backward gain.

    Backward gain = ||dL/d input|| / ||dL/d output||, per backward pass, where `input` is the tensor entering
    the layer (its gradient includes every consumer of that tensor: exact on a chain of layers). ||dL/d output||
    is the agent's own statistic (`output_grad_norm` of the step's snapshot, stats/output_grads.py); the input
    side is measured by the same statistics class on the layer inputs. Ranks are reduced on the device in the
    hook and read with the input norms once per step, after the backward pass.
    """

    def __init__(self, layers: list[Layer], probes: Probes, *, measure_rank: bool = True,
                 device: torch.device | None = None) -> None:
        self.layers = layers
        self.probes = probes
        self.measure_rank = measure_rank
        L = len(layers)
        self.order = np.full(L, -1, dtype=np.int64)
        self.width = np.zeros(L, dtype=np.int64)
        self.rank_in: list[list[float]] = [[] for _ in range(L)]
        self.rank_out: list[list[float]] = [[] for _ in range(L)]
        self._log_gain: list[list[float]] = [[] for _ in range(L)]
        self._inputs = OutputGradStats(L, device or torch.device("cpu"))  # ||dL/d input||, per layer and step
        self._in_norm = np.full(L, np.nan)
        self._ranks: list[tuple[list[float], torch.Tensor]] = []  # (sink, 0-dim device tensor) of this step
        self._calls = 0
        self._rank_now = False
        self._channels_first = False
        for layer in layers:
            probes.forward(layer.module, self._hook(layer), name="layer-flow-probe")

    def begin_step(self, rank_now: bool) -> None:
        self._rank_now = rank_now and self.measure_rank
        self._in_norm[:] = np.nan

    def end_step(self) -> None:
        """After backward: read this step's input-gradient norms and ranks from the device, in one transfer each."""
        seen = self._inputs.count > 0
        host = [t.cpu().numpy() for t in self._inputs.device_parts()]
        norms = self._inputs.finish(host)["output_grad_norm"]
        self._in_norm = np.where(seen, norms, np.nan)
        if self._ranks:
            values = torch.stack([t for _, t in self._ranks]).cpu().tolist()
            for (sink, _), v in zip(self._ranks, values):
                sink.append(v)
            self._ranks = []

    def add_output_norms(self, snapshot: Snapshot | None) -> None:
        """Fold this step's gains: the input norms of end_step over the agent's output-gradient norms."""
        if snapshot is None or "output_grad_norm" not in snapshot.stats:
            return
        out = np.asarray(snapshot.stats["output_grad_norm"], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = self._in_norm / out
        for i in np.flatnonzero((self._in_norm > 0) & (out > 0) & np.isfinite(ratio)):
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
                        self._ranks.append((sink, participation_ratio_t(m)))
            if x is not None:
                self._inputs.watch(i, x)
            if owns or is_cf:
                self._channels_first = is_cf

        return hook

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
