"""Offline diagnosis on top of the agent: analyzers, health scores, comparisons, gradient scaling.

Every analyzer attaches the agent (its hooks, device statistics and snapshots) for a few forward/backward
passes and adds what a live monitor cannot afford; docs/analyzers.md defines every metric.

    from gradflow_agent.analyze import GradientFlowAnalyzer
    report = GradientFlowAnalyzer().analyze(model, inputs, loss_fn=loss_fn, targets=targets, steps=20)

Every analyzer implements one contract (`base.Analyzer`: that `analyze` signature, a FlowReport back); the seed
classes also accept their seeds' documented call shapes (docs/analyzers.md).

Names are imported on first use (PEP 562), so that light modules (`analyze.health`, `analyze.base`) can be
imported from anywhere in the package without pulling in the agent.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "base": ("MODEL", "SEED003", "SEED004", "Analyzer", "FlowIssue", "FlowThresholds", "IssueSeverity",
             "IssueType", "filter_issues", "resolve_thresholds"),
    "core": ("FlowEngine",),
    "attention": ("AttentionAnalyzer",),
    "comparative": ("ComparativeAnalyzer", "Comparison", "LayerDelta", "compare_reports", "load_state_dict"),
    "flow": ("FlowAnalyzer", "GradientFlowAnalyzer"),
    "health": ("HealthPolicy", "HealthStatus", "LayerHealth", "layer_health", "snapshot_health_scores"),
    "history": ("History",),
    "jacobian": ("WeightSpectrum", "weight_spectrum"),
    "metrics": ("FlowMetrics",),
    "offline": ("report_from_records",),
    "recurrent": ("RecurrentAnalyzer", "RecurrentDynamics", "TemporalMetrics", "analyze_unrolled"),
    "rl": ("PolicyStats", "RLPolicyAnalyzer"),
    "scale": ("GradientScale", "ScaleGradient", "gradient_scale"),
    "standard": ("StandardAnalyzer",),
    "temporal": ("TemporalAnalyzer",),
    "transformer": ("AttentionLayerMetrics", "AttentionStats", "BlockMetrics", "TransformerAnalyzer"),
    "vector": ("VectorMetrics", "coherence", "planar_rotation"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_WHERE["FlowReport"] = "..report.flow_report"

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(module if module.startswith(".") else f".{module}", __name__)
    value = getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
