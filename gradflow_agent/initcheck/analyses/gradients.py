"""Gradient existence, norms, completeness and input gradient, once per requested loss function."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..context import ModuleContext
from ..result import AnalysisResult, skipped
from .common import joint_norm, train_mode

ID = "gradient"


@dataclass
class Backward:
    """What one backward pass left behind, detached from the graph."""

    loss: float
    param_grads: dict[str, torch.Tensor | None]  # trainable parameters only
    input_grads: dict[str, torch.Tensor | None]


def backward_pass(ctx: ModuleContext, loss_name: str, seed_offset: int = 200) -> Backward | None:
    """Forward in train mode on normal inputs, backward of the loss; None when the output has no graph."""
    ctx.zero_grad()
    gen = ctx.generator(seed_offset)
    with train_mode(ctx.module), torch.enable_grad():
        inputs = ctx.inputs("normal", gen, requires_grad=True)
        out = ctx.forward(inputs)
        if not out.requires_grad:
            return None
        loss = ctx.loss(loss_name, out, inputs, gen)
        loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in ctx.trainable()}
    in_grads = {n: (x.grad.detach().clone() if x.grad is not None else None) for n, x in inputs.items()}
    ctx.zero_grad()
    return Backward(float(loss.detach()), grads, in_grads)


def grad_norms(grads: dict[str, torch.Tensor | None]) -> dict[str, float | None]:
    return {n: (joint_norm([g]) if g is not None else None) for n, g in grads.items()}


def existence(bw: Backward, loss_name: str) -> AnalysisResult:
    name = f"{ID}.existence[{loss_name}]"
    missing = [n for n, g in bw.param_grads.items() if g is None]
    total = len(bw.param_grads)
    value = {"parameters": total, "with_gradient": total - len(missing), "missing": missing}
    if missing:
        msg = (
            f"{len(missing)} of {total} trainable parameters get no gradient (not in the graph): "
            + ", ".join(missing)
        )
        return AnalysisResult(name, value, False, msg, "error", ID)
    return AnalysisResult(name, value, True, f"all {total} trainable parameters get a gradient", "info", ID)


def norms(bw: Backward, loss_name: str) -> AnalysisResult:
    name = f"{ID}.norms[{loss_name}]"
    per = grad_norms(bw.param_grads)
    present = [g for g in bw.param_grads.values() if g is not None]
    total = joint_norm(present) if present else 0.0
    value = {"loss": bw.loss, "total": total, "per_parameter": per}
    finite = [v for v in per.values() if v is not None]
    if not math.isfinite(total) or not math.isfinite(bw.loss):
        return AnalysisResult(
            name, value, False, f"non-finite gradient norm (loss {bw.loss:.4g})", "error", ID
        )
    rng = f", min {min(finite):.3g}, max {max(finite):.3g}" if finite else ""
    return AnalysisResult(name, value, True, f"total {total:.4g}{rng} (loss {bw.loss:.4g})", "info", ID)


def completeness(bw: Backward, loss_name: str, vanishing: float) -> AnalysisResult:
    name = f"{ID}.completeness[{loss_name}]"
    dead, tiny, partial = [], [], {}
    for n, g in bw.param_grads.items():
        if g is None:
            continue
        norm = joint_norm([g])
        if norm == 0.0:
            dead.append(n)
        elif norm < vanishing:
            tiny.append(n)
        zero_frac = float((g == 0).float().mean()) if g.numel() else 0.0
        if 0.0 < zero_frac < 1.0:
            partial[n] = zero_frac
    value = {
        "dead": dead,
        "vanishing": tiny,
        "vanishing_threshold": vanishing,
        "zero_entry_fraction": partial,
    }
    problems = []
    if dead:
        problems.append(f"zero gradient: {', '.join(dead)}")
    if tiny:
        problems.append(f"vanishing (< {vanishing:g}): {', '.join(tiny)}")
    if problems:
        return AnalysisResult(name, value, False, "; ".join(problems), "warning", ID)
    return AnalysisResult(name, value, True, "no dead or vanishing parameter gradients", "info", ID)


def input_gradient(bw: Backward, loss_name: str) -> AnalysisResult:
    name = f"{ID}.input[{loss_name}]"
    per: dict[str, Any] = {n: (joint_norm([g]) if g is not None else None) for n, g in bw.input_grads.items()}
    value = {"per_input": per}
    none = [n for n, v in per.items() if v is None]
    if any(v is not None and not math.isfinite(v) for v in per.values()):
        return AnalysisResult(name, value, False, "non-finite input gradient", "error", ID)
    if none:
        return AnalysisResult(
            name, value, False, f"the output does not depend on input {', '.join(none)}", "warning", ID
        )
    zero = [n for n, v in per.items() if v == 0.0]
    shown = ", ".join(f"{n}={v:.4g}" for n, v in per.items())
    if zero:
        msg = f"zero gradient w.r.t. {', '.join(zero)}: the loss is insensitive to the input ({shown})"
        return AnalysisResult(name, value, False, msg, "warning", ID)
    return AnalysisResult(name, value, True, f"||dL/dx|| {shown}", "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    results: list[AnalysisResult] = []
    for i, loss_name in enumerate(ctx.config.loss_fns):
        bw = backward_pass(ctx, loss_name, seed_offset=200 + i)
        if bw is None:
            results.append(
                skipped(ID, "the output does not require grad (no gradient)", f"{ID}[{loss_name}]")
            )
            continue
        if bw.param_grads:
            results.append(existence(bw, loss_name))
            results.append(norms(bw, loss_name))
            results.append(completeness(bw, loss_name, ctx.config.ranges.vanishing_grad_norm))
        else:
            results.append(skipped(ID, "no trainable parameters", f"{ID}.parameters[{loss_name}]"))
        results.append(input_gradient(bw, loss_name))
    return results
