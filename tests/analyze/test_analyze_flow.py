"""GradientFlowAnalyzer / FlowAnalyzer / StandardAnalyzer: each model built with a problem is flagged on the
right layer, healthy models raise nothing, and the numbers equal a direct torch computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.analyze import (
    FlowAnalyzer,
    GradientFlowAnalyzer,
    IssueSeverity,
    IssueType,
    StandardAnalyzer,
    coherence,
    filter_issues,
    planar_rotation,
    weight_spectrum,
)
from gradflow_agent.analyze import pathologies as P
from gradflow_agent.analyze.probes import participation_ratio

X, Y = P.classification_data()


def ce(out: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, Y)


def kinds(issues) -> set[tuple[str, str]]:
    return {(i.issue_type.value, i.layer) for i in issues}


@pytest.mark.parametrize("builder,kind,layers", [
    (P.deep_sigmoid, "vanishing", {"0", "2", "4"}),
    (P.deep_sigmoid, "decay", {"0"}),
    (P.large_gain, "exploding", {"0", "2", "4", "6", "8", "10"}),
    (P.dead_relu, "dead", {"3"}),
    (P.hourglass, "bottleneck", {"4"}),
    (P.layer_outlier, "layer_variance", {"2"}),
], ids=["vanishing", "decay", "exploding", "dead", "bottleneck", "layer-variance"])
def test_each_problem_is_flagged_on_its_layer(builder, kind, layers):
    issues = GradientFlowAnalyzer(builder()).analyze(lambda: X, ce, steps=6)
    flagged = {layer for k, layer in kinds(issues) if k == kind}
    assert layers <= flagged, [str(i) for i in issues]
    for i in issues:
        assert i.message and i.recommendation and math.isfinite(i.threshold)


def test_bottleneck_is_only_the_waist():
    issues = GradientFlowAnalyzer(P.hourglass()).analyze(lambda: X, ce, steps=6)
    assert {layer for k, layer in kinds(issues) if k == "bottleneck"} == {"4"}
    b = next(i for i in issues if i.issue_type is IssueType.BOTTLENECK)
    assert b.details["effective_rank_out"] <= 2.0 + 1e-6  # two units cannot carry more than 2 dimensions
    assert b.value >= 6.0


def test_healthy_models_raise_nothing():
    assert GradientFlowAnalyzer(P.healthy_mlp()).analyze(lambda: X, ce, steps=6) == []
    a = GradientFlowAnalyzer(P.healthy_mlp(), enable_vector_analysis=True, enable_jacobian=True)
    assert a.analyze(lambda: X, ce, steps=6) == []
    report = StandardAnalyzer().analyze(P.healthy_mlp(), X, Y, F.cross_entropy, steps=4)
    assert report.issues == [] and report.overall_status == "HEALTHY"


def test_unstable_and_numerical():
    k = [0]

    def spiky() -> torch.Tensor:  # one batch in ten is 1000x larger: pressure CV over 20 steps > 3
        k[0] += 1
        return X * (1000.0 if k[0] % 10 == 5 else 1.0)

    a = GradientFlowAnalyzer(P.healthy_mlp())
    unstable = {layer for kind, layer in kinds(a.analyze(spiky, ce, steps=20)) if kind == "unstable"}
    assert {"0", "2", "4", "6"} <= unstable
    p = np.array(a.report.get_layer("0").pressure_history)
    assert a.report.get_layer("0").turbulence == pytest.approx(p.std(ddof=1) / p.mean(), rel=1e-4)

    def with_nan() -> torch.Tensor:
        x = X.clone()
        x[0, 0] = float("nan")
        return x

    issues = GradientFlowAnalyzer(P.healthy_mlp()).analyze(with_nan, ce, steps=3)
    assert ("numerical", "0") in kinds(issues)
    assert issues[0].severity is IssueSeverity.CRITICAL


def test_pressure_and_gain_equal_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.copy_(2.0 * torch.eye(8))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    want = math.sqrt(model[0].weight.grad.norm() ** 2 + model[0].bias.grad.norm() ** 2)
    model.zero_grad(set_to_none=True)
    report = FlowAnalyzer(model).analyze(x, y, F.cross_entropy, steps=3)
    assert report.get_layer("0").mean_pressure == pytest.approx(want, rel=1e-5)
    assert report.get_layer("1").gradient_gain == pytest.approx(2.0, rel=1e-5)  # ||W^T g|| / ||g|| with W = 2I
    assert [m.depth for m in report.layers] == [0, 1, 2]


def test_participation_ratio_is_exact_on_known_data():
    x = torch.zeros(6, 5)
    x[:3, :3] = torch.eye(3)
    x[3:, :3] = -torch.eye(3)  # three orthogonal directions of equal variance, zero mean
    assert participation_ratio(x) == pytest.approx(3.0)
    assert participation_ratio(torch.randn(100, 1) * torch.ones(1, 4)) == pytest.approx(1.0)


def test_the_model_is_left_as_it_was():
    model = P.healthy_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    GradientFlowAnalyzer(model, enable_vector_analysis=True).analyze(lambda: X, ce, steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[2].weight.grad is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_thresholds_are_one_table_and_filtering_works():
    def small_loss(out: torch.Tensor) -> torch.Tensor:  # pressures ~1e-3: below seed 004's 0.01, above 1e-6
        return 0.01 * F.cross_entropy(out, Y)

    # every analyzer takes default.yaml's thresholds (seed 004's absolute 0.01 is no analyzer's default any more)
    assert GradientFlowAnalyzer(P.healthy_mlp()).analyze(lambda: X, small_loss, steps=3) == []
    report = FlowAnalyzer(P.healthy_mlp()).analyze(X, None, lambda out, _y: small_loss(out), steps=3)
    assert report.issues == [] and report.meta["thresholds"] == GradientFlowAnalyzer(None).thresholds.to_dict()
    report = FlowAnalyzer(P.healthy_mlp(), vanishing=0.01).analyze(X, None, lambda out, _y: small_loss(out), steps=3)
    assert {k for k, _ in kinds(report.issues)} == {"vanishing"}
    a = GradientFlowAnalyzer(P.healthy_mlp(), vanishing_threshold=0.01)
    assert a.thresholds.vanishing == 0.01 and a.thresholds.exploding == 10.0
    issues = a.analyze(lambda: X, small_loss, steps=3)
    assert issues and all(i.issue_type is IssueType.VANISHING for i in issues)

    issues = GradientFlowAnalyzer(P.deep_sigmoid()).analyze(lambda: X, ce, steps=4)
    crit = filter_issues(issues, min_severity="critical")
    assert crit and all(i.severity is IssueSeverity.CRITICAL for i in crit)
    assert filter_issues(issues, types=["decay"]) == [i for i in issues if i.kind == "decay"]
    assert {i.layer for i in filter_issues(issues, layer="10")} == {"10"}
    only = GradientFlowAnalyzer(P.deep_sigmoid()).analyze(lambda: X, ce, steps=4, issue_types=[IssueType.DECAY])
    assert [i.kind for i in only] == ["decay"]
    ranks = [i.severity.rank for i in issues]
    assert ranks == sorted(ranks, reverse=True)


def test_vector_analysis_definitions():
    g = np.array([1.0, 2.0, 0.5])
    assert coherence(np.stack([g, g, g])) == pytest.approx(1.0)
    assert coherence(np.stack([g, -g, g, -g])) == pytest.approx(-1.0)
    theta = 0.3
    rot = np.array([[math.cos(theta * t), math.sin(theta * t), 0.0] for t in range(12)])
    r = planar_rotation(rot)
    assert r.curl == pytest.approx(1.0) and abs(r.rotation_rate) == pytest.approx(theta)
    assert abs(r.total_rotation) == pytest.approx(11 * theta) and r.plane_energy == pytest.approx(1.0)
    flips = planar_rotation(np.stack([g, -g] * 5))  # reversals are not rotation
    assert flips.total_rotation == pytest.approx(0.0) and flips.curl == 0.0


def test_circulation_oscillation_and_silence():
    game = P.BilinearGame()
    a = GradientFlowAnalyzer(game, enable_vector_analysis=True, optimizer=torch.optim.SGD(game.parameters(), lr=0.3))
    issues = a.analyze(lambda: torch.zeros(1), lambda out: out, steps=20)
    assert kinds(issues) == {("circulation", "(root)")}
    vm = a.results["vector"]["(root)"]
    assert abs(vm.rotation_rate) == pytest.approx(math.atan(0.3), rel=1e-3)  # SGD on (p1, -p0) rotates by atan(lr)
    assert vm.coherence == pytest.approx(math.cos(math.atan(0.3)), rel=1e-3)

    lin = nn.Linear(4, 1, bias=False)  # loss = |w|^2 / 2 per row; lr 3.8 * curvature 0.5 = 1.9: w -> -0.9 w
    a = GradientFlowAnalyzer(lin, enable_vector_analysis=True, optimizer=torch.optim.SGD(lin.parameters(), lr=3.8))
    issues = a.analyze(lambda: torch.eye(4), lambda out: (out ** 2).mean(), steps=8)
    assert ("oscillation", "(root)") in kinds(issues)
    assert a.results["vector"]["(root)"].coherence == pytest.approx(-1.0, abs=1e-6)

    m = P.healthy_mlp()
    a = GradientFlowAnalyzer(m, enable_vector_analysis=True, optimizer=torch.optim.SGD(m.parameters(), lr=0.05))
    assert a.analyze(lambda: X, ce, steps=12) == []
    assert all(v.coherence > 0.5 for v in a.results["vector"].values())


def test_jacobian_spectra_and_low_rank():
    w = torch.randn(6, 6, dtype=torch.float64)
    s = weight_spectrum("w", w)
    sv = np.linalg.svd(w.numpy(), compute_uv=False)
    assert s.spectral_norm == pytest.approx(sv[0]) and s.condition_number == pytest.approx(sv[0] / sv[-1])
    assert s.spectral_radius == pytest.approx(np.abs(np.linalg.eigvals(w.numpy())).max())
    p = sv / sv.sum()
    assert s.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()))

    model = P.healthy_mlp()
    with torch.no_grad():
        model[2].weight.copy_(torch.outer(torch.randn(64), torch.randn(64)) / 8)  # rank one
    # its output has effective rank 1: a bottleneck by activations; the Jacobian view adds the weight's rank
    assert kinds(GradientFlowAnalyzer(model).analyze(lambda: X, ce, steps=2)) == {("bottleneck", "2")}
    issues = GradientFlowAnalyzer(model, enable_jacobian=True).analyze(lambda: X, ce, steps=2)
    assert kinds(issues) == {("bottleneck", "2"), ("low_rank", "2")}
    assert next(i for i in issues if i.kind == "low_rank").value < 0.1


def test_standard_analyzer_views():
    analyzer = StandardAnalyzer()
    report = analyzer.analyze(P.hourglass(), X, Y, F.cross_entropy, steps=3)
    assert [i.layer for i in analyzer.get_bottlenecks()] == ["4"]
    types = analyzer.get_layer_type_stats()
    assert types["Linear"]["count"] == 6 and types["ReLU"]["count"] == 5
    assert math.isnan(types["ReLU"]["mean_pressure"])  # parameterless: no parameter gradient
    profile = analyzer.get_depth_profile()
    assert [r["layer"] for r in profile] == ["0", "2", "4", "6", "8", "10"]
    assert [r["pressure"] for r in profile] == [report.get_layer(r["layer"]).mean_pressure for r in profile]
    assert "layer_types" in report.sections


def test_convolutional_networks_use_channels_as_features():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, 10))
    report = StandardAnalyzer().analyze(cnn, x, y, F.cross_entropy, steps=2)
    assert report.issues == [], [str(i) for i in report.issues]
    assert report.get_layer("0").effective_rank_in <= 3.0 + 1e-6  # 3 input channels
    assert report.get_layer("4").width == 32
    squeeze = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(64, 2, 1), nn.ReLU(), nn.Conv2d(2, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(64, 10))
    report = StandardAnalyzer().analyze(squeeze, x, y, F.cross_entropy, steps=2)
    assert {i.layer for i in report.issues if i.kind == "bottleneck"} == {"4"}  # the 1x1 conv to 2 channels


def test_training_during_the_analysis_records_each_steps_loss():
    model = P.healthy_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    a = GradientFlowAnalyzer(model, optimizer=opt)
    a.analyze(lambda: X, ce, steps=4)
    losses = a.report.history["loss"]
    assert len(losses) == 4 and losses == sorted(losses, reverse=True)  # full-batch SGD descends
    assert all(math.isfinite(m.update_ratio) and m.update_ratio > 0 for m in a.report.layers if m.has_gradient)
    assert not torch.equal(model[0].weight, P.healthy_mlp()[0].weight)  # with an optimizer the analysis trains
