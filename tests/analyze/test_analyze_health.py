"""LayerHealth: the documented formula, its status bands, and its use on live snapshots and reports."""

from __future__ import annotations

import numpy as np
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
    recommendation,
    turbulence_penalty,
)


def test_the_old_band_penalties_are_deprecated_and_no_longer_score():
    with pytest.warns(DeprecationWarning, match="detect.health"):
        assert pressure_penalty(1e-9) == 0.0
    with pytest.warns(DeprecationWarning, match="detect.health"):
        assert turbulence_penalty(10.0) == 0.0


def test_score_is_the_one_formula_and_status_follows_the_worst_issue():
    crit = make_issue(IssueType.VANISHING, IssueSeverity.CRITICAL, "fc", 1e-9, 1e-6, "tiny")
    med = make_issue(IssueType.UNSTABLE, IssueSeverity.MEDIUM, "fc", 4.0, 3.0, "swings")
    high = make_issue(IssueType.DEAD, IssueSeverity.HIGH, "other", 1.0, 0.9, "dead")
    low = make_issue(IssueType.DEAD, IssueSeverity.LOW, "quiet", 1.0, 0.9, "dead")
    h = layer_health("fc", 1.0, 0.0, [crit, med, high])
    assert h.score == 25.0 and h.status is HealthStatus.CRITICAL  # 100 - 50 - 25, as the agent scores it
    assert h.issues == (crit, med) and h.components == {"issues": 75.0}
    # base.make_issue cannot read the agent's advice (the agent's modules import base); health's
    # recommendation() gives it, and layer_health uses it for an issue made without one
    assert h.recommendations[0] == (crit.recommendation or recommendation(IssueType.VANISHING)) != ""
    two_warnings = layer_health("other", 1.0, 0.0, [high, high])
    assert two_warnings.score == 50.0 and two_warnings.status is HealthStatus.WARNING
    assert layer_health("quiet", 1.0, 0.0, [low]).status is HealthStatus.HEALTHY
    h = layer_health("fc", 0.01, 2.0)
    assert h.score == 100.0 and h.status is HealthStatus.HEALTHY
    assert any("below the good band" in r for r in h.recommendations)  # advice, not points
    assert layer_health("fc", 1e-9, 9.0, [crit, crit, crit]).score == 0.0  # floored
    assert DEFAULT_POLICY.status(100.0) is HealthStatus.HEALTHY
    assert DEFAULT_POLICY.status(75.0) is HealthStatus.WARNING
    assert DEFAULT_POLICY.status(50.0) is HealthStatus.CRITICAL
    assert LayerHealth.from_dict(h.to_dict()) == h
    model_issue = make_issue(IssueType.DECAY, IssueSeverity.HIGH, "(model)", 5.0, 3.0, "decays")
    med_b = make_issue(IssueType.UNSTABLE, IssueSeverity.MEDIUM, "b", 4.0, 3.0, "swings")
    warned = [layer_health("a", 1.0, 0.0), layer_health("b", 1.0, 0.0, [med_b])]
    score, status = overall_health(warned, [model_issue])
    assert score == 75 - 25 and status is HealthStatus.WARNING
    score, status = overall_health([layer_health("a", 1.0, 0.0)] * 5 + [layer_health("fc", 1.0, 0.0, [crit])])
    assert score == 50 and status is HealthStatus.CRITICAL  # six layers, one critical: critical overall


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
    assert np.array_equal(scores, snap.health, equal_nan=True)  # the score the agent exports
    exploded = [snap.layers.index(x.layer) for x in snap.issues if x.kind == "exploding"]
    assert exploded and all(scores[i] <= 50 for i in exploded)
