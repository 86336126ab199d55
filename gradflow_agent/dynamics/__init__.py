"""Training dynamics: parameter snapshots and deltas, sparse-update quality, metric plug-ins.

Layers (seed 002's design): immutable primitives (`ParameterSnapshot`, `ParameterDelta`), stateless
metric computers (`MetricComputer.compute(delta, snapshot, context)`), the `ModelAnalysisManager` that
owns schedules and snapshots, and `DynamicsPlugin` / `attach_dynamics` that run it inside the agent.
See docs/dynamics.md.
"""

from .components import COMPONENTS, component_of, family_of, layer_of
from .computer import MetricComputer, format_threshold
from .config import AnalysisConfig
from .context import AnalysisContext
from .manager import ModelAnalysisManager
from .param_change import ParameterChangeMetrics
from .plugin import DynamicsPlugin, attach_dynamics, dynamics_from_config, running_dynamics
from .snapshot import (
    DeltaStatistics,
    ParameterDelta,
    ParameterMismatchError,
    ParameterSnapshot,
    TensorStats,
)
from .sparse_quality import ModelCall, SparseQualityMetrics, WeightsNotRestoredError, compare_outputs
from .training_state import GradientMetrics, MomentumMetrics

__all__ = [
    "COMPONENTS", "AnalysisConfig", "AnalysisContext", "DeltaStatistics", "DynamicsPlugin", "GradientMetrics",
    "MetricComputer", "ModelAnalysisManager", "ModelCall", "MomentumMetrics", "ParameterChangeMetrics",
    "ParameterDelta", "ParameterMismatchError", "ParameterSnapshot", "SparseQualityMetrics", "TensorStats",
    "WeightsNotRestoredError", "attach_dynamics", "compare_outputs", "component_of", "dynamics_from_config",
    "family_of", "format_threshold", "layer_of", "running_dynamics",
]
