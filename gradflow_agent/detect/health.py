"""Per-layer health score, 0-100 (exported as gradflow_layer_health_score).

score = 100 - sum of penalties of the layer's open issues, floored at 0, where a critical issue costs
50, a warning 25 and an info 10. A layer with no issue scores 100; one with a critical and a warning
issue scores 25. Unknown is never healthy: a layer without any statistic yet, or whose statistics
could not be computed in this snapshot (a failing component), has no score (NaN, not exported).
"""

from __future__ import annotations

import numpy as np

from .spec import SEVERITIES, severity_rank

PENALTY = {"critical": 50.0, "warning": 25.0, "info": 10.0}
# Bands of the score, for dashboards and reports: a layer at or below CRITICAL_MAX is as bad as one
# critical issue; HEALTHY_MIN (no issue at all) is healthy; anything between is a warning.
CRITICAL_MAX = 100.0 - PENALTY["critical"]
HEALTHY_MIN = 100.0
STATUSES = ("healthy", "warning", "critical", "unknown")


def band(score: float) -> str:
    """The band of a layer's score: healthy, warning, critical, or unknown (NaN)."""
    if score != score:
        return "unknown"
    return "healthy" if score >= HEALTHY_MIN else ("critical" if score <= CRITICAL_MAX else "warning")


def overall_status(issues) -> str:
    """A run's status follows its worst issue (never an average of scores): critical, warning, healthy."""
    worst = max((severity_rank(i.severity) for i in issues), default=-1)
    return "healthy" if worst < 1 else SEVERITIES[worst]


def health_scores(layers: tuple[str, ...], issues, known: np.ndarray | None = None) -> np.ndarray:
    score = np.full(len(layers), 100.0)
    if known is not None:
        score[~known] = np.nan
    index = {name: i for i, name in enumerate(layers)}
    for issue in issues:
        i = index[issue.layer]
        score[i] = max(0.0, (100.0 if np.isnan(score[i]) else score[i]) - PENALTY[issue.severity])
    return score
