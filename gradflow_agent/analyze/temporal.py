"""TemporalAnalyzer (seed 004): the RecurrentAnalyzer behind seed 004's calling convention.

    temporal = TemporalAnalyzer(sequence_length=100)
    report = temporal.analyze(rnn_model, seqs, targets, loss_fn)
    temporal.get_temporal_metrics(); temporal.get_timestep_profile("rnn"); temporal.get_effective_memory()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..report.flow_report import FlowReport
from .base import contract_call
from .core import FlowEngine
from .engine import NO_TARGET, batches_from
from .recurrent import RecurrentAnalyzer, TemporalMetrics


class TemporalAnalyzer(RecurrentAnalyzer):
    """Gradient flow through time; `sequence_length` cuts batch-first inputs (B, T, ...) to their first T steps.

    The contract (`analyze(model, inputs, *, loss_fn, targets, steps=5) -> FlowReport`), or seed 004's
    `analyze(model, seqs, targets, loss_fn, steps=5) -> FlowReport`: the same call, positionally."""

    analyzer_name = "TemporalAnalyzer"
    default_steps = 5

    def __init__(self, sequence_length: int | None = None, model: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.sequence_length = sequence_length

    def analyze(self, *args: Any, **kwargs: Any) -> FlowReport:  # type: ignore[override]
        if contract_call(args, kwargs, frozenset({"seqs"})):
            return FlowEngine.analyze(self, *args, **kwargs)
        return self._seed004(*args, **kwargs)

    def _seed004(self, model: nn.Module | None = None, seqs: Any = None, targets: Any = NO_TARGET,
                 loss_fn: Callable[..., torch.Tensor] | None = None, steps: int = 5, *,
                 title: str | None = None) -> FlowReport:
        return self._analyze(self._bind(model), batches_from(x=seqs, y=targets), loss_fn, steps, title)

    def _prepare(self, batch_fn: Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
        if self.sequence_length is None:
            return batch_fn
        T = self.sequence_length

        def cut() -> tuple[Any, Any]:
            x, y = batch_fn()
            return (x[:, :T] if isinstance(x, torch.Tensor) and x.ndim >= 2 else x), y
        return cut

    def get_temporal_metrics(self) -> dict[str, TemporalMetrics]:
        """TemporalMetrics per recurrent layer of the last analysis."""
        return dict(self.dynamics.layers)

    def _layer(self, layer: str | None) -> TemporalMetrics:
        layers = self.dynamics.layers
        if not layers:
            raise RuntimeError("no recurrent layer was analysed")
        return layers[layer] if layer is not None else next(iter(layers.values()))

    def get_timestep_profile(self, layer: str | None = None, source: str = "loss") -> np.ndarray:
        """Pressure at each timestep: ||dL/dx_t|| for t = 0..T-1 (source="loss"), or the probe's gradient
        through time g_k for k = 0..T-1 timesteps back (source="probe")."""
        m = self._layer(layer)
        values = m.timestep_pressure if source == "loss" else m.gradient_profile
        return np.asarray(values, dtype=np.float64)

    def get_effective_memory(self, layer: str | None = None) -> dict[str, int] | int:
        """Effective memory length of one layer, or of every layer (a dict) when none is named."""
        if layer is not None:
            return self._layer(layer).effective_memory_length
        return {k: m.effective_memory_length for k, m in self.dynamics.layers.items()}
