"""`AnalysisResult`, the one record every analysis returns, and its JSON-safe form."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


@dataclass
class AnalysisResult:
    """One judged check. `value` is plain Python data (numbers, lists, dicts) so it survives JSON.

    `severity` is "info" for a healthy or purely descriptive value, "warning" for a value outside its
    healthy range and "error" for a broken module (NaN/Inf, parameters cut off from the graph, dead
    layers). `skipped` marks a check that does not apply to the module; it counts as passed.
    """

    name: str
    value: Any
    passed: bool
    message: str
    severity: Severity = "info"
    analysis: str = ""
    skipped: bool = False

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        if not self.analysis:
            self.analysis = self.name.split(".", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": self.analysis,
            "name": self.name,
            "value": json_safe(self.value),
            "passed": bool(self.passed),
            "message": self.message,
            "severity": self.severity,
            "skipped": bool(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisResult:
        return cls(
            name=data["name"],
            value=data.get("value"),
            passed=bool(data["passed"]),
            message=data.get("message", ""),
            severity=data.get("severity", "info"),
            analysis=data.get("analysis", ""),
            skipped=bool(data.get("skipped", False)),
        )


def skipped(analysis: str, reason: str, name: str | None = None) -> AnalysisResult:
    """The result of an analysis that does not apply: it says why and does not fail the run."""
    return AnalysisResult(
        name=name or analysis,
        value=None,
        passed=True,
        message=f"skipped: {reason}",
        severity="info",
        analysis=analysis,
        skipped=True,
    )


def json_safe(value: Any) -> Any:
    """Convert tensors, numpy values and non-finite floats into JSON-representable data.

    NaN and infinities become the strings "nan", "inf" and "-inf" (JSON has no literal for them).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return json_safe(value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist())
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    return str(value)
