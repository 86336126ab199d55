"""Lipschitz estimates: empirical difference quotients, power iteration on the Jacobian, weight bound.

The empirical and power-iteration numbers are lower bounds of the true constant (they are attained
somewhere); the weight bound (product of the spectral norms) is an upper bound only for chains of
Linear layers and 1-Lipschitz activations, which `is_upper_bound` reports.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..context import ModuleContext
from ..result import AnalysisResult
from .common import eval_mode, joint_norm
from .linalg import is_finite, operator_norm

ID = "lipschitz"
Inputs = dict[str, torch.Tensor]

ONE_LIPSCHITZ = (
    nn.ReLU,
    nn.ReLU6,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
)


def _one_lipschitz(m: nn.Module) -> bool:
    if isinstance(m, ONE_LIPSCHITZ):
        return True
    if isinstance(m, nn.LeakyReLU):
        return abs(m.negative_slope) <= 1.0
    if isinstance(m, nn.ELU):
        return 0.0 <= m.alpha <= 1.0
    return False


def is_linear_chain(m: nn.Module) -> bool:
    """True for a Linear layer or a (nested) Sequential of Linear layers and 1-Lipschitz activations."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Sequential):
        return all(is_linear_chain(c) or _one_lipschitz(c) for c in m)
    return False


def weight_bound(module: nn.Module) -> float | None:
    """Product of the spectral norms of all weights with two or more dimensions (None if there are none)."""
    norms = [operator_norm(p) for p in module.parameters() if p.dim() >= 2 and is_finite(p)]
    if not norms:
        return None
    return math.prod(norms)


def _scale(d: Inputs, s: float) -> Inputs:
    return {k: v * s for k, v in d.items()}


def _add(a: Inputs, b: Inputs, s: float = 1.0) -> Inputs:
    return {k: a[k] + s * b[k] for k in a}


def empirical(ctx: ModuleContext, n: int, seed_offset: int = 300) -> float:
    """max ||f(x) - f(y)|| / ||x - y|| over small perturbations y = x + d and over independent pairs."""
    gen = ctx.generator(seed_offset)
    rel = ctx.finfo.eps**0.5  # perturbation size relative to ||x||, above the rounding noise of the dtype
    best = 0.0
    with torch.no_grad(), eval_mode(ctx.module):
        for _ in range(n):
            x = ctx.inputs("normal", gen)
            fx = ctx.forward(x)
            d = ctx.inputs("normal", gen)
            d = _scale(d, rel * joint_norm(x.values()) / max(joint_norm(d.values()), 1e-30))
            y = _add(x, d)
            delta = {k: (y[k].double() - x[k].double()) for k in x}  # the step as actually stored
            dn = joint_norm(delta.values())
            if dn > 0:
                best = max(best, joint_norm([ctx.forward(y).double() - fx.double()]) / dn)
            z = ctx.inputs("normal", gen)
            zn = joint_norm([z[k].double() - x[k].double() for k in x])
            if zn > 0:
                best = max(best, joint_norm([ctx.forward(z).double() - fx.double()]) / zn)
    return best


