"""Detectors: snapshot -> issues and health scores."""

from __future__ import annotations

from ..snapshot import Snapshot
from .health import health_scores
from .issues import KINDS, Issue
from .rules import detect


def diagnose(snap: Snapshot, thresholds) -> Snapshot:
    """The snapshot with its issues and per-layer health scores filled in."""
    issues = detect(snap, thresholds)
    return snap.with_diagnosis(tuple(issues), health_scores(snap.layers, issues))


__all__ = ["KINDS", "Issue", "diagnose", "detect", "health_scores"]
