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
}
_RATIOS = {"activation_dead_unit_ratio", "activation_zero_ratio", "activation_saturation_ratio"}


def _fmt(statistic: str, value: float) -> str:
    return f"{value:.0%}" if statistic in _RATIOS else f"{value:.3g}"


def evaluate(rule: Rule, snap: Snapshot, th) -> list[Issue]:
    """The issues of one threshold rule in a snapshot: one per layer where a condition holds."""
    out = []
    required = snap.stats[rule.requires] if rule.requires else None
    for i in range(len(snap.layers)):
        if required is not None and np.isnan(required[i]):
            continue
        for cond in rule.conditions:
            value, threshold = float(snap.stats[cond.statistic][i]), float(getattr(th, cond.threshold))
            if not cond.holds(value, threshold):
                continue
            severity = "critical" if cond.critical(value, threshold) else rule.severity
            sign = ">" if cond.op == "above" else "<"
            message = (f"{LABELS.get(cond.statistic, cond.statistic)} {_fmt(cond.statistic, value)} {sign} "
                       f"{_fmt(cond.statistic, threshold)}")
            out.append(Issue(rule.kind, snap.layers[i], severity, value, threshold, snap.step, message,
                             RECOMMENDATIONS[rule.kind]))
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
