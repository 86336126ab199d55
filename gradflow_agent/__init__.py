"""gradflow_agent: gradient-health observability for PyTorch training.

    agent = gradflow_agent.attach(model)   # hooks, on-device statistics, Prometheus /metrics

Every public name is imported on first use (PEP 562): `import gradflow_agent` costs nothing, so that
`gradflow-agent --version` and `--help` never load torch, and `attach` loads only the live agent's core
(agent, config, detect, export, hooks, snapshot, stats), never the analyzers, reports or dynamics.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_EXPORTS: dict[str, tuple[str, ...]] = {
    "agent": ("Agent", "attach"),
    "analyze": ("AttentionAnalyzer", "ComparativeAnalyzer", "FlowAnalyzer", "FlowReport", "GradientFlowAnalyzer",
                "GradientScale", "IssueSeverity", "IssueType", "LayerHealth", "RecurrentAnalyzer",
                "RLPolicyAnalyzer", "StandardAnalyzer", "TemporalAnalyzer", "TransformerAnalyzer",
                "gradient_scale"),
    "config": ("ConfigError", "load_config"),
    "detect": ("Issue",),
    "dynamics": ("AnalysisConfig", "ModelAnalysisManager", "attach_dynamics"),
    "snapshot": ("Snapshot",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [  # literal, for linters and IDEs; tests/test_packaging.py checks it against _EXPORTS
    "Agent", "AnalysisConfig", "AttentionAnalyzer", "ComparativeAnalyzer", "ConfigError", "FlowAnalyzer", "FlowReport",
    "GradientFlowAnalyzer", "GradientScale", "Issue", "IssueSeverity", "IssueType", "LayerHealth",
    "ModelAnalysisManager", "RLPolicyAnalyzer", "RecurrentAnalyzer", "Snapshot", "StandardAnalyzer",
    "TemporalAnalyzer", "TransformerAnalyzer", "attach", "attach_dynamics", "gradient_scale", "load_config",
    "__version__",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below imports on first use
    from .agent import Agent, attach
    from .analyze import (
        AttentionAnalyzer,
        ComparativeAnalyzer,
        FlowAnalyzer,
        FlowReport,
        GradientFlowAnalyzer,
        GradientScale,
        IssueSeverity,
        IssueType,
        LayerHealth,
        RecurrentAnalyzer,
        RLPolicyAnalyzer,
        StandardAnalyzer,
        TemporalAnalyzer,
        TransformerAnalyzer,
        gradient_scale,
    )
    from .config import ConfigError, load_config
    from .detect import Issue
    from .dynamics import AnalysisConfig, ModelAnalysisManager, attach_dynamics
    from .snapshot import Snapshot


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule: `gradflow_agent.hooks`) the first time it is asked for."""
    module = _WHERE.get(name)
    if module is None:
        if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)  # sets the package attribute itself
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
