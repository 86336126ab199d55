"""The LLM issue's two false positives, on real transformers models built from small configs (no download):
a fresh, healthy LlamaForCausalLM is not VANISHING (seed 004's absolute 0.01 flagged 6-7 of its layers), and
BERT's position embeddings are not DEAD (rows no token indexed have zero gradient by construction). Truly
vanishing layers and truly dead ones are still flagged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradflow_agent.analyze import FlowAnalyzer, GradientFlowAnalyzer, IssueType
from gradflow_agent.analyze import pathologies as P

transformers = pytest.importorskip("transformers")


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def bert(cls: type) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=512)
    return cls(cfg)


IDS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))


def test_a_fresh_llama_is_not_vanishing():
    report = FlowAnalyzer().analyze(llama(), {"input_ids": IDS, "labels": IDS}, steps=2)  # loss: output.loss
    assert not [i for i in report.issues if i.issue_type is IssueType.VANISHING], [str(i) for i in report.issues]
    q = report.get_layer("model.layers.1.self_attn.q_proj")
    assert 0 < q.mean_pressure < 0.01  # what seed 004's absolute threshold flagged


def test_a_truly_vanishing_layer_is_still_flagged():
    model = llama()
    with torch.no_grad():  # a collapsed block: its FFN gate gets ~1e-5 of its healthy gradient
        model.model.layers[1].mlp.up_proj.weight.mul_(1e-5)
    report = FlowAnalyzer().analyze(model, {"input_ids": IDS, "labels": IDS}, steps=2)
    flagged = {i.layer for i in report.issues if i.issue_type is IssueType.VANISHING}
    assert "model.layers.1.mlp.gate_proj" in flagged, [str(i) for i in report.issues]
    X, Y = P.classification_data()  # and the classic: 12 sigmoid layers, by either analyzer
    report = FlowAnalyzer().analyze(P.deep_sigmoid(), X, loss_fn=F.cross_entropy, targets=Y, steps=2)
    assert {"0", "2", "4"} <= {i.layer for i in report.issues if i.issue_type is IssueType.VANISHING}


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertModel"])
def test_bert_embeddings_are_not_dead(name):
    model = bert(getattr(transformers, name))
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    if name == "BertForMaskedLM":
        report = FlowAnalyzer().analyze(model, {"input_ids": ids, "labels": ids}, steps=2)
    else:
        report = FlowAnalyzer().analyze(model, {"input_ids": ids}, steps=2,
                                        loss_fn=lambda out: out.last_hidden_state.pow(2).mean())
    prefix = "bert." if name == "BertForMaskedLM" else ""
    pos = report.get_layer(f"{prefix}embeddings.position_embeddings")
    assert pos.grad_zero_ratio > 0.9  # 496 of 512 rows unused: zero gradient by construction
    dead = [i for i in report.issues if i.issue_type is IssueType.DEAD]
    assert not dead, [str(i) for i in dead]


def test_a_dead_layer_is_still_dead():
    issues = GradientFlowAnalyzer(P.dead_relu()).analyze(lambda: P.classification_data()[0],
                                                         lambda out: F.cross_entropy(out, P.classification_data()[1]),
                                                         steps=3)
    assert "3" in {i.layer for i in issues if i.issue_type is IssueType.DEAD}
