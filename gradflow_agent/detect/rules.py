"""In-process detectors: the same conditions, on the same statistics, as the shipped alert rules.

Each detector reads one snapshot and the `thresholds:` config section. NaN (no data) never triggers.
Every detector is silent until `warmup_steps` optimizer steps have passed. Non-finite values are
attributed to where and when they started: the first step with a non-finite value, and the layer where
it appeared first in that step (forward outputs in call order, then gradients from the deepest layer,
then the weights after the update; stats/nonfinite.py), not to every layer it spread to.
"""

from __future__ import annotations

import numpy as np

from ..snapshot import Snapshot
from .issues import RECOMMENDATIONS, Issue


def _above(values: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(values, nan=-np.inf) > threshold


def _below(values: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(values, nan=np.inf) < threshold


def _issue(snap: Snapshot, kind: str, i: int, severity: str, value: float, threshold: float,
           message: str) -> Issue:
    return Issue(kind, snap.layers[i], severity, float(value), float(threshold), snap.step, message,
                 RECOMMENDATIONS[kind])


def vanishing(snap: Snapshot, th) -> list[Issue]:
    p = snap.stats["grad_pressure"]
    return [_issue(snap, "vanishing", i, "critical" if p[i] < th.vanishing / 100 else "warning", p[i],
                   th.vanishing, f"gradient pressure {p[i]:.3g} < {th.vanishing:g}")
            for i in np.flatnonzero(_below(p, th.vanishing))]


def exploding(snap: Snapshot, th) -> list[Issue]:
    p = snap.stats["grad_pressure"]
    return [_issue(snap, "exploding", i, "critical", p[i], th.exploding,
                   f"gradient pressure {p[i]:.3g} > {th.exploding:g}")
            for i in np.flatnonzero(_above(p, th.exploding))]


def dead(snap: Snapshot, th) -> list[Issue]:
    units = snap.stats["activation_dead_unit_ratio"]
    zeros = snap.stats["activation_zero_ratio"]
    relu = ~np.isnan(units)
    out = []
    for i in np.flatnonzero(relu & (_above(units, th.dead_unit_ratio) | _above(zeros, th.dead_ratio))):
        severity = "critical" if units[i] >= 0.99 or zeros[i] >= 0.999 else "warning"
        out.append(_issue(snap, "dead", i, severity, units[i], th.dead_unit_ratio,
                          f"{units[i]:.0%} of units never fired over the window; "
                          f"{zeros[i]:.0%} of outputs are exactly zero"))
    return out


def unstable(snap: Snapshot, th) -> list[Issue]:
    t = snap.stats["grad_turbulence"]
    return [_issue(snap, "unstable", i, "warning", t[i], th.unstable_cv,
                   f"gradient turbulence (coefficient of variation) {t[i]:.2f} > {th.unstable_cv:g}")
            for i in np.flatnonzero(_above(t, th.unstable_cv))]


def saturated(snap: Snapshot, th) -> list[Issue]:
    s = snap.stats["activation_saturation_ratio"]
    return [_issue(snap, "saturated", i, "warning", s[i], th.saturation_ratio,
                   f"{s[i]:.0%} of outputs saturated (> {th.saturation_ratio:.0%})")
            for i in np.flatnonzero(_above(s, th.saturation_ratio))]


def stalled(snap: Snapshot, th) -> list[Issue]:
    r = snap.stats["update_ratio"]
    return [_issue(snap, "stalled", i, "warning", r[i], th.stalled_update_ratio,
                   f"update-to-weight ratio {r[i]:.2g} < {th.stalled_update_ratio:g}")
            for i in np.flatnonzero(_below(r, th.stalled_update_ratio))]


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
            return [_issue(snap, "nonfinite", i, "critical", count, 0.0,
                           f"{count:.0f} non-finite {tensor} values (first of {len(fresh)} affected layers)")]
    return []


DETECTORS = (vanishing, exploding, dead, unstable, saturated, stalled)


def detect(snap: Snapshot, th) -> list[Issue]:
    """Every issue in this snapshot, most severe first."""
    issues = nonfinite(snap, th)
    if snap.step > th.warmup_steps:
        for detector in DETECTORS:
            issues.extend(detector(snap, th))
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(issues, key=lambda x: (order[x.severity], snap.layers.index(x.layer)))
