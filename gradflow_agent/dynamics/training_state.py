"""`GradientMetrics` and `MomentumMetrics` (seed 002's `gradient_enabled` / `momentum_enabled`).

They relate the current gradient and the optimizer's first moment to the parameter change over the
window: whether the optimizer still pushes the way the weights have been moving.

  gradient/norm_l2, gradient/norm_max       of the gradients present at the measurement
  gradient/update_cosine                    cos(-g, Δ): > 0 when the gradient still points along Δ
  momentum/norm_l2                          of Adam's exp_avg (or SGD's momentum_buffer)
  momentum/second_moment_mean               mean of Adam's exp_avg_sq
  momentum/grad_cosine                      cos(g, m): agreement of this gradient with the running mean
  momentum/update_cosine                    cos(-m, Δ)

The gradients must still be there when the measurement runs (the agent's plug-in runs right after the
optimizer step, before the next zero_grad). Parameters without a gradient or state are left out.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..export.metrics import Metric
from .computer import MetricComputer


def _dot_and_norms(pairs) -> tuple[float, float, float]:
    """sum x*y, sum x*x, sum y*y over (x, y) chunk pairs, one host transfer."""
    acc = None
    for x, y in pairs:
        x, y = x.float(), y.float()
        row = torch.stack([(x * y).sum(), x.square().sum(), y.square().sum()]).double()
        acc = row if acc is None else acc + row.to(acc.device)
    if acc is None:
        return float("nan"), float("nan"), float("nan")
    dot, xx, yy = acc.tolist()
    return dot, xx, yy


def _cos(dot: float, xx: float, yy: float) -> float:
    return dot / math.sqrt(xx * yy) if xx > 0 and yy > 0 else float("nan")


def _with_delta(delta, tensors: dict[str, torch.Tensor]):
    """(tensor chunk, Δ chunk) pairs for the parameters that have a tensor (grad or optimizer state)."""
    for name in delta.names:
        t = tensors.get(name)
        if t is None:
            continue
        flat = t.detach().reshape(-1)
        for s, d in delta.chunks(name):
            yield flat[s:s + d.numel()].to(d.device), d


GRADIENT = {
    "norm_l2": Metric("gradflow_dynamics_grad_l2_norm", "gauge",
                      "L2 norm of the gradients present at the dynamics measurement."),
    "norm_max": Metric("gradflow_dynamics_grad_max_abs", "gauge",
                       "Largest absolute gradient element at the dynamics measurement."),
    "update_cosine": Metric("gradflow_dynamics_grad_update_cosine", "gauge",
                            "Cosine between the negative gradient and the parameter change over the window."),
}
MOMENTUM = {
    "norm_l2": Metric("gradflow_dynamics_momentum_l2_norm", "gauge",
                      "L2 norm of the optimizer's first moment (Adam exp_avg, SGD momentum_buffer)."),
    "second_moment_mean": Metric("gradflow_dynamics_momentum_second_moment_mean", "gauge",
                                 "Mean of the optimizer's second moment (Adam exp_avg_sq)."),
    "grad_cosine": Metric("gradflow_dynamics_momentum_grad_cosine", "gauge",
                          "Cosine between the current gradient and the optimizer's first moment."),
    "update_cosine": Metric("gradflow_dynamics_momentum_update_cosine", "gauge",
                            "Cosine between the negative first moment and the parameter change over the window."),
}
_KEY = re.compile(r"^(gradient|momentum)/(\w+)$")


def _describe(key: str) -> tuple[Metric, dict[str, str]] | None:
    m = _KEY.match(key)
    if not m:
        return None
    table = GRADIENT if m.group(1) == "gradient" else MOMENTUM
    metric = table.get(m.group(2))
    return (metric, {}) if metric is not None else None


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and not p.grad.is_sparse}


class GradientMetrics(MetricComputer):
    """Size of the current gradient and its alignment with the parameter change."""

    name = "gradient"
    catalogue = tuple(GRADIENT.values())

    def compute(self, delta: Any = None, snapshot: Any = None, context: Any = None, **kwargs: Any) -> dict[str, float]:
        model = getattr(context, "model", None)
        grads = _grads(model) if model is not None else {}
        if not grads:
            return {}
        dev = next(iter(grads.values())).device
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).double().square().to(dev)
                          for g in grads.values()]).sum()
        mx = torch.stack([g.detach().abs().max().float().to(sq.device) for g in grads.values() if g.numel()]).max()
        out = {"gradient/norm_l2": math.sqrt(sq.item()), "gradient/norm_max": float(mx.item())}
        if delta is not None:
            dot, gg, dd = _dot_and_norms(_with_delta(delta, grads))
            out["gradient/update_cosine"] = _cos(-dot, gg, dd)
        return out

    def describe(self, key: str) -> tuple[Metric, dict[str, str]] | None:
        return _describe(key)


class MomentumMetrics(MetricComputer):
    """The optimizer's first and second moments, and how they align with the gradient and the change."""

    name = "momentum"
    catalogue = tuple(MOMENTUM.values())

    def compute(self, delta: Any = None, snapshot: Any = None, context: Any = None, **kwargs: Any) -> dict[str, float]:
        model, opt = getattr(context, "model", None), getattr(context, "optimizer", None)
        if model is None or opt is None:
            return {}
        first, second = {}, {}
        for name, p in model.named_parameters():
            state = opt.state.get(p, {})
            m = state.get("exp_avg", state.get("momentum_buffer"))
            if isinstance(m, torch.Tensor) and m.shape == p.shape:
                first[name] = m
            v = state.get("exp_avg_sq")
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                second[name] = v
        out: dict[str, float] = {}
        if first:
            _, mm, _ = _dot_and_norms((m.reshape(-1), m.reshape(-1)) for m in first.values())
            out["momentum/norm_l2"] = math.sqrt(mm)
            grads = _grads(model)
            pairs = [(grads[n].reshape(-1), first[n].reshape(-1)) for n in first if n in grads]
            if pairs:
                out["momentum/grad_cosine"] = _cos(*_dot_and_norms(pairs))
            if delta is not None:
                dot, mm2, dd = _dot_and_norms(_with_delta(delta, first))
                out["momentum/update_cosine"] = _cos(-dot, mm2, dd)
        if second:
            total = sum(v.numel() for v in second.values())
            s = sum(v.sum(dtype=torch.float64).item() for v in second.values())
            out["momentum/second_moment_mean"] = s / total if total else float("nan")
        return out

    def describe(self, key: str) -> tuple[Metric, dict[str, str]] | None:
        return _describe(key)
