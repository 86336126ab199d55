"""Jacobian analysis of weight matrices (seed 003: spectral radius, eigenvalues, conditioning).

For each parametric layer's main weight W, reshaped to (out, in * kernel...) for convolutions, with
singular values s_1 >= ... >= s_r (r = min(out, in)):

- spectral_norm = s_1: the largest factor by which the linear part can stretch a signal (and a gradient);
- condition_number = s_1 / s_r (inf when s_r = 0);
- effective_rank = exp(H(p)), p_i = s_i / sum s, H the Shannon entropy in nats (Roy & Vetterli 2007): the
  number of directions the matrix really uses, between 1 and r;
- stable_rank = ||W||_F^2 / s_1^2;
- spectral_radius = max |eigenvalue| for a square W (the growth per step of a linear recurrence).

LOW_RANK when effective_rank / r < `low_rank_ratio` (default 0.1) for r >= 8. Matrices above
`max_elements` elements are skipped (NaN).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..hooks import Layer
from ..report.flow_report import section, table
from .base import FlowIssue, FlowThresholds, IssueSeverity, IssueType, jsonable, make_issue
from .engine import AnalysisRun, Extension, ExtensionResult
from .metrics import FlowMetrics


@dataclass(frozen=True)
class WeightSpectrum:
    layer: str
    shape: tuple[int, ...]
    spectral_norm: float
    condition_number: float
    effective_rank: float
    stable_rank: float
    spectral_radius: float
    top_singular_values: tuple[float, ...]

    @property
    def rank_ratio(self) -> float:
        r = min(self.shape[0], int(np.prod(self.shape[1:]))) if len(self.shape) >= 2 else 1
        return self.effective_rank / r if r else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = jsonable(self.__dict__)
        d["rank_ratio"] = jsonable(self.rank_ratio)
        return d


def entropy_effective_rank(s: np.ndarray) -> float:
    """exp of the entropy of the normalised singular values (1 for rank one, r for a flat spectrum)."""
    s = np.asarray(s, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return float("nan")
    p = s / s.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def weight_spectrum(name: str, w: torch.Tensor, max_elements: int = 1 << 22) -> WeightSpectrum | None:
    """Spectrum of one weight tensor (at least 2-D), or None when it is too large or not a matrix."""
    if w.ndim < 2 or w.numel() > max_elements:
        return None
    m = torch.nan_to_num(w.detach().reshape(w.shape[0], -1).double(), nan=0.0, posinf=0.0, neginf=0.0)
    s = torch.linalg.svdvals(m).cpu().numpy()
    s1 = float(s[0]) if s.size else float("nan")
    cond = s1 / float(s[-1]) if s.size and s[-1] > 0 else float("inf")
    fro2 = float((s ** 2).sum())
    radius = float("nan")
    if m.shape[0] == m.shape[1]:
        radius = float(torch.linalg.eigvals(m).abs().max())
    return WeightSpectrum(name, tuple(w.shape), s1, cond, entropy_effective_rank(s), fro2 / (s1 * s1) if s1 > 0 else
                          float("nan"), radius, tuple(float(x) for x in s[:8]))


def main_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's `weight` (or its first >= 2-D parameter)."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim >= 2:
        return w
    for p in module.parameters(recurse=False):
        if p.ndim >= 2:
            return p
    return None


def layer_spectra(layers: list[Layer]) -> list[WeightSpectrum]:
    out = []
    for layer in layers:
        w = main_weight(layer.module)
        if w is not None and not isinstance(layer.module, (nn.Embedding, nn.EmbeddingBag)):
            spec = weight_spectrum(layer.name, w)
            if spec is not None:
                out.append(spec)
    return out


def jacobian_issues(spectra: list[WeightSpectrum], th: FlowThresholds, step: int = 0) -> list[FlowIssue]:
    out = []
    for s in spectra:
        r = min(s.shape[0], int(np.prod(s.shape[1:])))
        if r >= 8 and math.isfinite(s.rank_ratio) and s.rank_ratio < th.low_rank_ratio:
            out.append(make_issue(IssueType.LOW_RANK, IssueSeverity.MEDIUM, s.layer, s.rank_ratio, th.low_rank_ratio,
                                  f"weight effective rank {s.effective_rank:.1f} of {r} possible "
                                  f"({s.rank_ratio:.0%} < {th.low_rank_ratio:.0%}); condition number "
                                  f"{s.condition_number:.3g}", step))
    return out


# -- recurrent weights (shared by JacobianExtension and the RecurrentAnalyzer) ------------------------------
def spectral_radius(m: torch.Tensor) -> float:
    m = m.detach().double()
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        return float("nan")
    return float(torch.linalg.eigvals(m).abs().max())


def candidate_block(module: nn.RNNBase, layer: int, suffix: str = "") -> torch.Tensor:
    """The recurrent matrix of the candidate state (RNN: W_hh, LSTM: its g block, GRU: its n block);
    suffix "_reverse" for the backward direction of a bidirectional module."""
    w_hh = getattr(module, f"weight_hh_l{layer}{suffix}").detach()
    H = module.hidden_size
    if isinstance(module, nn.LSTM):
        return w_hh[2 * H:3 * H]
    if isinstance(module, nn.GRU):
        return w_hh[2 * H:3 * H]
    return w_hh


def recurrent_weight_spectra(name: str, module: nn.RNNBase) -> list[WeightSpectrum]:
    """The Jacobian view of a recurrent module: one spectrum per layer (and direction) of its recurrent
    weight weight_hh_l{k}, the matrix the state goes through at every timestep (weight_ih acts on the input).

    Singular values, condition number and ranks are those of the whole weight_hh (the gates stacked: (G*H, H)
    for LSTM G=4, GRU G=3); the spectral radius is max |eig| of its candidate block (RNN: W_hh itself, LSTM:
    the g block, GRU: the n block), the same weight radius the RecurrentAnalyzer reports. Labels: the module's
    name for one unidirectional layer, else `name[layer k]` / `name[layer k reverse]`."""
    out = []
    directions = ("", "_reverse") if module.bidirectional else ("",)
    for layer in range(module.num_layers):
        for suffix in directions:
            single = module.num_layers == 1 and not module.bidirectional
            label = name if single else f"{name}[layer {layer}{' reverse' if suffix else ''}]"
            spec = weight_spectrum(label, getattr(module, f"weight_hh_l{layer}{suffix}"))
            if spec is not None:
                radius = spectral_radius(candidate_block(module, layer, suffix))
                out.append(dataclasses.replace(spec, spectral_radius=radius))
    return out


class JacobianExtension(Extension):
    name = "jacobian"

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        spectra = []
        for layer in run.layers:
            if isinstance(layer.module, nn.RNNBase):  # the recurrent weights, not weight_ih_l0
                spectra.extend(recurrent_weight_spectra(layer.name, layer.module))
            else:
                spectra.extend(layer_spectra([layer]))
        rows = [[s.layer, "x".join(map(str, s.shape)), s.spectral_norm, s.condition_number, s.effective_rank,
                 s.stable_rank, s.spectral_radius] for s in spectra]
        sec = section("Jacobian (weight spectra)", summary={"matrices": len(spectra)},
                      tables=[table("Weight spectra", ["layer", "shape", "spectral norm", "condition number",
                                                       "effective rank", "stable rank", "spectral radius"], rows)])
        return ExtensionResult(jacobian_issues(spectra, th, run.history.steps[-1]), sec,
                               {s.layer: s for s in spectra})
