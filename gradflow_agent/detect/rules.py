"""In-process detectors: the rule table (detect/spec.py) evaluated on one snapshot.

Each rule reads one snapshot and the `thresholds:` config section. NaN (no data) never triggers.
Every threshold rule is silent until `warmup_steps` optimizer steps have passed. Non-finite values are
attributed to where and when they started: the first step with a non-finite value, and the layer where
it appeared first in that step (forward outputs in call order, then gradients from the deepest layer,
then the weights after the update; stats/nonfinite.py), not to every layer it spread to.
"""

from __future__ import annotations

import numpy as np

from ..snapshot import Snapshot
from .issues import RECOMMENDATIONS, Issue
from .spec import RULES, Rule, severity_rank

# How a statistic reads in an issue message.
LABELS = {
    "grad_pressure": "gradient pressure", "grad_turbulence": "gradient turbulence (coefficient of variation)",
    "activation_dead_unit_ratio": "units that never fired over the window",
    "activation_zero_ratio": "outputs exactly zero", "activation_saturation_ratio": "outputs saturated",
    "update_ratio_last": "update-to-weight ratio",
    "attention_entropy": "normalised attention entropy", "attention_max_prob": "max attention probability",
    "moe_load_imbalance_ratio": "expert load imbalance (max/mean excess over the largest possible)",
    "moe_dead_expert_ratio": "experts that received no token",
}
_RATIOS = {"activation_dead_unit_ratio", "activation_zero_ratio", "activation_saturation_ratio",
           "moe_dead_expert_ratio"}
# Advice for the plug-in rules (attention, MoE); the built-in kinds' advice is in issues.py.
PLUGIN_RECOMMENDATIONS = {
    "attention_collapse": "Attention puts (almost) all its weight on one key: the query/key logits grew too "
                          "large. Lower the learning rate or add warmup, normalise queries and keys (QK-norm) "
                          "or cap the logits (softcapping), check the attention scale (1/sqrt(head_dim)) and "
                          "weight decay on the q/k projections.",
    "expert_imbalance": "A few experts take most of the tokens: raise the router's load-balancing loss "
                        "(router_aux_loss_coef, output_router_logits=True in transformers), use a bias-based "
                        "balancer, add router jitter, or lower the router's learning rate.",
    "dead_experts": "Some experts receive no token, so they never train: add or raise the load-balancing "
                    "loss, re-initialise the router (small weights), check router_z_loss and top_k, and "
                    "look for a collapsed router (low gradflow_moe_router_entropy_ratio).",
}


def _fmt(statistic: str, value: float) -> str:
    return f"{value:.0%}" if statistic in _RATIOS else f"{value:.3g}"


def evaluate(rule: Rule, snap: Snapshot, th) -> list[Issue]:
    """The issues of one threshold rule in a snapshot: one per layer where a condition holds."""
    out = []
    required = snap.stats[rule.requires] if rule.requires else None
    # A snapshot or threshold set made without a statistic (one built before the plug-in statistics, the
    # offline analyzers' thresholds) has no data for it: such a condition is never judged.
    judged = [(c, snap.stats[c.statistic], float(getattr(th, c.threshold))) for c in rule.conditions
              if c.statistic in snap.stats and getattr(th, c.threshold, None) is not None]
    for i in range(len(snap.layers)):
        if required is not None and np.isnan(required[i]):
            continue
        for cond, column, threshold in judged:
            value = float(column[i])
            if not cond.holds(value, threshold):
                continue
            severity = "critical" if cond.critical(value, threshold) else rule.severity
            sign = ">" if cond.op == "above" else "<"
            message = (f"{LABELS.get(cond.statistic, cond.statistic)} {_fmt(cond.statistic, value)} {sign} "
                       f"{_fmt(cond.statistic, threshold)}")
            advice = RECOMMENDATIONS.get(rule.kind) or PLUGIN_RECOMMENDATIONS.get(rule.kind, "")
            out.append(Issue(rule.kind, snap.layers[i], severity, value, threshold, snap.step, message, advice))
            break
    return out


def nonfinite(snap: Snapshot, th) -> list[Issue]:
    """Non-finite values seen so far (they ruin a run, so the issue stays), where and when they started."""
    affected = np.flatnonzero(sum(np.asarray(c) for c in snap.nonfinite.values()) > 0)
    origin = snap.nonfinite_origin
    if origin is not None and 0 <= origin[1] < len(snap.layers):
        step, i, tensor = origin
        count = snap.nonfinite[tensor][i]
        return [Issue("nonfinite", snap.layers[i], "critical", float(count), 0.0, snap.step,
                      f"non-finite {tensor} values first at step {step} in this layer "
                      f"({len(affected)} layers affected so far)", RECOMMENDATIONS["nonfinite"], int(step))]
    for tensor, pick in (("activation", 0), ("grad", -1), ("param", 0)):
        counts = snap.nonfinite[tensor]
        fresh = np.flatnonzero(counts > 0)
        if len(fresh):
            i = fresh[pick]
            count = counts[i]
            return [Issue("nonfinite", snap.layers[i], "critical", float(count), 0.0, snap.step,
                          f"{count:.0f} non-finite {tensor} values (first of {len(fresh)} affected layers)",
                          RECOMMENDATIONS["nonfinite"])]
    return []


def detect(snap: Snapshot, th) -> list[Issue]:
    """Every issue in this snapshot (the rule table of detect/spec.py), most severe first."""
    issues = nonfinite(snap, th)
    past_warmup = snap.step > th.warmup_steps
    for rule in RULES:
        if rule.conditions and (past_warmup or not rule.warmup):
            issues.extend(evaluate(rule, snap, th))
    return sorted(issues, key=lambda x: (-severity_rank(x.severity), snap.layers.index(x.layer)))
