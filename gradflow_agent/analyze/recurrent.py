"""RecurrentAnalyzer: gradient flow through time, spectral radius and criticality, gate statistics.

A fused nn.RNN / nn.LSTM / nn.GRU hides its timesteps, so the analyzer captures each recurrent module's
input and initial state with a forward hook, then re-unrolls the same cell step by step from the
module's own weights (checked against the module's output: `unroll_error`). On that unroll, with a fixed
random unit vector u and P = sum over the batch of u . h_T (the layer's last hidden state):

- gradient profile g_k = mean over the batch of ||dP/dx_{T-1-k}||, k = 0..T-1 timesteps back: how much an
  input k steps in the past still moves the final state (all paths, the LSTM cell state included);
- temporal_decay_rate r = least-squares slope of ln g_k over k (nats per timestep; < 0 vanishing through
  time, > 0 exploding), fitted where g_k > 1e-8 max g. Seed 004: |r| <= 0.1 good, 0.1-0.3 warning, > 0.3
  critical;
- effective_memory_length = 1 + the largest k with g_k >= 0.01 max g (memory_censored when that is the
  whole sequence: the memory is at least T);
- spectral radius: with `enable_jacobian`, the median over sampled timesteps and samples of
  max |eig(d s_{t+1} / d s_t)| (s = h, or (h, c) for an LSTM); otherwise max |eig(W_hh)| of the candidate
  block (RNN: W_hh; LSTM: the g block; GRU: the n block). Criticality: SUBCRITICAL below
  optimal_radius - critical_band, SUPERCRITICAL above optimal_radius + critical_band, CRITICAL between;
- effective_rank = exp(entropy of the normalised singular values) of the centred hidden states over batch
  and time (Roy & Vetterli): how many directions the state really uses, 1..hidden_size; LOW_RANK below
  0.1 x hidden_size;
- gates (LSTM input/forget/cell/output, GRU reset/update): mean, and saturation = share of sigmoid gate
  values < 0.01 or > 0.99 (|pre-activation| > 4.6; the cell candidate: |tanh| > 0.99), GATE_SATURATION
  when a sigmoid gate's saturation exceeds 0.5;
- timestep pressure (`get_timestep_profile`) = mean over the batch of ||dL/dx_t|| with the user's loss,
  read by a tensor hook on the recurrent module's input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..report.flow_report import section, series, table
from .base import FlowIssue, FlowThresholds, IssueSeverity, IssueType, contract_call, jsonable, make_issue
from .core import FlowEngine
from .engine import AnalysisRun, Collector, Extension, ExtensionResult, batches_from, rank_steps
from .jacobian import (  # noqa: F401 - recurrent_weight_spectra is re-exported (its former home)
    candidate_block,
    entropy_effective_rank,
    recurrent_weight_spectra,
    spectral_radius,
)
from .metrics import FlowMetrics

State = Any  # a tensor, or a tuple of tensors (LSTM: (h, c)); the hidden state is its first element
StepFn = Callable[[torch.Tensor, State], tuple[State, dict[str, torch.Tensor]]]


# -- pure measurements --------------------------------------------------------------------------------------
def temporal_decay_rate(profile: np.ndarray, floor: float = 1e-8) -> float:
    """Slope of ln g_k over k (nats per timestep) on the prefix where g_k > floor * max g (>= 3 points)."""
    g = np.asarray(profile, dtype=np.float64)
    if g.size < 3 or not np.isfinite(g).any() or np.nanmax(g) <= 0:
        return float("nan")
    ok = np.isfinite(g) & (g > floor * np.nanmax(g))
    n = int(np.argmin(ok)) if not ok.all() else g.size  # stop at the first reading at the numerical floor
    if n < 3:
        return float("nan")
    k = np.arange(n, dtype=np.float64)
    return float(np.polyfit(k, np.log(g[:n]), 1)[0])


def effective_memory(profile: np.ndarray, eps: float = 0.01) -> tuple[int, bool]:
    """(memory length, censored): 1 + the furthest k with g_k >= eps * max g; censored when it is all of T."""
    g = np.asarray(profile, dtype=np.float64)
    if g.size == 0 or not np.isfinite(g).any() or np.nanmax(g) <= 0:
        return 0, False
    ok = np.flatnonzero(np.nan_to_num(g, nan=0.0) >= eps * np.nanmax(g))
    memory = int(ok[-1]) + 1 if ok.size else 0
    return memory, memory >= g.size


def criticality(radius: float, optimal: float = 0.9, band: float = 0.15) -> str:
    if not math.isfinite(radius):
        return "UNKNOWN"
    if radius < optimal - band:
        return "SUBCRITICAL"
    if radius > optimal + band:
        return "SUPERCRITICAL"
    return "CRITICAL"


# -- cells rebuilt from an nn.RNN / nn.LSTM / nn.GRU ------------------------------------------------------------
def _weights(module: nn.RNNBase, layer: int) -> tuple[torch.Tensor, ...]:
    w_ih = getattr(module, f"weight_ih_l{layer}").detach()
    w_hh = getattr(module, f"weight_hh_l{layer}").detach()
    if module.bias:
        b_ih = getattr(module, f"bias_ih_l{layer}").detach()
        b_hh = getattr(module, f"bias_hh_l{layer}").detach()
    else:
        b_ih = torch.zeros(w_ih.shape[0], dtype=w_ih.dtype, device=w_ih.device)
        b_hh = torch.zeros_like(b_ih)
    return w_ih, w_hh, b_ih, b_hh


def module_cell(module: nn.RNNBase, layer: int) -> tuple[StepFn, str]:
    """The forward-direction step function of one layer of a torch recurrent module, and its cell name."""
    w_ih, w_hh, b_ih, b_hh = _weights(module, layer)
    if isinstance(module, nn.LSTM):
        def lstm(x: torch.Tensor, s: State) -> tuple[State, dict[str, torch.Tensor]]:
            h, c = s
            i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=-1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c2 = f * c + i * g
            return (o * torch.tanh(c2), c2), {"input": i, "forget": f, "cell": g, "output": o}
        return lstm, "LSTM"
    if isinstance(module, nn.GRU):
        def gru(x: torch.Tensor, h: State) -> tuple[State, dict[str, torch.Tensor]]:
            ri, zi, ni = (x @ w_ih.T + b_ih).chunk(3, dim=-1)
            rh, zh, nh = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
            r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
            n = torch.tanh(ni + r * nh)
            return (1 - z) * n + z * h, {"reset": r, "update": z}
        return gru, "GRU"
    act = torch.tanh if module.nonlinearity == "tanh" else torch.relu

    def rnn(x: torch.Tensor, h: State) -> tuple[State, dict[str, torch.Tensor]]:
        return act(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh), {}
    return rnn, f"RNN_{module.nonlinearity.upper()}"


def hidden_effective_rank(h: torch.Tensor) -> float:
    """Entropy effective rank of the centred rows of h (observations x hidden units)."""
    h = torch.nan_to_num(h.detach().double(), nan=0.0, posinf=0.0, neginf=0.0)
    if h.ndim != 2 or h.shape[0] < 2:
        return float("nan")
    return entropy_effective_rank(torch.linalg.svdvals(h - h.mean(0, keepdim=True)).cpu().numpy())


# -- the unroll ------------------------------------------------------------------------------------------------
def _hidden(state: State) -> torch.Tensor:
    return state[0] if isinstance(state, (tuple, list)) else state


def _flat(state: State) -> torch.Tensor:
    return torch.cat([s.reshape(s.shape[0], -1) for s in state], -1) if isinstance(state, (tuple, list)) else state


def _unflat(vec: torch.Tensor, like: State) -> State:
    if not isinstance(like, (tuple, list)):
        return vec.reshape(like.shape)
    out, k = [], 0
    for s in like:
        n = s[0].numel()
        out.append(vec[:, k:k + n].reshape(s.shape))
        k += n
    return tuple(out)


@dataclass(frozen=True)
class TemporalMetrics:
    """Gradient flow through time of one recurrent layer (see the module docstring for every definition)."""

    layer: str
    cell: str
    sequence_length: int
    hidden_size: int
    gradient_profile: tuple[float, ...]  # g_k, k = 0.. timesteps back from the end
    timestep_pressure: tuple[float, ...]  # ||dL/dx_t||, t = 0..T-1 (user loss), empty if not measured
    temporal_decay_rate: float
    effective_memory_length: int
    memory_censored: bool
    weight_spectral_radius: float
    jacobian_spectral_radius: float
    effective_rank: float
    gate_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    unroll_error: float = float("nan")
    optimal_radius: float = 0.9
    critical_band: float = 0.15

    @property
    def spectral_radius(self) -> float:
        """The measured Jacobian radius when available, else the weight radius."""
        return self.jacobian_spectral_radius if math.isfinite(self.jacobian_spectral_radius) \
            else self.weight_spectral_radius

    @property
    def criticality(self) -> str:
        return criticality(self.spectral_radius, self.optimal_radius, self.critical_band)

    def to_dict(self) -> dict[str, Any]:
        d = jsonable(self.__dict__)
        d["spectral_radius"] = jsonable(self.spectral_radius)
        d["criticality"] = self.criticality
        return d


def measure_unroll(step: StepFn, xs: torch.Tensor, state0: State, *, layer: str = "cell", cell: str = "custom",
                   jacobian: bool = False, seed: int = 0, jacobian_samples: int = 4, jacobian_steps: int = 8,
                   optimal_radius: float = 0.9, critical_band: float = 0.15,
                   weight_radius: float = float("nan")) -> tuple[TemporalMetrics, torch.Tensor]:
    """Unroll `step` over xs (B, T, F) from state0 and measure gradients through time; returns the metrics and
    the hidden-state sequence (B, T, H) of the unroll."""
    xs = xs.detach().requires_grad_(True)
    T = xs.shape[1]
    states: list[State] = []
    gates: dict[str, list[torch.Tensor]] = {}
    state = state0
    with torch.enable_grad():
        for t in range(T):
            states.append(state)
            state, g = step(xs[:, t], state)
            for k, v in g.items():
                gates.setdefault(k, []).append(v.detach())
        hs = torch.stack([_hidden(s) for s in states[1:]] + [_hidden(state)], dim=1)
        H = hs.shape[-1]
        gen = torch.Generator().manual_seed(seed)
        u = torch.randn(H, generator=gen, dtype=torch.float64).to(device=hs.device, dtype=hs.dtype)
        u = u / u.norm()
        probe = (_hidden(state) @ u).sum()
        (gx,) = torch.autograd.grad(probe, xs)
    per_t = gx.detach().double().norm(dim=-1).mean(0).cpu().numpy()  # (T,)
    profile = per_t[::-1].copy()
    memory, censored = effective_memory(profile)
    rate = temporal_decay_rate(profile)
    jac_radius = float("nan")
    if jacobian:
        jac_radius = _jacobian_radius(step, xs.detach(), states, jacobian_samples, jacobian_steps)
    hflat = hs.detach().reshape(-1, H)
    gate_stats = {}
    for name, vals in gates.items():
        v = torch.stack(vals).double()
        sat = ((v < 0.01) | (v > 0.99)).double().mean() if name != "cell" else (v.abs() > 0.99).double().mean()
        gate_stats[name] = {"mean": float(v.mean()), "std": float(v.std()), "saturation": float(sat)}
    metrics = TemporalMetrics(layer=layer, cell=cell, sequence_length=T, hidden_size=H,
                              gradient_profile=tuple(float(x) for x in profile), timestep_pressure=(),
                              temporal_decay_rate=rate, effective_memory_length=memory, memory_censored=censored,
                              weight_spectral_radius=weight_radius, jacobian_spectral_radius=jac_radius,
                              effective_rank=hidden_effective_rank(hflat[: min(len(hflat), 4096)]),
                              gate_stats=gate_stats, optimal_radius=optimal_radius, critical_band=critical_band)
    return metrics, hs.detach()


def _jacobian_radius(step: StepFn, xs: torch.Tensor, states: list[State], samples: int, steps: int) -> float:
    """Median of max |eig(d s_{t+1} / d s_t)| over a few samples and evenly spaced timesteps."""
    T = xs.shape[1]
    ts = sorted({int(round(v)) for v in np.linspace(0, T - 1, min(steps, T))})
    radii = []
    for b in range(min(samples, xs.shape[0])):
        for t in ts:
            s_t = states[t]
            like = tuple(s[b:b + 1] for s in s_t) if isinstance(s_t, (tuple, list)) else s_t[b:b + 1]
            x_t = xs[b:b + 1, t]

            def f(vec: torch.Tensor, like: State = like, x_t: torch.Tensor = x_t) -> torch.Tensor:
                new, _ = step(x_t, _unflat(vec.unsqueeze(0), like))
                return _flat(new).squeeze(0)

            J = torch.autograd.functional.jacobian(f, _flat(like).detach().squeeze(0), vectorize=True)
            radii.append(float(torch.linalg.eigvals(J.double()).abs().max()))
    return float(np.median(radii)) if radii else float("nan")


def unroll_module(module: nn.RNNBase, x: torch.Tensor, hx: Any, *, name: str, jacobian: bool, seed: int = 0,
                  optimal_radius: float = 0.9, critical_band: float = 0.15) -> list[TemporalMetrics]:
    """TemporalMetrics of every layer of a torch recurrent module for input x (as the module received it)."""
    if getattr(module, "proj_size", 0):
        raise NotImplementedError("LSTM with proj_size > 0 is not unrolled")
    if x.ndim == 2:  # unbatched (T, F)
        x = x.unsqueeze(0)
        hx = None if hx is None else (tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1))
    elif not module.batch_first:
        x = x.transpose(0, 1)
    B = x.shape[0]
    H = module.hidden_size
    dirs = 2 if module.bidirectional else 1
    out = []
    layer_in = x.detach()
    for layer in range(module.num_layers):
        step, cell = module_cell(module, layer)
        zeros = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        if isinstance(module, nn.LSTM):
            state0 = (zeros, zeros.clone()) if hx is None else (hx[0][layer * dirs].detach(),
                                                                 hx[1][layer * dirs].detach())
        else:
            state0 = zeros if hx is None else hx[layer * dirs].detach()
        label = name if module.num_layers == 1 else f"{name}[layer {layer}]"
        m, hs = measure_unroll(step, layer_in, state0, layer=label, cell=cell, jacobian=jacobian, seed=seed + layer,
                               optimal_radius=optimal_radius, critical_band=critical_band,
                               weight_radius=spectral_radius(candidate_block(module, layer)))
        out.append(m)
        layer_in = hs
    return out


def _check_unroll(module: nn.RNNBase, x: torch.Tensor, hx: Any) -> float:
    """Max |unrolled last-layer output - module output| (NaN when not comparable: bidirectional, dropout)."""
    if module.bidirectional or getattr(module, "proj_size", 0) or (module.dropout and module.training):
        return float("nan")
    with torch.no_grad():
        ref = module(x, hx)[0]
        xb = x.unsqueeze(0) if x.ndim == 2 else (x if module.batch_first else x.transpose(0, 1))
        h = xb
        for layer in range(module.num_layers):
            step, _ = module_cell(module, layer)
            B, H = xb.shape[0], module.hidden_size
            zeros = torch.zeros(B, H, dtype=x.dtype, device=x.device)
            hh = hx if hx is None or x.ndim != 2 else (tuple(t.unsqueeze(1) for t in hx) if isinstance(hx, tuple)
                                                       else hx.unsqueeze(1))
            if isinstance(module, nn.LSTM):
                s = (zeros, zeros.clone()) if hh is None else (hh[0][layer], hh[1][layer])
            else:
                s = zeros if hh is None else hh[layer]
            seq = []
            for t in range(h.shape[1]):
                s, _ = step(h[:, t], s)
                seq.append(_hidden(s))
            h = torch.stack(seq, 1)
        if x.ndim == 2:
            h = h.squeeze(0)
        elif not module.batch_first:
            h = h.transpose(0, 1)
        return float((h - ref).abs().max())


# -- the collector ------------------------------------------------------------------------------------------------
class RecurrentCollector(Collector):
    """Captures each recurrent module's input and initial state, and its per-timestep input gradient."""

    def __init__(self) -> None:
        self.captures: dict[str, list[tuple[torch.Tensor, Any]]] = {}
        self.pressure: dict[str, list[torch.Tensor]] = {}
        self.modules: dict[str, nn.RNNBase] = {}
        self.unsupported: dict[str, str] = {}
        self._capture_now = False

    def attach(self, run: AnalysisRun) -> None:
        self._capture_steps = rank_steps(run.steps)
        for layer in run.layers:
            if isinstance(layer.module, nn.RNNBase):
                self.modules[layer.name] = layer.module
                run.probes.pre(layer.module, self._pre, name="recurrent-pre")
                run.probes.forward(layer.module, self._hook(layer.name, run), name="recurrent-probe")

    def begin_step(self, run: AnalysisRun) -> None:
        self._capture_now = run.step in self._capture_steps

    @staticmethod
    def _pre(module: nn.Module, args: tuple) -> tuple | None:
        """Make a recurrent input that needs no gradient require one (same values), so dL/dx_t is readable."""
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() \
                and not args[0].requires_grad and torch.is_grad_enabled():
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    def _hook(self, name: str, run: AnalysisRun) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                self.unsupported[name] = f"input of type {type(x).__name__} (PackedSequence is not unrolled)"
                return
            hx = args[1] if len(args) > 1 else None
            if self._capture_now:
                hx_d = None if hx is None else (tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach())
                self.captures.setdefault(name, []).append((x.detach(), hx_d))
            time_dim = 0 if x.ndim == 2 else (1 if module.batch_first else 0)

            def on_grad(g: torch.Tensor) -> None:
                per = g.double().norm(dim=-1)  # (T,) or (B, T) or (T, B)
                if per.ndim == 2:
                    per = per.mean(dim=1 - time_dim)
                self.pressure.setdefault(name, []).append(per.detach())  # on the device: read after the passes

            run.probes.on_grad(x, on_grad)
        return hook


