"""`MetricComputer`: the plug-in interface of the training-dynamics analysis.

A computer is stateless: `compute(delta, snapshot, context)` returns flat `{"family/key": value}` floats
(seed 002's wandb-style keys). The manager owns schedules and snapshots, catches a computer's errors and
times it. To be exported by the agent (Prometheus, OTel, JSONL), a computer lists its catalogue entries in
`catalogue` and maps each key to one of them with `describe(key)`; keys it does not describe are exported
as `gradflow_dynamics_value{key=...}` (a capped number of distinct keys).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..export.metrics import Metric


def format_threshold(t: float) -> str:
    """The threshold as it appears in keys and in the `threshold` label: 1e-06, 0.0001."""
    return f"{t:g}"


class MetricComputer(ABC):
    """Base class of metric plug-ins. Subclasses set `name` and implement `compute`."""

    name: str = ""
    requires_inputs: bool = False  # skipped (and reported once) when the step gives no inputs
    catalogue: tuple[Metric, ...] = ()

    @abstractmethod
    def compute(self, delta: Any = None, snapshot: Any = None, context: Any = None, **kwargs: Any) -> dict[str, float]:
        """Metrics of one measurement. Called with keywords: delta (ParameterDelta), snapshot (the
        ParameterSnapshot W_old) and context (AnalysisContext)."""

    def describe(self, key: str) -> tuple[Metric, dict[str, str]] | None:
        """The catalogue entry and labels a result key is exported as; None = not described."""
        return None

    @property
    def label(self) -> str:
        """The computer's name for errors and timings."""
        return self.name or type(self).__name__
