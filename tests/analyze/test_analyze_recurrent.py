"""RecurrentAnalyzer / TemporalAnalyzer: gradients through time, criticality, gates, custom cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.analyze import (
    GradientFlowAnalyzer,
    RecurrentAnalyzer,
    TemporalAnalyzer,
    analyze_unrolled,
)
from gradflow_agent.analyze import pathologies as P
from gradflow_agent.analyze.recurrent import criticality, effective_memory, temporal_decay_rate

g = torch.Generator().manual_seed(0)
SEQ = 0.3 * torch.randn(16, 24, 4, generator=g)
TARGET = torch.randint(0, 3, (16,), generator=g)


def ce(out: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, TARGET)


def test_pure_definitions():
    profile = 0.5 ** np.arange(20)
    assert temporal_decay_rate(profile) == pytest.approx(math.log(0.5))
    assert effective_memory(profile) == (7, False)  # 0.5^6 = 0.0156 >= 0.01 > 0.5^7
    assert effective_memory(np.ones(12)) == (12, True)
    assert temporal_decay_rate(1.2 ** np.arange(10)) == pytest.approx(math.log(1.2))
    assert [criticality(r) for r in (0.5, 0.75, 0.9, 1.05, 1.2, float("nan"))] == \
        ["SUBCRITICAL", "CRITICAL", "CRITICAL", "CRITICAL", "SUPERCRITICAL", "UNKNOWN"]


def test_custom_cell_through_time_is_exact():
    a = 0.5

    def cell(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # h' = a h + x: dh_T/dx_t = a^(T-1-t) I
        return a * h + x

    tm = analyze_unrolled(cell, torch.randn(3, 15, 6), hidden_size=6)
    assert np.allclose(tm.gradient_profile, a ** np.arange(15))
    assert tm.temporal_decay_rate == pytest.approx(math.log(a))
    assert tm.effective_memory_length == 7 and not tm.memory_censored
    assert tm.jacobian_spectral_radius == pytest.approx(a)
    assert tm.criticality == "SUBCRITICAL"


def test_short_memory_rnn_is_flagged_and_healthy_rnn_is_silent():
    issues, dyn = RecurrentAnalyzer(P.short_memory_rnn()).analyze(lambda: SEQ, ce, steps=3)
    assert {"short_memory", "vanishing_temporal", "spectral_low"} <= {i.kind for i in issues}
    assert dyn.effective_memory_length < 10 and dyn.temporal_decay_rate < -0.3 and dyn.criticality == "SUBCRITICAL"
    tm = dyn.layers["rnn"]
    assert tm.unroll_error < 1e-5  # the re-unrolled cell is the module
    assert tm.weight_spectral_radius == pytest.approx(
        float(torch.linalg.eigvals(P.short_memory_rnn().rnn.weight_hh_l0.detach().double()).abs().max()))

    issues, dyn = RecurrentAnalyzer(P.healthy_rnn()).analyze(lambda: SEQ, ce, steps=3)
    assert issues == [], [str(i) for i in issues]
    assert dyn.criticality == "CRITICAL" and abs(dyn.temporal_decay_rate) < 0.1
    assert dyn.effective_memory_length == 24 and dyn.layers["rnn"].memory_censored


def test_jacobian_radius_matches_weights_in_the_linear_regime():
    model = P.healthy_rnn()
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(0.8)
    _, dyn = RecurrentAnalyzer(model).analyze(lambda: 0.01 * SEQ, ce, steps=1)
    tm = dyn.layers["rnn"]
    assert tm.weight_spectral_radius == pytest.approx(0.8, rel=1e-4)
    assert tm.jacobian_spectral_radius == pytest.approx(0.8, rel=0.02)  # tanh' ~ 1 for tiny states


def test_gates_lstm_gru_and_saturation():
    issues, dyn = RecurrentAnalyzer(P.saturated_lstm()).analyze(lambda: SEQ, ce, steps=2)
    assert "gate_saturation" in {i.kind for i in issues}
    assert set(dyn.layers["rnn"].gate_stats) == {"input", "forget", "cell", "output"}
    issues, dyn = RecurrentAnalyzer(P.SequenceModel("lstm", forget_bias=3.0)).analyze(lambda: SEQ, ce, steps=2)
    assert "gate_saturation" not in {i.kind for i in issues}
    assert dyn.layers["rnn"].gate_stats["forget"]["mean"] == pytest.approx(1 / (1 + math.exp(-3)), abs=0.05)
    assert dyn.layers["rnn"].unroll_error < 1e-5
    _, dyn = RecurrentAnalyzer(P.SequenceModel("gru")).analyze(lambda: SEQ, ce, steps=2)
    assert set(dyn.layers["rnn"].gate_stats) == {"reset", "update"} and dyn.layers["rnn"].unroll_error < 1e-5


def test_two_layer_lstm_with_initial_state():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 8, num_layers=2)  # time-major

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h0 = (torch.zeros(2, x.shape[1], 8), 0.1 * torch.ones(2, x.shape[1], 8))
            return self.rnn(x, h0)[0][-1].sum(-1)

    _, dyn = RecurrentAnalyzer(Two()).analyze(lambda: SEQ.transpose(0, 1), lambda o: o.pow(2).mean(), steps=1)
    assert set(dyn.layers) == {"rnn[layer 0]", "rnn[layer 1]"}
    assert dyn.layers["rnn[layer 1]"].unroll_error < 1e-5
    assert all(len(m.gradient_profile) == 24 for m in dyn.layers.values())


def test_temporal_analyzer_api():
    temporal = TemporalAnalyzer(sequence_length=16)
    report = temporal.analyze(P.short_memory_rnn(), SEQ, TARGET, F.cross_entropy, steps=2)
    assert "recurrent" in report.sections
    profile = temporal.get_timestep_profile("rnn")
    assert profile.shape == (16,) and profile[-1] > profile[0]  # the loss reads the last step
    assert temporal.get_timestep_profile(source="probe").shape == (16,)
    assert temporal.get_effective_memory() == {"rnn": temporal.get_effective_memory("rnn")}
    assert set(temporal.get_temporal_metrics()) == {"rnn"}
    issues = GradientFlowAnalyzer(P.short_memory_rnn(), enable_rnn_analyzer=True).analyze(lambda: SEQ, ce, steps=2)
    assert "short_memory" in {i.kind for i in issues}
