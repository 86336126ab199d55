"""Vector analysis (seed 003's "divergence, curl, coherence"), with definitions a user can check.

For one layer, let g_1..g_T be its gradient vectors at successive steps (all of its parameters
concatenated; above `max_elements` elements, a fixed seeded sample of coordinates).

- coherence = mean_t cos(g_t, g_{t-1}) in [-1, 1]: 1 = the same direction every step, ~0 = noise,
  < 0 = the gradient flips back and forth (overshooting).
- turning angle = mean_t arccos(cos(g_t, g_{t-1})) in degrees.
- rotation (the seed's "curl"): project the unit gradients onto the plane of their two leading principal
  directions (top-2 right singular vectors of the stacked unit gradients); phi_t = the signed angle from
  the projection of g_{t-1} to that of g_t, wrapped to (-pi, pi]; a near-reversal (|phi_t| > 0.9 pi) is a
  flip, not a rotation, and counts as phi_t = 0 (flips are what coherence measures).
  curl = |sum sin phi_t| / sum |sin phi_t| in [0, 1] (1 = always turning the same way, 0 = no consistent
  turning; plain gradient descent also turns one way, slowly), rotation_rate = mean phi_t
  (radians per step), total_rotation = sum phi_t, plane_energy = share of the gradients' squared length
  in that plane (the rotation is meaningful only when it is large).
- divergence = mean over backward passes of ln(||dL/d input|| / ||dL/d output||) of the layer (nats):
  > 0 the layer expands the backward flow (a source), < 0 it contracts it (a sink).

Issues: OSCILLATION when coherence <= -0.5; CIRCULATION when curl >= 0.8, |total_rotation| >= pi (at
least half a turn) and plane_energy >= 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..report.flow_report import section, table
from .base import FlowIssue, FlowThresholds, IssueSeverity, IssueType, jsonable, make_issue
from .engine import AnalysisRun, Collector, Extension, ExtensionResult, layer_parameters
from .metrics import FlowMetrics


def _unit_rows(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    G = np.asarray(G, dtype=np.float64)
    n = np.linalg.norm(G, axis=1)
    ok = np.isfinite(n) & (n > 0)
    U = np.zeros_like(G)
    U[ok] = G[ok] / n[ok, None]
    return U, ok


def successive_cosines(G: np.ndarray) -> np.ndarray:
    """cos(g_t, g_{t-1}) for t = 1..T-1 (NaN where either gradient is zero)."""
    U, ok = _unit_rows(G)
    cos = np.einsum("ij,ij->i", U[1:], U[:-1])
    return np.where(ok[1:] & ok[:-1], np.clip(cos, -1.0, 1.0), np.nan)


def coherence(G: np.ndarray) -> float:
    """Mean cosine similarity of successive gradient directions."""
    c = successive_cosines(G)
    c = c[np.isfinite(c)]
    return float(c.mean()) if c.size else float("nan")


def mean_turning_angle(G: np.ndarray) -> float:
    """Mean angle between successive gradients, in degrees."""
    c = successive_cosines(G)
    c = c[np.isfinite(c)]
    return float(np.degrees(np.arccos(c)).mean()) if c.size else float("nan")


@dataclass(frozen=True)
class PlanarRotation:
    angles: tuple[float, ...]  # phi_t, radians
    curl: float
    rotation_rate: float
    total_rotation: float
    plane_energy: float


def planar_rotation(G: np.ndarray) -> PlanarRotation:
    """Rotation of the gradient in the plane of its two leading principal directions (module docstring)."""
    U, ok = _unit_rows(G)
    U = U[ok]
    if len(U) < 3:
        return PlanarRotation((), float("nan"), float("nan"), float("nan"), float("nan"))
    _, s, vt = np.linalg.svd(U, full_matrices=False)
    if len(s) < 2:
        return PlanarRotation((), float("nan"), float("nan"), float("nan"), float("nan"))
    z = U @ vt[:2].T
    energy = float((z ** 2).sum() / (U ** 2).sum())
    theta = np.arctan2(z[:, 1], z[:, 0])
    phi = np.angle(np.exp(1j * np.diff(theta)))  # wrapped to (-pi, pi]
    phi = np.where(np.abs(phi) > 0.9 * np.pi, 0.0, phi)  # reversals are flips, not rotation
    den = float(np.abs(np.sin(phi)).sum())
    curl = float(abs(np.sin(phi).sum()) / den) if den > 1e-12 else 0.0
    return PlanarRotation(tuple(float(p) for p in phi), curl, float(phi.mean()), float(phi.sum()), energy)


@dataclass(frozen=True)
class VectorMetrics:
    layer: str
    coherence: float
    turning_angle_deg: float
    curl: float
    rotation_rate: float
    total_rotation: float
    plane_energy: float
    divergence: float
    elements: int  # gradient coordinates tracked

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


def vector_metrics(layer: str, G: np.ndarray, divergence: float = float("nan")) -> VectorMetrics:
    rot = planar_rotation(G)
    return VectorMetrics(layer, coherence(G), mean_turning_angle(G), rot.curl, rot.rotation_rate, rot.total_rotation,
                         rot.plane_energy, float(divergence), int(np.asarray(G).shape[1]) if np.ndim(G) == 2 else 0)


def vector_issues(metrics: list[VectorMetrics], th: FlowThresholds, step: int = 0) -> list[FlowIssue]:
    out = []
    for m in metrics:
        if math.isfinite(m.coherence) and m.coherence <= th.oscillation_coherence:
            out.append(make_issue(IssueType.OSCILLATION, IssueSeverity.HIGH if m.coherence <= -0.9 else
                                  IssueSeverity.MEDIUM, m.layer, m.coherence, th.oscillation_coherence,
                                  f"successive gradients point against each other (mean cosine "
                                  f"{m.coherence:.2f} <= {th.oscillation_coherence:g})", step))
        if (math.isfinite(m.curl) and m.curl >= th.circulation_curl and abs(m.total_rotation) >= math.pi
                and m.plane_energy >= 0.5):
            out.append(make_issue(IssueType.CIRCULATION, IssueSeverity.MEDIUM, m.layer, m.curl, th.circulation_curl,
                                  f"the gradient turns steadily one way: {math.degrees(m.total_rotation):.0f} deg "
                                  f"over the analysis ({math.degrees(m.rotation_rate):.1f} deg/step, curl "
                                  f"{m.curl:.2f})", step, total_rotation=m.total_rotation))
    return out


class GradientDirections(Collector):
    """Collects each parametric layer's gradient vector (sampled above `max_elements`) at every step."""

    def __init__(self, max_elements: int = 1 << 15, seed: int = 0) -> None:
        self.max_elements = max_elements
        self.seed = seed
        self.rows: dict[int, list[np.ndarray]] = {}
        self._params: dict[int, list[torch.nn.Parameter]] = {}
        self._index: dict[int, torch.Tensor | None] = {}

    def attach(self, run: AnalysisRun) -> None:
        g = torch.Generator().manual_seed(self.seed)
        for i, params in layer_parameters(run.layers).items():
            if not params:
                continue
            n = sum(p.numel() for p in params)
            self._params[i] = params
            self._index[i] = (torch.randperm(n, generator=g)[:self.max_elements].to(run.device)
                              if n > self.max_elements else None)
            self.rows[i] = []

    def after_backward(self, run: AnalysisRun, output: Any, loss: torch.Tensor) -> None:
        for i, params in self._params.items():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                              for p in params])
            idx = self._index[i]
            if idx is not None:
                flat = flat[idx]
            self.rows[i].append(torch.nan_to_num(flat.double(), nan=0.0, posinf=0.0, neginf=0.0).cpu().numpy())

    def metrics(self, run: AnalysisRun) -> list[VectorMetrics]:
        div = run.flow.log_gain()
        out = []
        for layer in run.layers:
            rows = self.rows.get(layer.index)
            if rows:
                out.append(vector_metrics(layer.name, np.stack(rows), float(div[layer.index])))
        return out


class VectorExtension(Extension):
    name = "vector"

    def __init__(self, max_elements: int = 1 << 15) -> None:
        self.directions = GradientDirections(max_elements)

    def collectors(self) -> list[Collector]:
        return [self.directions]

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        vm = self.directions.metrics(run)
        rows = [[m.layer, m.coherence, m.turning_angle_deg, m.curl, np.degrees(m.rotation_rate),
                 np.degrees(m.total_rotation), m.plane_energy, m.divergence] for m in vm]
        sec = section("Vector analysis", summary={"layers": len(vm)},
                      tables=[table("Gradient directions per layer",
                                    ["layer", "coherence", "turning deg", "curl", "rotation deg/step",
                                     "total rotation deg", "plane energy", "divergence (nats)"], rows)],
                      notes="coherence = mean cos of successive gradients; curl = turning consistency in the "
                            "top-2 principal plane; divergence = ln backward gain of the layer.")
        return ExtensionResult(vector_issues(vm, th, run.history.steps[-1]), sec, {m.layer: m for m in vm})
