"""Detectors: snapshot -> issues and health scores."""

from __future__ import annotations

import numpy as np

from ..snapshot import Snapshot
from .health import health_scores
from .issues import KINDS, Issue
from .rules import detect


def diagnose(snap: Snapshot, thresholds) -> Snapshot:
    """The snapshot with its issues and per-layer health scores filled in."""
    issues = detect(snap, thresholds)
    return snap.with_diagnosis(tuple(issues), health_scores(snap.layers, issues, known_layers(snap)))


def known_layers(snap: Snapshot) -> np.ndarray:
    """Layers the snapshot knows something about: at least one statistic, no failed component, and a
    hook still running."""
    L = len(snap.layers)
    if snap.degraded:
        return np.zeros(L, dtype=bool)
    known = np.zeros(L, dtype=bool)
    for values in snap.stats.values():
        known |= ~np.isnan(np.asarray(values, dtype=np.float64))
    off = {name.removeprefix("hook:") for name in snap.disabled if name.startswith("hook:")}
    if off:
        known &= np.array([name not in off for name in snap.layers], dtype=bool)
    return known


__all__ = ["KINDS", "Issue", "diagnose", "detect", "health_scores", "known_layers"]
