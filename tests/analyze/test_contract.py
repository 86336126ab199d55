"""One analyzer contract: every analyzer's `analyze(model, inputs, *, loss_fn, targets, steps)` returns a
FlowReport with its typed results; thresholds come from one table, severities from one map, hooks from
hooks.add_module_hook only."""

from __future__ import annotations

import ast
import copy
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradflow_agent.analyze import (
    Analyzer,
    AttentionAnalyzer,
    ComparativeAnalyzer,
    FlowAnalyzer,
    FlowEngine,
    FlowReport,
    FlowThresholds,
    GradientFlowAnalyzer,
    IssueSeverity,
    RecurrentAnalyzer,
    RecurrentDynamics,
    RLPolicyAnalyzer,
    StandardAnalyzer,
    TemporalAnalyzer,
    TransformerAnalyzer,
)
from gradflow_agent.analyze import pathologies as P
from gradflow_agent.analyze.health import SEVERITY_FROM_AGENT, SEVERITY_TO_AGENT
from gradflow_agent.detect.spec import SEVERITIES

X, Y = P.classification_data()
SEQ = torch.randn(8, 12, 4)
TOK = torch.randint(0, 50, (8, 12))
OBS = torch.randn(16, 8)

SEED_CLASSES = [GradientFlowAnalyzer, FlowAnalyzer, StandardAnalyzer, RecurrentAnalyzer, TemporalAnalyzer,
                TransformerAnalyzer, AttentionAnalyzer, RLPolicyAnalyzer, ComparativeAnalyzer]
CONTRACT = inspect.signature(Analyzer.analyze)


def test_every_analyzer_is_one_contract():
    for cls in SEED_CLASSES:
        assert issubclass(cls, Analyzer), cls
    # the one implementation: its signature is the contract's
    assert inspect.signature(FlowEngine.analyze) == CONTRACT
    assert inspect.signature(ComparativeAnalyzer.analyze) == CONTRACT
    assert list(CONTRACT.parameters) == ["self", "model", "inputs", "loss_fn", "targets", "steps", "title"]


@pytest.mark.parametrize("make,model,inputs,kwargs,result", [
    (GradientFlowAnalyzer, P.healthy_mlp, X, {"loss_fn": F.cross_entropy, "targets": Y}, "depth_profile"),
    (FlowAnalyzer, P.healthy_mlp, lambda: X, {"loss_fn": lambda out: F.cross_entropy(out, Y)}, "depth_profile"),
    (StandardAnalyzer, P.healthy_mlp, X, {"loss_fn": F.cross_entropy, "targets": Y}, "layer_types"),
    (RecurrentAnalyzer, P.short_memory_rnn, SEQ, {"loss_fn": lambda out: out.pow(2).mean()}, "recurrent"),
    (lambda: TemporalAnalyzer(sequence_length=6), P.short_memory_rnn, SEQ,
     {"loss_fn": lambda out: out.pow(2).mean()}, "recurrent"),
    (TransformerAnalyzer, P.TinyEncoder, TOK, {"loss_fn": lambda out: out.pow(2).mean()}, "attention"),
    (AttentionAnalyzer, P.TinyEncoder, TOK, {"loss_fn": lambda out: out.pow(2).mean()}, "attention"),
    (lambda: RLPolicyAnalyzer(action_extractor=lambda o: (o[0], o[1], o[2], None)), P.Policy, OBS,
     {"loss_fn": lambda out: out[0].logsumexp(-1).mean() + out[2].pow(2).mean()}, "policy"),
], ids=["gradient-flow", "flow", "standard", "recurrent", "temporal", "transformer", "attention", "policy"])
def test_the_contract_call_returns_a_flow_report(make, model, inputs, kwargs, result):
    report = make().analyze(model(), inputs, steps=2, **kwargs)
    assert isinstance(report, FlowReport)
    assert result in report.results and report.result(result) is not None
    assert report.meta["steps"] == 2