class RecurrentExtension(Extension):
    """Gradient flow through time of every nn.RNN/LSTM/GRU; its thresholds are FlowThresholds' recurrent ones."""

    name = "recurrent"

    def __init__(self, jacobian: bool = True) -> None:
        self.collector = RecurrentCollector()
        self.jacobian = jacobian
        self.th = FlowThresholds()

    def collectors(self) -> list[Collector]:
        return [self.collector]

    def measure(self, th: FlowThresholds | None = None) -> dict[str, TemporalMetrics]:
        """TemporalMetrics per recurrent layer, averaged over the captured steps."""
        th = th or self.th
        out: dict[str, TemporalMetrics] = {}
        for name, module in self.collector.modules.items():
            caps = self.collector.captures.get(name, [])
            per_cap = []
            for k, (x, hx) in enumerate(caps):  # the Jacobian (costly) on the last capture only
                per_cap.append(unroll_module(module, x, hx, name=name, jacobian=self.jacobian and k == len(caps) - 1,
                                             seed=k,
                                             optimal_radius=th.optimal_radius, critical_band=th.critical_band))
            if not per_cap:
                continue
            error = _check_unroll(module, *caps[-1])
            pressure = [p.cpu().numpy() for p in self.collector.pressure.get(name, [])]  # read after the passes
            lengths = {len(p) for p in pressure}
            tp = tuple(float(v) for v in np.mean(pressure, axis=0)) if pressure and len(lengths) == 1 else ()
            for layer_idx in range(len(per_cap[0])):
                ms = [c[layer_idx] for c in per_cap]
                out[ms[0].layer] = _average(ms, error if layer_idx == len(per_cap[0]) - 1 else float("nan"),
                                            tp if layer_idx == 0 else ())
        return out

    def issues(self, metrics: dict[str, TemporalMetrics], step: int = 0, th: FlowThresholds | None = None
               ) -> list[FlowIssue]:
        th = th or self.th
        decay_warning, decay_critical = th.temporal_decay_warning, th.temporal_decay_critical
        min_memory, optimal_radius, critical_band = th.min_memory, th.optimal_radius, th.critical_band
        out = []
        for m in metrics.values():
            r = m.temporal_decay_rate
            if math.isfinite(r) and abs(r) > decay_warning:
                kind = IssueType.VANISHING_TEMPORAL if r < 0 else IssueType.EXPLODING_TEMPORAL
                sev = IssueSeverity.HIGH if abs(r) > decay_critical else IssueSeverity.MEDIUM
                out.append(make_issue(kind, sev, m.layer, r, -decay_warning if r < 0 else decay_warning,
                                      f"the gradient through time {'decays' if r < 0 else 'grows'} by "
                                      f"{abs(r):.2f} nats per timestep ({math.exp(r):.2f}x per step)", step))
            if not m.memory_censored and m.effective_memory_length < min_memory:
                sev = IssueSeverity.HIGH if m.effective_memory_length < min_memory / 2 else IssueSeverity.MEDIUM
                out.append(make_issue(IssueType.SHORT_MEMORY, sev, m.layer, m.effective_memory_length,
                                      min_memory, f"inputs more than {m.effective_memory_length} timesteps "
                                      f"back keep < 1% of the gradient (memory < {min_memory})", step))
            crit = m.criticality
            if crit in ("SUBCRITICAL", "SUPERCRITICAL"):
                low = crit == "SUBCRITICAL"
                out.append(make_issue(IssueType.SPECTRAL_LOW if low else IssueType.SPECTRAL_HIGH,
                                      IssueSeverity.MEDIUM, m.layer, m.spectral_radius,
                                      optimal_radius - critical_band if low else
                                      optimal_radius + critical_band,
                                      f"spectral radius {m.spectral_radius:.2f} is {crit.lower()} (target "
                                      f"{optimal_radius:g} +/- {critical_band:g})", step))
            if m.hidden_size >= 8 and math.isfinite(m.effective_rank) and \
                    m.effective_rank / m.hidden_size < th.low_rank_ratio:
                out.append(make_issue(IssueType.LOW_RANK, IssueSeverity.MEDIUM, m.layer,
                                      m.effective_rank / m.hidden_size, th.low_rank_ratio,
                                      f"hidden states use {m.effective_rank:.1f} of {m.hidden_size} dimensions "
                                      "(insufficient capacity)", step))
            for gate, st in m.gate_stats.items():
                if gate != "cell" and st["saturation"] > th.gate_saturation:
                    out.append(make_issue(IssueType.GATE_SATURATION, IssueSeverity.MEDIUM, m.layer, st["saturation"],
                                          th.gate_saturation, f"{st['saturation']:.0%} of the {gate} gate values "
                                          "are saturated (< 0.01 or > 0.99)", step, gate=gate))
        return out

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        tm = self.measure(th)
        step = int(run.history.steps[-1]) if run.history is not None else 0
        dyn = RecurrentDynamics.from_layers(tm, self.collector.unsupported)
        return ExtensionResult(self.issues(tm, step, th), temporal_section(tm, dyn), dyn)


