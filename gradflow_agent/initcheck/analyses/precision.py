"""Numerical precision: NaN/Inf and extreme values in parameters, outputs and gradients."""

from __future__ import annotations

from typing import Any

import torch

from ..context import ModuleContext, output_tensors
from ..result import AnalysisResult, skipped
from .common import abs_max, eval_mode, nonfinite_counts
from .gradients import backward_pass

ID = "numerical_precision"
TINY_INPUT = 1e-6


def extreme_scale(dtype: torch.dtype) -> float:
    """Large-input scale: 1e4, or sqrt(max) of the dtype when that is smaller (float16: 256)."""
    return min(1e4, torch.finfo(dtype).max ** 0.5)


def parameter_check(ctx: ModuleContext) -> AnalysisResult:
    name = f"{ID}.parameters"
    large_limit = ctx.config.ranges.large_weight
    tiny = torch.finfo(ctx.dtype).tiny
    per: dict[str, dict[str, int]] = {}
    totals = {"nan": 0, "inf": 0, "large": 0, "subnormal": 0}
    for pname, p in ctx.named_parameters():
        d = p.detach()
        counts = nonfinite_counts([d])
        a = d.abs()
        counts["large"] = int((torch.isfinite(d) & (a > large_limit)).sum())
        counts["subnormal"] = int(((a > 0) & (a < tiny)).sum())
        for k in totals:
            totals[k] += counts[k]
        if any(counts.values()):
            per[pname] = counts
    value: dict[str, Any] = {**totals, "large_threshold": large_limit, "per_parameter": per}
    if totals["nan"] or totals["inf"]:
        where = ", ".join(per)
        return AnalysisResult(
            name, value, False, f"{totals['nan']} NaN, {totals['inf']} Inf in {where}", "error", ID
        )
    if totals["large"] or totals["subnormal"]:
        msg = f"{totals['large']} values above {large_limit:g}, {totals['subnormal']} subnormal values"
        return AnalysisResult(name, value, False, msg, "warning", ID)
    return AnalysisResult(name, value, True, "no NaN, Inf, extreme or subnormal values", "info", ID)


def _output_check(ctx: ModuleContext, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    with torch.no_grad(), eval_mode(ctx.module):
        outs = output_tensors(ctx.call(inputs))
    return {**nonfinite_counts(outs), "abs_max": abs_max(outs)}


def normal_inputs_check(ctx: ModuleContext) -> AnalysisResult:
    name = f"{ID}.normal_inputs"
    value = _output_check(ctx, ctx.inputs("normal", ctx.generator(700)))
    value["dtype_max"] = torch.finfo(ctx.dtype).max
    if value["nan"] or value["inf"]:
        msg = f"{value['nan']} NaN, {value['inf']} Inf in the output under standard-normal inputs"
        return AnalysisResult(name, value, False, msg, "error", ID)
    return AnalysisResult(name, value, True, f"finite outputs (|max| {value['abs_max']:.4g})", "info", ID)


def extreme_inputs_check(ctx: ModuleContext) -> AnalysisResult:
    name = f"{ID}.extreme_inputs"
    gen = ctx.generator(701)
    base = ctx.inputs("normal", gen)
    scale = extreme_scale(ctx.dtype)
    cases = {
        "large": {k: (v.float() * scale).to(ctx.dtype) for k, v in base.items()},
        "tiny": {k: (v.float() * TINY_INPUT).to(ctx.dtype) for k, v in base.items()},
        "zeros": {k: torch.zeros_like(v) for k, v in base.items()},
    }
    value: dict[str, Any] = {"large_scale": scale, "tiny_scale": TINY_INPUT}
    bad = []
    for case, inputs in cases.items():
        try:
            value[case] = _output_check(ctx, inputs)
        except Exception as exc:  # an extreme input may make the module raise; that is a finding too
            value[case] = {"error": f"{type(exc).__name__}: {exc}"}
            bad.append(f"{case} inputs raise {type(exc).__name__}")
            continue
        if value[case]["nan"] or value[case]["inf"]:
            bad.append(f"{case} inputs give {value[case]['nan']} NaN, {value[case]['inf']} Inf")
    if bad:
        return AnalysisResult(name, value, False, "; ".join(bad), "warning", ID)
    return AnalysisResult(
        name, value, True, f"finite outputs for x*{scale:g}, x*{TINY_INPUT:g} and 0", "info", ID
    )


def gradient_check(ctx: ModuleContext) -> AnalysisResult:
    name = f"{ID}.gradients"
    bw = backward_pass(ctx, ctx.config.loss_fns[0], seed_offset=702)
    if bw is None:
        return skipped(ID, "the output does not require grad (no gradient)", name)
    params = nonfinite_counts([g for g in bw.param_grads.values() if g is not None])
    inputs = nonfinite_counts([g for g in bw.input_grads.values() if g is not None])
    value = {"loss": ctx.config.loss_fns[0], "parameters": params, "inputs": inputs}
    if sum(params.values()) or sum(inputs.values()):
        msg = (
            f"parameter grads {params['nan']} NaN/{params['inf']} Inf, "
            f"input grads {inputs['nan']} NaN/{inputs['inf']} Inf"
        )
        return AnalysisResult(name, value, False, msg, "error", ID)
    return AnalysisResult(name, value, True, "finite parameter and input gradients", "info", ID)


def run(ctx: ModuleContext) -> list[AnalysisResult]:
    return [parameter_check(ctx), normal_inputs_check(ctx), extreme_inputs_check(ctx), gradient_check(ctx)]
