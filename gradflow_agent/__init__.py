"""gradflow_agent: gradient-health observability for PyTorch training.

    agent = gradflow_agent.attach(model)   # hooks, on-device statistics, Prometheus /metrics
"""

__version__ = "0.1.0"

from .agent import Agent, attach  # noqa: E402
from .analyze import (  # noqa: E402
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
from .config import ConfigError, load_config  # noqa: E402
from .detect import Issue  # noqa: E402
from .dynamics import AnalysisConfig, ModelAnalysisManager, attach_dynamics  # noqa: E402
from .snapshot import Snapshot  # noqa: E402

__all__ = [
    "Agent", "AnalysisConfig", "AttentionAnalyzer", "ComparativeAnalyzer", "ConfigError", "FlowAnalyzer", "FlowReport",
    "GradientFlowAnalyzer", "GradientScale", "Issue", "IssueSeverity", "IssueType", "LayerHealth",
    "ModelAnalysisManager", "RLPolicyAnalyzer", "RecurrentAnalyzer", "Snapshot", "StandardAnalyzer",
    "TemporalAnalyzer", "TransformerAnalyzer", "attach", "attach_dynamics", "gradient_scale", "load_config",
    "__version__",
]