def _average(ms: list[TemporalMetrics], error: float, pressure: tuple[float, ...]) -> TemporalMetrics:
    first = ms[0]
    n = min(len(m.gradient_profile) for m in ms)
    profile = np.mean([m.gradient_profile[:n] for m in ms], axis=0)
    memory, censored = effective_memory(profile)
    gates: dict[str, dict[str, float]] = {}
    for g in first.gate_stats:
        gates[g] = {k: float(np.mean([m.gate_stats[g][k] for m in ms])) for k in first.gate_stats[g]}
    return TemporalMetrics(
        layer=first.layer, cell=first.cell, sequence_length=first.sequence_length, hidden_size=first.hidden_size,
        gradient_profile=tuple(float(v) for v in profile), timestep_pressure=pressure,
        temporal_decay_rate=temporal_decay_rate(profile), effective_memory_length=memory, memory_censored=censored,
        weight_spectral_radius=first.weight_spectral_radius,
        jacobian_spectral_radius=float(np.nanmedian(jr)) if np.isfinite(jr := [m.jacobian_spectral_radius
                                                                              for m in ms]).any() else float("nan"),
        effective_rank=float(np.mean([m.effective_rank for m in ms])), gate_stats=gates, unroll_error=error,
        optimal_radius=first.optimal_radius, critical_band=first.critical_band)