class JacobianOps:
    """J v (double-backward trick, finite differences as a fallback) and J^T u (reverse mode) at a point."""

    def __init__(self, ctx: ModuleContext, x: Inputs) -> None:
        self.ctx = ctx
        self.x = {k: v.detach() for k, v in x.items()}
        self.names = list(x)
        self.method = "autograd"

    def _f(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.ctx.forward(dict(zip(self.names, xs, strict=True)))

    def jvp(self, v: Inputs) -> torch.Tensor:
        tangents = [v[k].to(self.ctx.dtype) for k in self.names]
        if self.method == "autograd":
            try:
                return self._jvp_double_backward(tangents)
            except Exception:
                self.method = "central finite differences"
        h = self.ctx.finfo.eps ** (1 / 3) * max(1.0, joint_norm(self.x.values()))
        step = dict(zip(self.names, tangents, strict=True))
        with torch.no_grad():
            plus = self.ctx.forward(_add(self.x, step, h)).double()
            minus = self.ctx.forward(_add(self.x, step, -h)).double()
        return (plus - minus) / (2 * h)

    def _jvp_double_backward(self, tangents: list[torch.Tensor]) -> torch.Tensor:
        """J v = d/dw <J^T w, v>: two reverse passes, scalar outputs only (no grad_outputs shape checks)."""
        xs = [x.clone().requires_grad_(True) for x in self.x.values()]
        with torch.enable_grad():
            out = self._f(*xs)
            if not out.requires_grad:
                return torch.zeros(out.shape, dtype=torch.float64, device=out.device)
            w = torch.zeros_like(out, requires_grad=True)
            grads = torch.autograd.grad((out * w).sum(), xs, create_graph=True, allow_unused=True)
            inner = [(g * t).sum() for g, t in zip(grads, tangents, strict=True) if g is not None]
            total = torch.stack(inner).sum() if inner else None
            if total is None or not total.requires_grad:
                return torch.zeros(out.shape, dtype=torch.float64, device=out.device)
            (jv,) = torch.autograd.grad(total, w, allow_unused=True)
        if jv is None:
            return torch.zeros(out.shape, dtype=torch.float64, device=out.device)
        return jv.double()

    def vjp(self, u: torch.Tensor) -> Inputs:
        xs = {k: v.clone().requires_grad_(True) for k, v in self.x.items()}
        with torch.enable_grad():
            out = self.ctx.forward(xs)
            if not out.requires_grad:  # the output does not depend on the inputs: J = 0
                return {k: torch.zeros_like(v, dtype=torch.float64) for k, v in xs.items()}
            grads = torch.autograd.grad((out * u.to(out.dtype)).sum(), list(xs.values()), allow_unused=True)
        return {
            k: (g.double() if g is not None else torch.zeros_like(xs[k], dtype=torch.float64))
            for k, g in zip(self.names, grads, strict=True)
        }


def power_iteration(ops: JacobianOps, iters: int, gen: torch.Generator) -> float:
    """Largest singular value of the Jacobian by power iteration on J^T J (a lower bound that converges)."""
    v = {
        k: torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float64) for k, t in ops.x.items()
    }
    v = _scale(v, 1.0 / joint_norm(v.values()))
    sigma = 0.0
    for _ in range(iters):
        jv = ops.jvp(v)
        sigma = joint_norm([jv])
        if sigma == 0.0 or not math.isfinite(sigma):
            return sigma
        w = ops.vjp(jv / sigma)
        wn = joint_norm(w.values())
        if wn == 0.0 or not math.isfinite(wn):
            return sigma
        v = _scale(w, 1.0 / wn)
    return max(sigma, joint_norm([ops.jvp(v)]))


def jacobian_norm(ctx: ModuleContext, points: int, iters: int, seed_offset: int = 400) -> tuple[float, str]:
    """max over a few normal input points of sigma_max(J(x)), and the method used for J v."""
    gen = ctx.generator(seed_offset)
    best, method = 0.0, "autograd"
    with eval_mode(ctx.module):
        for _ in range(points):
            ops = JacobianOps(ctx, ctx.inputs("normal", gen))
            best = max(best, power_iteration(ops, iters, gen))
            method = ops.method
    return best, method


def judge(value: dict[str, Any], limit: float, rel_tol: float = 1e-3) -> AnalysisResult:
    """`rel_tol`: how far rounding in the module's dtype may push an estimate above a true bound."""
    estimates = [value["empirical"], value["power_iteration"]]
    head = f"empirical {value['empirical']:.4g}, power iteration {value['power_iteration']:.4g}"
    bound = value["weight_bound"]
    if bound is not None:
        head += f", weight bound {bound:.4g}" + ("" if value["is_upper_bound"] else " (heuristic)")
    if not all(math.isfinite(e) for e in estimates):
        return AnalysisResult(ID, value, False, f"{head}: non-finite estimate", "error", ID)
    if value["is_upper_bound"] and bound is not None and max(estimates) > bound * (1 + rel_tol) + 1e-6:
        return AnalysisResult(ID, value, False, f"{head}: estimate above the weight bound", "error", ID)
    if max(estimates) > limit:
        return AnalysisResult(
            ID, value, False, f"{head}: >> 1, unstable (healthy ~1, limit {limit:g})", "warning", ID
        )
    return AnalysisResult(ID, value, True, f"{head} (healthy ~1, limit {limit:g})", "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    n = ctx.config.n_samples
    emp = empirical(ctx, n)
    pi, method = jacobian_norm(ctx, points=min(4, n), iters=ctx.config.power_iterations)
    value = {
        "empirical": emp,
        "power_iteration": pi,
        "power_iteration_method": method,
        "weight_bound": weight_bound(ctx.module),
        "is_upper_bound": is_linear_chain(ctx.module),
    }
    return [judge(value, ctx.config.ranges.lipschitz_max, rel_tol=max(1e-3, 10 * ctx.finfo.eps))]
