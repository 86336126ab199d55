"""LayerHealth: the documented formula, its status bands, and its use on live snapshots and reports."""

from __future__ import annotations

import math

import pytest
import torch.nn.functional as F

import gradflow_agent
from gradflow_agent.analyze import (
    FlowAnalyzer,
    HealthStatus,
    IssueSeverity,
    IssueType,
    LayerHealth,
    layer_health,
    snapshot_health_scores,
)
from gradflow_agent.analyze import pathologies as P
from gradflow_agent.analyze.base import make_issue
from gradflow_agent.analyze.health import (
    DEFAULT_POLICY,
    overall_health,
    pressure_penalty,
    turbulence_penalty,
)


@pytest.mark.parametrize("pressure,points", [(1.0, 0.0), (0.1, 0.0), (10.0, 0.0), (0.01, 25.0), (100.0, 25.0),
                                             (0.001, 50.0), (1e-9, 50.0), (1e6, 50.0),
                                             (0.05, 25 * math.log10(2)), (float("nan"), 0.0), (0.0, 50.0)])
def test_pressure_penalty(pressure, points):
    assert pressure_penalty(pressure) == pytest.approx(points)


@pytest.mark.parametrize("turbulence,points", [(0.5, 0.0), (1.0, 0.0), (3.0, 20.0), (5.0, 40.0), (10.0, 40.0),
                                               (float("nan"), 0.0)])
def test_turbulence_penalty(turbulence, points):
    assert turbulence_penalty(turbulence) == pytest.approx(points)


def test_score_status_and_advice():
    crit = make_issue(IssueType.VANISHING, IssueSeverity.CRITICAL, "fc", 1e-9, 1e-6, "tiny")
    med = make_issue(IssueType.UNSTABLE, IssueSeverity.MEDIUM, "fc", 4.0, 3.0, "swings")
    other = make_issue(IssueType.DEAD, IssueSeverity.HIGH, "elsewhere", 1.0, 0.9, "dead")
    h = layer_health("fc", 1.0, 0.0, [crit, med, other])
    assert h.score == 40.0 and h.status is HealthStatus.CRITICAL
    assert h.issues == (crit, med) and h.components == {"pressure": 0.0, "turbulence": 0.0, "issues": 60.0}
    assert h.recommendations[0] == crit.recommendation
    h = layer_health("fc", 0.01, 2.0)  # 100 - 25 - 10
    assert h.score == 65.0 and h.status is HealthStatus.WARNING
    assert any("below the good band" in r for r in h.recommendations)
    assert layer_health("fc", 1e-9, 9.0, [crit]).score == 0.0  # floored
    assert DEFAULT_POLICY.status(75.0) is HealthStatus.HEALTHY
    assert DEFAULT_POLICY.status(74.99) is HealthStatus.WARNING
    assert DEFAULT_POLICY.status(50.0) is HealthStatus.WARNING
    assert DEFAULT_POLICY.status(49.99) is HealthStatus.CRITICAL
    assert LayerHealth.from_dict(h.to_dict()) == h
    model_issue = make_issue(IssueType.DECAY, IssueSeverity.HIGH, "(model)", 5.0, 3.0, "decays")
    score, status = overall_health([layer_health("a", 1.0, 0.0), layer_health("b", 0.01, 0.0)], [model_issue])
    assert score == pytest.approx((100 + 75) / 2 - 30) and status is HealthStatus.WARNING


def test_report_health_is_the_formula_on_its_metrics():
    report = FlowAnalyzer(P.dead_relu()).analyze(*P.classification_data(), F.cross_entropy, steps=4)
    assert report.issues
    for m in report.layers:
        want = layer_health(m.layer, m.mean_pressure, m.turbulence, report.issues)
        assert report.health[m.layer].score == pytest.approx(want.score)
    assert report.health["3"].status is not HealthStatus.HEALTHY  # the dead ReLU
    worst = report.get_worst_layers(3)
    assert [h.score for h in worst] == sorted(h.score for h in worst)
    assert worst[0].score == min(h.score for h in report.health.values())


def test_snapshot_health_scores_on_a_live_snapshot():
    from gradflow_agent import demo
    w = demo.build("exploding")
    cfg = {"exporters": {"prometheus": {"enabled": False}},
           "sampling": {"export_every_n_steps": 10, "window": 10}, "thresholds": {"warmup_steps": 0}}
    agent = gradflow_agent.attach(w.model, cfg, optimizer=w.optimizer)
    for step in range(20):
        demo.train_step(w, step, agent)
    snap = agent.snapshot()
    agent.detach()
    scores = snapshot_health_scores(snap)
    assert snap.issues
    for i, name in enumerate(snap.layers):
        penalty = sum({"critical": 40, "warning": 20, "info": 5}[x.severity] for x in snap.issues if x.layer == name)
        want = 100 - pressure_penalty(snap.stats["grad_pressure"][i]) \
            - turbulence_penalty(snap.stats["grad_turbulence"][i]) - penalty
        assert scores[i] == pytest.approx(min(100.0, max(0.0, want)))
    exploded = [snap.layers.index(x.layer) for x in snap.issues if x.kind == "exploding"]
    assert all(scores[i] < 50 for i in exploded)