@dataclass(frozen=True)
class RecurrentDynamics:
    """Seed 003's `dynamics`: the most critical layer's numbers, and every layer's TemporalMetrics."""

    spectral_radius: float
    criticality: str
    effective_memory_length: int
    temporal_decay_rate: float
    effective_rank: float
    layers: dict[str, TemporalMetrics] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_layers(cls, layers: dict[str, TemporalMetrics], unsupported: dict[str, str] | None = None
                    ) -> RecurrentDynamics:
        if not layers:
            return cls(float("nan"), "UNKNOWN", 0, float("nan"), float("nan"), {}, dict(unsupported or {}))
        # the layer that forgets fastest decides (shortest memory, then most negative decay)
        worst = min(layers.values(), key=lambda m: (m.effective_memory_length,
                                                    m.temporal_decay_rate if math.isfinite(m.temporal_decay_rate)
                                                    else 0.0))
        return cls(worst.spectral_radius, worst.criticality, worst.effective_memory_length, worst.temporal_decay_rate,
                   worst.effective_rank, dict(layers), dict(unsupported or {}))

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"spectral_radius": self.spectral_radius, "criticality": self.criticality,
                         "effective_memory_length": self.effective_memory_length,
                         "temporal_decay_rate": self.temporal_decay_rate, "effective_rank": self.effective_rank,
                         "layers": {k: v.to_dict() for k, v in self.layers.items()}, "unsupported": self.unsupported})


