"""The rule table on synthetic snapshots: every condition, severity branch, NaN and warm-up (milliseconds).

The end-to-end detector tests (test_detectors.py) train real models; these pin the table's semantics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from gradflow_agent.config import DEFAULT_PATH, load_config
from gradflow_agent.detect import diagnose
from gradflow_agent.detect.health import CRITICAL_MAX, band, health_scores, overall_status
from gradflow_agent.detect.issues import Issue
from gradflow_agent.detect.spec import RULES, rule
from gradflow_agent.snapshot import LAYER_STATS, NONFINITE_TENSORS, Snapshot

TH = load_config(None, environ={}).thresholds


def _snap(step=100, **columns) -> Snapshot:
    n = max((len(v) for v in columns.values()), default=1)
    stats = {k: np.array(columns.get(k, [math.nan] * n), dtype=np.float64) for k in LAYER_STATS}
    return Snapshot(step=step, time=0.0, interval_steps=10, layers=tuple(f"l{i}" for i in range(n)),
                    layer_types=("Linear",) * n, stats=stats,
                    nonfinite={t: np.zeros(n) for t in NONFINITE_TENSORS}, grad_norm=math.nan, loss=None,
                    counters={})


def _found(snap) -> list[tuple[str, str, str]]:
    return [(i.kind, i.layer, i.severity) for i in diagnose(snap, TH).issues]


@pytest.mark.parametrize("values,expected", [
    ([1e-7, 1e-9, 1e-6, 1.0, math.nan], [("vanishing", "l1", "critical"), ("vanishing", "l0", "warning")]),
])
def test_vanishing_warns_below_the_threshold_and_is_critical_a_hundredfold_below(values, expected):
    assert _found(_snap(grad_pressure=values)) == expected


def test_exploding_is_critical_above_the_threshold_only():
    assert _found(_snap(grad_pressure=[10.0, 10.5, 5.0])) == [("exploding", "l1", "critical")]


def test_dead_needs_a_relu_family_layer_and_escalates_at_99_percent():
    snap = _snap(activation_dead_unit_ratio=[0.6, 0.995, 0.1, 0.1, math.nan, 0.5],
                 activation_zero_ratio=[0.1, 0.1, 0.95, 0.9995, 0.99, 0.9])
    assert _found(snap) == [("dead", "l1", "critical"), ("dead", "l3", "critical"), ("dead", "l0", "warning"),
                            ("dead", "l2", "warning")]


@pytest.mark.parametrize("stat,kind,values,fires", [
    ("grad_turbulence", "unstable", [3.5, 3.0, math.nan], ["l0"]),
    ("activation_saturation_ratio", "saturated", [0.51, 0.5, math.nan], ["l0"]),
    ("update_ratio_last", "stalled", [1e-8, 1e-7, math.nan], ["l0"]),
])
def test_each_threshold_is_strict_and_nan_is_silent(stat, kind, values, fires):
    found = _found(_snap(**{stat: values}))
    assert [(k, layer) for k, layer, _ in found] == [(kind, x) for x in fires]
    assert {s for _, _, s in found} == {rule(kind).severity}


def test_stalled_judges_the_latest_ratio_not_the_interval_mean():
    # the learning rate dropped to zero within the interval: the mean is still healthy, the latest is not
    assert _found(_snap(update_ratio=[1e-3], update_ratio_last=[0.0])) == [("stalled", "l0", "warning")]
    assert _found(_snap(update_ratio=[1e-9], update_ratio_last=[1e-3])) == []


def test_threshold_rules_are_silent_during_the_warmup_and_nonfinite_is_not():
    snap = _snap(step=int(TH.warmup_steps), grad_pressure=[1e-9, 100.0])
    assert _found(snap) == []
    snap = _snap(step=3, grad_pressure=[1.0, 1.0])
    snap = Snapshot(**{**snap.__dict__, "nonfinite": {**snap.nonfinite, "grad": np.array([0.0, 4.0])},
                       "nonfinite_origin": (2, 1, "grad")})
    issues = diagnose(snap, TH).issues
    assert [(i.kind, i.layer, i.severity, i.first_step) for i in issues] == [("nonfinite", "l1", "critical", 2)]


def test_every_rule_reads_a_statistic_of_the_snapshot_and_a_threshold_of_the_config():
    for spec in RULES:
        for cond in spec.conditions:
            assert cond.statistic in LAYER_STATS and cond.threshold in TH, (spec.kind, cond)
        assert spec.severity in spec.severities


def test_one_health_formula_bands_and_an_overall_status_that_follows_the_worst_issue():
    def issue(sev, layer="l0"):
        return Issue("vanishing", layer, sev, 0.0, 0.0, 1, "", "")
    scores = health_scores(("l0", "l1", "l2"), [issue("critical"), issue("warning", "l1")],
                           known=np.array([True, True, False]))
    assert scores[0] == 50 and scores[1] == 75 and math.isnan(scores[2])
    assert [band(s) for s in (100.0, 75.0, CRITICAL_MAX, 0.0, math.nan)] == \
        ["healthy", "warning", "critical", "critical", "unknown"]
    assert overall_status([issue("warning")] * 6) == "warning"
    assert overall_status([issue("warning"), issue("critical")]) == "critical"
    assert overall_status([issue("info")]) == "healthy" and overall_status([]) == "healthy"


def test_the_schema_has_exactly_the_documented_sections():
    with open(DEFAULT_PATH, encoding="utf-8") as fh:
        sections = list(yaml.safe_load(fh))
    assert sections == ["run", "modules", "sampling", "stats", "thresholds", "exporters", "flight_recorder", "dynamics",
                        "log"]


def test_the_analyzers_read_the_same_thresholds_and_severities():
    from gradflow_agent.analyze.base import FlowThresholds, IssueSeverity
    flow = FlowThresholds()
    assert (flow.vanishing, flow.exploding, flow.dead, flow.dead_unit_ratio, flow.unstable_cv,
            flow.saturation_ratio, flow.stalled_update_ratio) == (
        TH.vanishing, TH.exploding, TH.dead_ratio, TH.dead_unit_ratio, TH.unstable_cv, TH.saturation_ratio,
        TH.stalled_update_ratio)
    custom = load_config({"thresholds": {"exploding": 42.0}}, environ={}).thresholds
    assert FlowThresholds.from_config(custom).exploding == 42.0
    assert IssueSeverity("warning") is IssueSeverity.MEDIUM and IssueSeverity("info") is IssueSeverity.LOW
