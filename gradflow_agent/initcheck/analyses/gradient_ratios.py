"""Gradient-norm ratios between consecutive layers, to see vanishing or exploding gradient flow.

A layer is a module that owns trainable parameters directly; layers are ordered by their first call
in the forward pass (modules never called as modules follow in registration order). For consecutive
layers a -> b the ratio is ||grad a|| / ||grad b||: the gradient one layer further from the output over
the one before it in backpropagation. < 0.1 vanishing, > 10 exploding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradflow_agent.hooks import add_module_hook

from ..context import ModuleContext
from ..result import AnalysisResult, skipped
from .common import joint_norm, train_mode

ID = "gradient_ratios"


def layer_order(ctx: ModuleContext) -> list[tuple[str, nn.Module]]:
    """Modules with direct trainable parameters, in the order the forward pass first calls them."""
    owners = [
        (name, m)
        for name, m in ctx.module.named_modules()
        if any(p.requires_grad for p in m.parameters(False))
    ]
    order: list[str] = []

    def make_hook(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [add_module_hook(m, make_hook(name), pre=True) for name, m in owners]  # the one hook mechanism
    try:
        with torch.no_grad(), train_mode(ctx.module):
            ctx.call(ctx.inputs("normal", ctx.generator(0)))
    finally:
        for h in handles:
            h.remove()
    rank = {name: i for i, name in enumerate(order)}
    return sorted(owners, key=lambda item: rank.get(item[0], len(order)))


def layer_grad_norms(
    ctx: ModuleContext, layers: list[tuple[str, nn.Module]], loss_name: str
) -> list[float | None]:
    ctx.zero_grad()
    gen = ctx.generator(600)
    with train_mode(ctx.module), torch.enable_grad():
        inputs = ctx.inputs("normal", gen, requires_grad=True)
        out = ctx.forward(inputs)
        if not out.requires_grad:
            return [None] * len(layers)
        ctx.loss(loss_name, out, inputs, gen).backward()
    norms: list[float | None] = []
    for _, m in layers:
        grads = [p.grad for p in m.parameters(False) if p.requires_grad and p.grad is not None]
        norms.append(joint_norm(grads) if grads else None)
    ctx.zero_grad()
    return norms


def ratio(lower: float, upper: float) -> float:
    if upper == 0.0:
        return math.nan if lower == 0.0 else math.inf
    return lower / upper


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    layers = layer_order(ctx)
    if len(layers) < 2:
        return [skipped(ID, f"needs at least two layers with parameters, found {len(layers)}")]
    loss_name = ctx.config.loss_fns[0]
    norms = layer_grad_norms(ctx, layers, loss_name)
    with_grad = [(n, m, g) for (n, m), g in zip(layers, norms, strict=True) if g is not None]
    if len(with_grad) < 2:
        return [skipped(ID, f"fewer than two layers receive a gradient ({len(with_grad)})")]
    lo, hi = ctx.config.ranges.gradient_ratio
    pairs = []
    for (a, _, ga), (b, _, gb) in zip(with_grad, with_grad[1:], strict=False):
        pairs.append({"layer": a or "<root>", "next_layer": b or "<root>", "ratio": ratio(ga, gb)})
    ratios = [p["ratio"] for p in pairs]
    value = {
        "loss": loss_name,
        "layers": [
            {"name": n or "<root>", "type": type(m).__name__, "grad_norm": g} for n, m, g in with_grad
        ],
        "pairs": pairs,
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }
    bad_nonfinite = [p for p in pairs if not math.isfinite(p["ratio"])]
    vanishing = [p for p in pairs if math.isfinite(p["ratio"]) and p["ratio"] < lo]
    exploding = [p for p in pairs if math.isfinite(p["ratio"]) and p["ratio"] > hi]
    band = f"healthy {lo:g}-{hi:g}"
    if bad_nonfinite:
        msg = "undefined ratio (zero gradient): " + ", ".join(
            f"{p['layer']}/{p['next_layer']}" for p in bad_nonfinite
        )
        return [AnalysisResult(ID, value, False, msg, "warning", ID)]
    problems = [f"vanishing at {p['layer']}/{p['next_layer']} ({p['ratio']:.3g})" for p in vanishing]
    problems += [f"exploding at {p['layer']}/{p['next_layer']} ({p['ratio']:.3g})" for p in exploding]
    head = f"{len(pairs)} ratios in [{value['min_ratio']:.3g}, {value['max_ratio']:.3g}]"
    if problems:
        return [AnalysisResult(ID, value, False, f"{head}: {'; '.join(problems)} ({band})", "warning", ID)]
    return [AnalysisResult(ID, value, True, f"{head} ({band})", "info", ID)]
