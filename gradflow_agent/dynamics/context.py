"""`AnalysisContext`: everything a metric computer may read besides the delta and the snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import AnalysisConfig


@dataclass(frozen=True)
class AnalysisContext:
    """Read-only inputs of one measurement. Computers must leave `model` as they found it."""

    model: nn.Module | None = None
    inputs: Any = None  # a batch the model can be called on (dict -> model(**d), tuple -> model(*t), tensor)
    step: int = 0  # optimizer step of this measurement
    snapshot_step: int | None = None  # optimizer step of the snapshot W_old
    optimizer: torch.optim.Optimizer | None = None
    config: AnalysisConfig = field(default_factory=AnalysisConfig)
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def window_steps(self) -> int | None:
        """Optimizer steps between the snapshot and this measurement (what Δ spans)."""
        return None if self.snapshot_step is None else self.step - self.snapshot_step