def temporal_section(tm: dict[str, TemporalMetrics], dyn: RecurrentDynamics) -> dict[str, Any]:
    rows = [[m.layer, m.cell, m.sequence_length, m.temporal_decay_rate, m.effective_memory_length,
             "yes" if m.memory_censored else "no", m.weight_spectral_radius, m.jacobian_spectral_radius, m.criticality,
             m.effective_rank, m.unroll_error] for m in tm.values()]
    gate_rows = [[m.layer, g, st["mean"], st["std"], st["saturation"]] for m in tm.values()
                 for g, st in m.gate_stats.items()]
    charts = []
    for m in tm.values():
        charts.append(series(f"{m.layer}: gradient through time (probe)", list(range(len(m.gradient_profile))),
                             {"||dP/dx_(T-1-k)||": list(m.gradient_profile)}, xlabel="timesteps back (k)",
                             ylabel="gradient", log=True))
        if m.timestep_pressure:
            charts.append(series(f"{m.layer}: timestep pressure (loss)", list(range(len(m.timestep_pressure))),
                                 {"||dL/dx_t||": list(m.timestep_pressure)}, xlabel="timestep t",
                                 ylabel="gradient", log=True))
    tables = [table("Temporal metrics", ["layer", "cell", "T", "decay rate (nats/step)", "memory", "censored",
                                         "weight radius", "Jacobian radius", "criticality", "effective rank",
                                         "unroll error"], rows)]
    if gate_rows:
        tables.append(table("Gate statistics", ["layer", "gate", "mean", "std", "saturation"], gate_rows))
    return section("Recurrent dynamics", summary={"spectral radius": dyn.spectral_radius,
                                                  "criticality": dyn.criticality,
                                                  "effective memory length": dyn.effective_memory_length,
                                                  "temporal decay rate": dyn.temporal_decay_rate,
                                                  "effective rank": dyn.effective_rank},
                   tables=tables, series=charts,
                   notes="Measured on a re-unroll of each cell from the module's weights; profile k = timesteps "
                         "back from the end of the sequence.")


