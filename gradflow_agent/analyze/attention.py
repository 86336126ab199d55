"""AttentionAnalyzer (seed 004): the TransformerAnalyzer behind seed 004's calling convention.

    attention = AttentionAnalyzer(num_heads=8)
    report = attention.analyze(transformer, tokens, labels, loss_fn)
    attention.get_transformer_metrics(); attention.get_layer_metrics(name); attention.get_attention_profile()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..report.flow_report import FlowReport
from .base import contract_call
from .core import FlowEngine
from .engine import NO_TARGET, batches_from
from .transformer import AttentionLayerMetrics, AttentionStats, TransformerAnalyzer


class AttentionAnalyzer(TransformerAnalyzer):
    """Q/K/V gradients, residual health, head balance and FFN bottlenecks of a transformer.

    The contract (`analyze(model, inputs, *, loss_fn, targets, steps=5) -> FlowReport`), or seed 004's
    `analyze(model, tokens, labels, loss_fn, steps=5) -> FlowReport`. `num_heads`, when given, is checked
    against every nn.MultiheadAttention found (a mismatch is in the report's meta as `num_heads_mismatch`).
    """

    analyzer_name = "AttentionAnalyzer"
    default_steps = 5

    def __init__(self, num_heads: int | None = None, model: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.num_heads = num_heads

    def analyze(self, *args: Any, **kwargs: Any) -> FlowReport:  # type: ignore[override]
        if contract_call(args, kwargs, frozenset({"tokens", "labels"})):
            return FlowEngine.analyze(self, *args, **kwargs)
        return self._seed004(*args, **kwargs)

    def _seed004(self, model: nn.Module | None = None, tokens: Any = None, labels: Any = NO_TARGET,
                 loss_fn: Callable[..., torch.Tensor] | None = None, steps: int = 5, *,
                 title: str | None = None) -> FlowReport:
        return self._analyze(self._bind(model), batches_from(x=tokens, y=labels), loss_fn, steps, title)

    def _finish(self, report: FlowReport, model: nn.Module) -> None:
        super()._finish(report, model)
        if self.num_heads is not None:
            wrong = {n: m.num_heads for n, m in model.named_modules()
                     if isinstance(m, nn.MultiheadAttention) and m.num_heads != self.num_heads}
            if wrong:
                report.meta["num_heads_mismatch"] = wrong

    def get_transformer_metrics(self) -> AttentionStats:
        st = self.results.get("attention")
        if st is None:
            raise RuntimeError("no analysis yet: call analyze() first")
        return st

    def get_layer_metrics(self, layer: str) -> AttentionLayerMetrics:
        return self.get_transformer_metrics().layers[layer]

    def get_attention_profile(self) -> dict[str, dict[str, float]]:
        """Q/K/V gradient norms of every attention layer, in model order."""
        return {name: {"q": m.q_grad, "k": m.k_grad, "v": m.v_grad, "imbalance": m.qkv_imbalance}
                for name, m in self.get_transformer_metrics().layers.items()}
