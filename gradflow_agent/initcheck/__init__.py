"""Module-initialization check: is a freshly constructed PyTorch module well-behaved before training?

Ten analyses (norms, operator norm, gradients, spectrum, rank, Lipschitz, activations, gradient
ratios, numerical precision, weight distribution) judged against documented healthy ranges; a CLI
(`gradflow-agent init-check`), JSON/Markdown reports and Jupyter notebook generation.
"""

from __future__ import annotations

from .analyses import ANALYSES, AnalysisInfo
from .config import AnalysisConfig, HealthyRanges
from .errors import DeviceError, DtypeError, InitCheckError, KwargsError, OutputError, ShapeError, SpecError
from .result import AnalysisResult
from .runner import AnalysisRunner, run_analysis

__all__ = [
    "ANALYSES",
    "AnalysisConfig",
    "AnalysisInfo",
    "AnalysisResult",
    "AnalysisRunner",
    "DeviceError",
    "DtypeError",
    "HealthyRanges",
    "InitCheckError",
    "KwargsError",
    "OutputError",
    "ShapeError",
    "SpecError",
    "run_analysis",
]