class RecurrentAnalyzer(FlowEngine):
    """RNN/LSTM/GRU analyzer. The contract (`analyze(model, inputs, ...) -> FlowReport`, the dynamics at
    `report.result("recurrent")`), or seed 003's `issues, dynamics = RecurrentAnalyzer(model).analyze(input_fn,
    loss_fn, steps=20)`. Its thresholds (optimal_radius, critical_band, min_memory, ...) are FlowThresholds'."""

    analyzer_name = "RecurrentAnalyzer"
    default_steps = 20

    def __init__(self, model: nn.Module | None = None, enable_jacobian: bool = True,
                 enable_vector_analysis: bool = False, optimal_radius: float | None = None,
                 critical_band: float | None = None, track_hidden_states: bool = True, *,
                 min_memory: float | None = None, decay_warning: float | None = None,
                 decay_critical: float | None = None, gate_saturation: float | None = None,
                 optimizer: torch.optim.Optimizer | None = None, thresholds: FlowThresholds | Any = None,
                 **threshold_overrides: float) -> None:
        super().__init__(model, thresholds=thresholds, enable_jacobian=False,
                         enable_vector_analysis=enable_vector_analysis, optimizer=optimizer,
                         optimal_radius=optimal_radius, critical_band=critical_band, min_memory=min_memory,
                         temporal_decay_warning=decay_warning, temporal_decay_critical=decay_critical,
                         gate_saturation=gate_saturation, **threshold_overrides)
        self.recurrent_jacobian = enable_jacobian
        self.track_hidden_states = track_hidden_states

    def _extensions(self) -> list[Extension]:
        exts = super()._extensions()
        if self.track_hidden_states:
            exts.append(RecurrentExtension(jacobian=self.recurrent_jacobian))
        return exts

    @property
    def dynamics(self) -> RecurrentDynamics:
        """The recurrent dynamics of the last analysis (empty before one)."""
        return self.results.get("recurrent") or RecurrentDynamics.from_layers({})

    def analyze(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The contract -> FlowReport, or seed 003's `analyze(input_fn, loss_fn, steps=20) -> (issues, dynamics)`."""
        if contract_call(args, kwargs, frozenset({"input_fn"})):
            return super().analyze(*args, **kwargs)
        return self._seed003(*args, **kwargs)

    def _seed003(self, input_fn: Callable[[], Any], loss_fn: Callable[[Any], torch.Tensor], steps: int = 20
                 ) -> tuple[list[FlowIssue], RecurrentDynamics]:
        report = self._analyze(self._bind(None), batches_from(input_fn), loss_fn, steps, None)
        return report.issues, self.dynamics

    def print_summary(self, issues: list[FlowIssue] | None = None, dynamics: RecurrentDynamics | None = None,
                      console: Any = None) -> None:
        self.report.print_summary(console=console)
        self.report.print_issues(issues if issues is not None else self.report.issues, console=console)
        from ..report.console import ConsoleReporter
        reporter = ConsoleReporter(console)
        for t in reporter.section_tables(self.report):
            reporter.console.print(t)

    def analyze_unrolled(self, cell: Callable[[torch.Tensor, State], State], inputs: torch.Tensor,
                         h0: State | None = None, *, hidden_size: int | None = None,
                         name: str = "cell") -> TemporalMetrics:
        """Gradient flow through time of a custom cell: state = cell(x_t, state) over inputs (B, T, F)."""
        return analyze_unrolled(cell, inputs, h0, hidden_size=hidden_size, name=name, jacobian=self.recurrent_jacobian,
                                optimal_radius=self.thresholds.optimal_radius,
                                critical_band=self.thresholds.critical_band)


def analyze_unrolled(cell: Callable[[torch.Tensor, State], State], inputs: torch.Tensor, h0: State | None = None, *,
                     hidden_size: int | None = None, name: str = "cell", jacobian: bool = True,
                     optimal_radius: float = 0.9, critical_band: float = 0.15) -> TemporalMetrics:
    """TemporalMetrics of a custom recurrent cell unrolled over `inputs` (B, T, F), batch first.

    `cell(x_t, state) -> state`; a tuple state's first element is the hidden state. `h0` defaults to zeros of
    `hidden_size`.
    """
    if h0 is None:
        if hidden_size is None:
            raise ValueError("give h0 or hidden_size")
        h0 = torch.zeros(inputs.shape[0], hidden_size, dtype=inputs.dtype, device=inputs.device)

    def step(x: torch.Tensor, s: State) -> tuple[State, dict[str, torch.Tensor]]:
        return cell(x, s), {}

    return measure_unroll(step, inputs, h0, layer=name, cell=type(cell).__name__, jacobian=jacobian,
                          optimal_radius=optimal_radius, critical_band=critical_band)[0]


__all__ = ["RecurrentAnalyzer", "RecurrentDynamics", "RecurrentExtension", "TemporalMetrics",
           "analyze_unrolled", "criticality", "effective_memory", "recurrent_weight_spectra", "temporal_decay_rate",
           "unroll_module"]
