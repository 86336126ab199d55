"""TransformerAnalyzer / AttentionAnalyzer: attention maps through hooks, Q/K/V balance, residual stream, FFN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.analyze import AttentionAnalyzer, TransformerAnalyzer
from gradflow_agent.analyze import pathologies as P
from gradflow_agent.analyze.transformer import (
    attention_entropy,
    attention_sink,
    attention_sparsity,
    head_diversity,
    token_residual,
)

g = torch.Generator().manual_seed(0)
TOK = torch.randint(0, 50, (16, 12), generator=g)
LABEL = torch.randint(0, 5, (16,), generator=g)


def ce(out: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, LABEL)


def analyze(model: nn.Module, steps: int = 2, inputs: torch.Tensor = TOK, loss=ce):
    return TransformerAnalyzer(model).analyze(lambda: inputs, loss, steps=steps)


def test_attention_measures_on_known_maps():
    L = 6
    all_valid = torch.ones(1, 1, L, L, dtype=torch.bool)
    uniform = torch.full((2, 3, L, L), 1 / L)
    onehot = torch.eye(L).expand(2, 3, L, L)
    assert attention_entropy(uniform, all_valid) == pytest.approx([1.0] * 3)
    assert attention_entropy(onehot, all_valid) == pytest.approx([0.0] * 3)
    assert attention_sparsity(onehot, all_valid) == pytest.approx([(L - 1) / L] * 3)
    assert attention_sparsity(uniform, all_valid) == pytest.approx([0.0] * 3)
    causal = torch.ones(L, L, dtype=torch.bool).tril().reshape(1, 1, L, L)
    causal_uniform = causal / causal.sum(-1, keepdim=True)
    assert attention_entropy(causal_uniform.expand(2, 3, L, L), causal) == pytest.approx([1.0] * 3)  # row 0 skipped
    sink = torch.zeros(1, 2, L, L)
    sink[..., 0] = 1.0
    assert attention_sink(sink, all_valid) == pytest.approx([1.0, 1.0])
    assert attention_sink(uniform, all_valid) == pytest.approx([1 / L] * 3)
    a = torch.softmax(torch.randn(4, 1, L, L), -1)
    assert head_diversity(a.expand(4, 3, L, L), all_valid) == pytest.approx(0.0, abs=1e-9)  # identical heads
    assert head_diversity(torch.softmax(torch.randn(4, 3, L, L) * 3, -1), all_valid) > 0.7
    x = torch.randn(2, 5, 8)
    assert token_residual(x[:, :1].expand(2, 5, 8)) == pytest.approx(0.0, abs=1e-12)
    assert token_residual(x) > 0.5


def test_healthy_encoders_are_silent_and_norm_placement_is_read():
    for model, placement in ((P.TinyEncoder(), "pre-norm"), (P.TinyEncoder(norm_first=False, layers=3), "post-norm"),
                             (P.BlockStack(), "pre-norm")):
        issues, st = analyze(model)
        assert issues == [], [str(i) for i in issues]
        assert st.rank_collapse_risk == "LOW" and st.attention_entropy_mean > 0.9 and st.head_diversity > 0.5
        assert {b.norm_placement for b in st.blocks} == {placement}


def test_qkv_gradients_equal_torch_and_outputs_are_unchanged():
    model = P.TinyEncoder()
    plain = model(TOK).detach()
    analyzer = TransformerAnalyzer(model)
    _, st = analyzer.analyze(lambda: TOK, ce, steps=2)
    assert torch.allclose(analyzer.last_run.outputs[0], plain, atol=1e-5)  # asking for weights changes nothing
    model.zero_grad(set_to_none=True)
    ce(model(TOK)).backward()
    w = model.encoder.layers[0].self_attn.in_proj_weight.grad
    layer = st.layers["encoder.layers.0.self_attn"]
    assert layer.q_grad == pytest.approx(float(w[:32].norm()), rel=1e-4)
    assert layer.k_grad == pytest.approx(float(w[32:64].norm()), rel=1e-4)
    assert layer.v_grad == pytest.approx(float(w[64:].norm()), rel=1e-4)
    assert layer.heads == 4 and len(layer.entropy_per_head) == 4


@pytest.mark.parametrize("builder,kind", [
    (lambda: P.TinyEncoder(qk_scale=30.0), "low_attention_entropy"),
    (lambda: P.TinyEncoder(qk_scale=1e-4), "qkv_imbalance"),
    (lambda: P.TinyEncoder(ff=2), "ffn_bottleneck"),
    (lambda: P.BlockStack(residual=False), "rank_collapse"),
    (lambda: P.BlockStack(alpha=0.1, branch_scale=1e-3), "residual_decay"),
], ids=["huge-logits", "qk-near-zero", "ffn-2-units", "no-residual", "shrinking-residual"])
def test_each_attention_problem_is_flagged(builder, kind):
    issues, st = analyze(builder())
    assert kind in {i.kind for i in issues}, [str(i) for i in issues]
    if kind == "low_attention_entropy":
        assert st.attention_entropy_mean < 0.25 and st.attention_sparsity > 0.8
        assert all(i.severity.value == "high" for i in issues if i.kind == kind)
    if kind == "rank_collapse":
        assert st.rank_collapse_risk == "HIGH" and st.rank_collapse_ratio < 0.1
    if kind == "residual_decay":
        assert st.residual_gradient_ratio < 1e-3


def test_attention_sink():
    x = P.sink_inputs()
    y = torch.randint(0, 3, (16,))
    issues, st = analyze(P.SinkAttention(), inputs=x, loss=lambda o: F.cross_entropy(o, y))
    assert "attn_bottleneck" in {i.kind for i in issues}
    assert st.layers["attn"].sink > 0.9


def test_custom_softmax_attention_is_read():
    class SoftmaxAttention(nn.Module):
        def __init__(self, d: int = 16, heads: int = 2, scale: float = 1.0) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, d)
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.softmax = nn.Softmax(dim=-1)
            self.heads, self.scale = heads, scale
            self.head = nn.Linear(d, 5)

        def forward(self, tok: torch.Tensor) -> torch.Tensor:
            x = self.embed(tok)
            B, T, D = x.shape
            q, k, v = (p(x).reshape(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = self.softmax(self.scale * q @ k.transpose(-1, -2) / math.sqrt(D // self.heads))
            return self.head((a @ v).transpose(1, 2).reshape(B, T, D).mean(1))

    issues, st = analyze(SoftmaxAttention())
    assert st.layers["softmax"].heads == 2 and st.layers["softmax"].entropy_mean > 0.8
    layer = st.layers["softmax"]
    assert math.isfinite(layer.q_grad) and math.isfinite(layer.v_grad)  # q/k/v found by name
    issues, st = analyze(SoftmaxAttention(scale=100.0))
    assert "low_attention_entropy" in {i.kind for i in issues}


def test_attention_analyzer_api():
    attention = AttentionAnalyzer(num_heads=8)
    report = attention.analyze(P.TinyEncoder(), TOK, LABEL, F.cross_entropy, steps=2)
    assert report.meta["num_heads_mismatch"] == {"encoder.layers.0.self_attn": 4, "encoder.layers.1.self_attn": 4}
    profile = attention.get_attention_profile()
    assert list(profile) == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert set(profile["encoder.layers.0.self_attn"]) == {"q", "k", "v", "imbalance"}
    assert attention.get_layer_metrics("encoder.layers.1.self_attn").heads == 4
    assert len(attention.get_transformer_metrics().blocks) == 2
    assert "attention" in report.sections and report.sections["attention"]["tables"]