def test_typed_results_and_the_legacy_shapes_agree():
    analyzer = RecurrentAnalyzer(P.short_memory_rnn())
    report = analyzer.analyze(None, lambda: SEQ, loss_fn=lambda out: out.pow(2).mean(), steps=2)
    assert isinstance(report.result("recurrent", RecurrentDynamics), RecurrentDynamics)
    issues, dyn = analyzer.analyze(lambda: SEQ, lambda out: out.pow(2).mean(), steps=2)  # seed 003's shape
    assert [i.kind for i in issues] == [i.kind for i in report.issues] and dyn.criticality == "SUBCRITICAL"
    assert analyzer.report.result("recurrent") is dyn
    comp = ComparativeAnalyzer(steps=2)
    r = comp.analyze(P.healthy_mlp(), X, loss_fn=F.cross_entropy, targets=Y, title="a")
    assert comp.analyses["a"] is r and isinstance(r, FlowReport)
    with pytest.raises(TypeError):
        r.result("depth_profile", RecurrentDynamics)


def test_the_default_loss_reads_output_loss():
    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
            out = self.fc(x)
            return {"logits": out, "loss": F.cross_entropy(out, labels)}

    report = FlowAnalyzer().analyze(WithLoss(), {"x": X, "labels": Y}, steps=2)
    assert report.get_layer("fc").has_gradient


def test_thresholds_come_from_one_table():
    a = TransformerAnalyzer(None, min_entropy_threshold=0.7, thresholds={"vanishing": 1e-5})
    assert a.thresholds.min_attention_entropy == 0.7 and a.thresholds.vanishing == 1e-5
    assert a.thresholds.exploding == FlowThresholds().exploding
    assert RLPolicyAnalyzer(None, min_std_threshold=0.2).thresholds.min_action_std == 0.2
    assert RecurrentAnalyzer(None, optimal_radius=1.0).thresholds.optimal_radius == 1.0
    defaults = {cls.__name__: cls(None).thresholds for cls in (GradientFlowAnalyzer, FlowAnalyzer, RecurrentAnalyzer,
                                                                TransformerAnalyzer, RLPolicyAnalyzer)}
    defaults["StandardAnalyzer"] = StandardAnalyzer().thresholds
    defaults["TemporalAnalyzer"] = TemporalAnalyzer().thresholds
    defaults["AttentionAnalyzer"] = AttentionAnalyzer().thresholds
    assert len(set(defaults.values())) == 1, defaults
    with pytest.raises(TypeError):
        FlowAnalyzer(None, no_such_threshold=1.0)


def test_one_severity_map():
    assert list(SEVERITY_FROM_AGENT) == list(SEVERITIES)
    for agent, ours in SEVERITY_FROM_AGENT.items():
        assert IssueSeverity(agent) is ours  # the enum's aliases agree with the map
        assert SEVERITY_TO_AGENT[ours] == agent
    ranks = [SEVERITY_FROM_AGENT[s].rank for s in SEVERITIES]
    assert ranks == sorted(ranks)


ANALYZE = Path(__file__).resolve().parents[2] / "gradflow_agent" / "analyze"


def test_hooks_only_through_add_module_hook():
    direct = []
    for path in ANALYZE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr.startswith("register_") and \
                    node.attr.endswith(("_hook", "_pre_hook")) and node.attr != "register_hook":
                direct.append(f"{path.name}:{node.lineno} {node.attr}")
    assert not direct, direct


def test_a_copy_taken_during_an_analysis_carries_no_hook():
    model = P.TinyEncoder()
    copies = []

    def loss(out: torch.Tensor) -> torch.Tensor:
        copies.append(copy.deepcopy(model))  # an EMA copy, taken while every analyzer hook is attached
        return out.pow(2).mean()

    TransformerAnalyzer(enable_vector_analysis=True).analyze(model, TOK, loss_fn=loss, steps=1)
    for m in copies[0].modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
