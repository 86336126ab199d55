"""Attention statistics without an attention module: transformers' registry, F.scaled_dot_product_attention,
record_attention, the agent plug-in, and the analyzers that use them (plus the flow/recurrent fixes)."""

from __future__ import annotations

import math
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradflow_agent
from gradflow_agent.integrations import attention as A
from gradflow_agent.stats.attention import (
    AttentionSample,
    AttentionStats,
    reference_statistics,
    sample_probs,
)
from gradflow_agent.stats.engine import transfer

from .conftest import config

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

LLAMA_NAMES = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def llama(impl: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        attn_implementation=impl)).eval()


def read(stats: AttentionStats) -> dict[str, np.ndarray]:
    return stats.finish(transfer([stats.device_parts()], stats.device)[0])


def numpy_reference(P: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """The documented definitions, written out on the host: P (b, h, l, S), valid (b, h|1, l, S)."""
    valid = np.broadcast_to(valid, P.shape)
    n = valid.sum(-1)
    use = n >= 2
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0)), 0.0).sum(-1) / np.log(np.maximum(n, 2))
    U = valid / np.maximum(n, 1)[..., None]
    C = ((P - U) * use[..., None]).transpose(1, 0, 2, 3).reshape(P.shape[1], -1)
    norms = np.linalg.norm(C, axis=1)
    keep = np.flatnonzero(norms > 1e-6 * norms.max())
    cos = [C[i] @ C[j] / norms[i] / norms[j] for a, i in enumerate(keep) for j in keep[a + 1:]]
    return {"attention_entropy": float(h[use].mean()), "attention_max_prob": float(P.max(-1)[use].mean()),
            "attention_head_diversity": float(np.clip(1 - np.mean(cos), 0, 1)) if cos else float("nan")}


def full_softmax(q, k, mask, scale, causal):
    """softmax(q k^T scale + mask) for every row (grouped-query heads repeated), and the valid keys."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    L, S = s.shape[-2:]
    valid = torch.ones(1, 1, L, S, dtype=torch.bool)
    if mask is not None:
        valid = valid & (mask if mask.dtype == torch.bool else mask > -1e30)
        if mask.dtype != torch.bool:
            s = s + torch.where(mask > -1e30, mask.double(), 0.0)
    if causal:
        valid = valid & torch.ones(L, S, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~valid, -math.inf), -1).nan_to_num(0.0), valid


# -- the statistics --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", ["none-causal", "bool", "additive", "position-bias"])
def test_sampled_rows_equal_the_full_softmax_of_the_same_rows(mask_kind):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hk, L, D = 3, 8, 2, 40, 8
    q, k = torch.randn(B, Hq, L, D, generator=g) * 2, torch.randn(B, Hk, L, D, generator=g) * 2
    keep = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    keep[0, ..., :5] = False  # left padding in the sampled sample
    bias = torch.randn(1, Hq, L, L, generator=g) if mask_kind == "position-bias" else None  # T5-style
    mask = {"none-causal": None, "bool": keep, "position-bias": None,
            "additive": torch.where(keep, 0.0, torch.finfo(torch.float32).min)}[mask_kind]
    sample = AttentionSample(heads=4, queries=16, batch=1)
    P, valid = sample_probs(q, k, mask, 0.3, is_causal=mask is None, bias=bias, sample=sample)
    full, fvalid = full_softmax(q, k, bias if bias is not None else mask, 0.3, mask is None)
    hi, qi = [0, 2, 4, 6], list(range(L - 1, -1, -3))[::-1]  # strided heads; queries strided from the last
    assert P.shape == (1, 4, len(qi), L)
    rows = full[:1][:, hi][:, :, qi]
    assert torch.allclose(P.double(), rows, atol=1e-6)
    vrows = fvalid.expand(B, Hq, L, L)[:1][:, hi][:, :, qi]
    assert torch.equal(valid.expand_as(vrows), vrows)
    ours = reference_statistics(P, valid)
    ref = numpy_reference(rows.numpy(), vrows.numpy())
    assert ours == pytest.approx(ref, abs=1e-6)
    assert 0.0 < ours["attention_entropy"] < 1.0 and 0.0 < ours["attention_head_diversity"] <= 1.0


def test_collapse_identical_heads_and_the_device_buffer():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 4, 12, 8, generator=g)
    stats = AttentionStats(["a"])
    stats.observe_qk("a", q, k, scale=1e-3)  # tiny logits: uniform attention
    dominant = 0.1 * k
    dominant[:, :, 0] = 10.0 * q.mean((0, 1, 2))  # one key matches every query
    stats.observe_qk("collapsed", q.abs() + 1.0, dominant.abs(), scale=1.0)
    stats.observe_qk("same", q[:, :1].expand(2, 4, 12, 8), k[:, :1].expand(2, 4, 12, 8))  # identical heads
    assert stats.layers == ["a", "collapsed", "same"] and stats.calls == 3
    out = read(stats)
    assert out["attention_entropy"][0] > 0.999 and out["attention_max_prob"][0] == pytest.approx(1 / 12, rel=1e-2)
    assert out["attention_max_prob"][1] > 0.99 and out["attention_entropy"][1] < 0.05
    assert out["attention_head_diversity"][2] == pytest.approx(0.0, abs=1e-6)
    assert stats.calls == 0 and float(stats.acc.abs().sum()) == 0.0  # the buffer starts again
    again = read(stats)  # an interval without calls keeps the last values
    assert np.array_equal(again["attention_entropy"], out["attention_entropy"])


# -- transformers' registry ------------------------------------------------------------------------------------
def _registry_state():
    return dict(vars(AttentionInterface)), dict(AttentionInterface._global_mapping), \
        dict(ALL_ATTENTION_FUNCTIONS._local_mapping)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_outputs_unchanged_and_statistics_equal_the_full_attention(impl):
    model = llama(impl)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 16, dtype=torch.long)
    am[0, :3] = 0  # padding in the sampled sample: the mask is a real tensor (float for eager, bool for sdpa)
    plain = model(input_ids=ids, attention_mask=am).logits
    before = _registry_state()
    handle = A.install(model)
    try:
        out = model(input_ids=ids, attention_mask=am).logits
        assert torch.equal(out, plain)  # bit-identical
        got = read(handle.stats)
        assert handle.stats.layers == LLAMA_NAMES
        # the same weights in eager give the full attention matrix of each layer (all 16 rows, 4 heads sampled)
        eager = llama("eager")
        attn = eager(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    finally:
        handle.remove()
    assert _registry_state() == before
    valid = torch.ones(16, 16, dtype=torch.bool).tril()[None, None] & (am[:1, None, None, :] > 0)
    for i, a in enumerate(attn):
        ref = numpy_reference(a[:1].detach().double().numpy(), valid.numpy())
        assert {k: v[i] for k, v in got.items()} == pytest.approx(ref, abs=1e-5)


def test_long_input_sample_is_close_to_the_full_matrix_and_collapse_shows():
    model = llama("eager")
    ids = torch.randint(0, 100, (1, 48), generator=torch.Generator().manual_seed(0))
    with A.install(model) as handle:
        attn = model(input_ids=ids, output_attentions=True).attentions
        got = read(handle.stats)
    valid = torch.ones(48, 48, dtype=torch.bool).tril()[None, None].numpy()
    for i, a in enumerate(attn):  # 16 of 48 query rows sampled
        full = numpy_reference(a.detach().double().numpy(), valid)
        assert got["attention_entropy"][i] == pytest.approx(full["attention_entropy"], abs=0.02)
        assert got["attention_max_prob"][i] == pytest.approx(full["attention_max_prob"], abs=0.05)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    with A.install(model) as handle:
        model(input_ids=ids)
        collapsed = read(handle.stats)
    assert (collapsed["attention_max_prob"] > 0.9).all() and (collapsed["attention_entropy"] < 0.2).all()
    assert (got["attention_entropy"] > 0.9).all()


def test_gpt2_and_bert_are_read_under_their_attention_modules():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                      attn_implementation="eager")).eval()
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100, attn_implementation="sdpa")).eval()
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].numpy()
    everywhere = np.ones((1, 1, 12, 12), dtype=bool)
    for model, names, valid in ((gpt2, ["transformer.h.0.attn", "transformer.h.1.attn"], causal),
                                (bert, ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"],
                                 everywhere)):
        plain = model(input_ids=ids)[0]
        with A.install(model) as handle:
            assert torch.equal(model(input_ids=ids)[0], plain)
            got = read(handle.stats)
        assert handle.stats.layers == names
        model.config._attn_implementation = "eager"  # the full matrix, same weights
        attn = model(input_ids=ids, output_attentions=True).attentions
        for i, a in enumerate(attn):
            ref = numpy_reference(a[:1].detach().double().numpy(), valid)
            assert {k: v[i] for k, v in got.items()} == pytest.approx(ref, abs=1e-5)


def test_a_registered_implementation_is_wrapped_and_other_models_pass_through():
    calls = []

    def custom(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("gradflow_test_custom", custom)
    try:
        model, other = llama("gradflow_test_custom"), llama("sdpa", seed=1)
        ids = torch.randint(0, 100, (1, 10))
        with A.install(model) as handle:
            model(input_ids=ids)
            other(input_ids=ids)  # not installed on: passes straight through
            assert ALL_ATTENTION_FUNCTIONS["gradflow_test_custom"].__wrapped_attention__ is custom
        assert handle.stats.layers == LLAMA_NAMES and handle.stats.calls == 2 and len(calls) == 2
        assert ALL_ATTENTION_FUNCTIONS["gradflow_test_custom"] is custom
    finally:
        del AttentionInterface._global_mapping["gradflow_test_custom"]


def test_remove_restores_everything_also_with_nested_installs():
    before = _registry_state()
    sdpa, softmax, tsoftmax = F.scaled_dot_product_attention, F.softmax, torch.softmax
    model = llama()
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    first = A.install(model, softmax=True)
    second = A.observe_sdpa(model)
    assert F.scaled_dot_product_attention is not sdpa and "softmax" in vars(torch.Tensor)
    assert ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None).__wrapped_attention__ is sdpa_attention_forward
    first.remove()
    assert F.scaled_dot_product_attention is not sdpa  # still needed by the second install
    assert _registry_state() == before and F.softmax is softmax and "softmax" not in vars(torch.Tensor)
    second.remove()
    second.remove()  # idempotent
    assert F.scaled_dot_product_attention is sdpa and torch.softmax is tsoftmax
    assert ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None) is sdpa_attention_forward
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert not A._HANDLES and not A._STATE.stack


# -- hand-written attention --------------------------------------------------------------------------------------
class SdpaBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] | None = []  # the test's own record of q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.seen is not None:
            self.seen.append((q.detach(), k.detach()))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1 if self.training else 0.0)
        return x + self.out(y.transpose(1, 2).reshape(B, T, D))


class SdpaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(SdpaBlock(), SdpaBlock())
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def test_hand_written_sdpa_is_read_under_the_innermost_module_and_outputs_are_unchanged():
    model = SdpaNet()
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    plain = model(x)  # dropout draws from the global generator: the statistics must not
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for b in model.blocks:
        b.seen.clear()
    with A.observe_sdpa(model) as handle:
        torch.manual_seed(5)
        out = model(x)
        out.sum().backward()
        q = torch.randn(1, 2, 5, 8)
        F.scaled_dot_product_attention(q, q, q)  # outside the model: not recorded
        got = read(handle.stats)
    assert torch.equal(out, plain) and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert handle.stats.layers == ["blocks.0", "blocks.1"]
    for i, b in enumerate(model.blocks):
        q, k = b.seen[0]
        full, valid = full_softmax(q, k, None, 1 / math.sqrt(8), True)
        qi = list(range(19, -1, -2))[::-1]
        ref = numpy_reference(full[:1, :, qi].numpy(), valid.expand(2, 4, 20, 20)[:1, :, qi].numpy())
        assert {k: v[i] for k, v in got.items()} == pytest.approx(ref, abs=1e-6)


def test_record_attention_inference_mode_and_failures():
    model = SdpaNet().eval()
    x = torch.randn(2, 8, 32)
    with A.install(model, registry=False) as handle:
        with torch.inference_mode():
            model(x)
        assert handle.stats.calls == 0  # not a training step: not measured
        q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
        A.record_attention("mine", q, k, mask=torch.ones(6, 6, dtype=torch.bool).tril())
        assert handle.stats.layers == ["mine"]
    A.record_attention("after", q, k)  # no install: a no-op

    class Broken:
        def observe(self, name, probs, valid):
            raise RuntimeError("a broken sink")

    plain = model(x)
    with A.observe_sdpa(model, Broken()) as handle:
        assert torch.equal(model(x), plain)  # never raised into the forward
    assert handle.errors.counts["attention"] == 2


def test_torch_compile_observes_in_an_island_and_keeps_the_outputs():
    torch._dynamo.reset()
    model = SdpaNet().eval()
    for b in model.blocks:
        b.seen = None
    x = torch.randn(2, 8, 32)
    plain = model(x)
    with A.observe_sdpa(model) as handle:
        out = torch.compile(model)(x)
        got = read(handle.stats)
    assert torch.allclose(out, plain, atol=1e-5)
    assert handle.stats.layers == ["blocks.0", "blocks.1"] and np.isfinite(got["attention_entropy"]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no host sync on the hot path")
def test_no_host_sync_in_the_hot_path_on_cuda():
    model = llama().cuda()
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    with A.install(model) as handle:
        model(input_ids=ids)  # first call: index tensors and buffer rows are created
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(input_ids=ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert np.isfinite(read(handle.stats)["attention_entropy"]).all()


# -- the agent plug-in -------------------------------------------------------------------------------------------
def test_plugin_exports_through_a_real_agent():
    model = llama().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    agent = gradflow_agent.attach(model, config(exporters={"prometheus": {"enabled": True, "port": 0,
                                                                          "addr": "127.0.0.1"}}), optimizer=opt)
    plugin = A.AttentionPlugin(model)
    agent.add_plugin(plugin)
    depths = []  # inside the observation, is the agent's clock running? (its overhead budget sees the time)
    observe = plugin.stats.observe
    plugin.stats.observe = lambda *a: (depths.append(getattr(agent.clock._local, "depth", 0)), observe(*a))[1]
    ids = torch.randint(0, 100, (2, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)
    snap = agent.snapshot()
    text = urllib.request.urlopen(agent.prometheus_url, timeout=5).read().decode()
    agent.detach()
    rows = {(r["name"], r["labels"]["layer"]): r["value"] for r in snap.to_dict()["extra"]}
    for name in LLAMA_NAMES:
        assert 0.9 < rows[("gradflow_attention_entropy_ratio", name)] <= 1.0
        assert 0.0 < rows[("gradflow_attention_max_prob_ratio", name)] < 0.5
        assert 0.0 <= rows[("gradflow_attention_head_diversity", name)] <= 1.0
    assert 'gradflow_attention_entropy_ratio{layer="model.layers.0.self_attn",rank="0",run="default"}' in text
    assert "# TYPE gradflow_attention_head_diversity gauge" in text
    assert plugin.handle.removed and not A._HANDLES and "attention" not in snap.errors
    assert depths and all(d >= 1 for d in depths[len(depths) // 3:])  # timed once bound (after step 1)


# -- the analyzers ------------------------------------------------------------------------------------------------
def test_transformer_analyzer_reads_functional_attention_and_says_when_there_is_none():
    from gradflow_agent.analyze import TransformerAnalyzer

    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    for impl in ("eager", "sdpa"):
        issues, st = TransformerAnalyzer(llama(impl).train()).analyze(
            lambda: {"input_ids": ids, "labels": ids}, lambda o: o.loss, steps=3)
        assert list(st.layers) == LLAMA_NAMES and st.notice == ""
        assert st.attention_entropy_mean > 0.9 and 0.5 < st.head_diversity <= 1.0
        assert st.rank_collapse_risk == "LOW" and [b.block for b in st.blocks] == ["model.layers.0", "model.layers.1"]
        assert {b.norm_placement for b in st.blocks} == {"pre-norm"}
        assert st.layers[LLAMA_NAMES[0]].heads == 4 and math.isfinite(st.layers[LLAMA_NAMES[0]].q_grad)
        assert not [i for i in issues if i.kind in ("low_attention_entropy", "low_head_diversity", "bottleneck")]

    class SoftmaxAttention(nn.Module):  # hand-written attention with functional softmax, no nn.Softmax
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.embed, self.qkv, self.head = nn.Embedding(50, 16), nn.Linear(16, 48), nn.Linear(16, 5)
            self.scale = scale

        def forward(self, tok: torch.Tensor) -> torch.Tensor:
            x = self.embed(tok)
            q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
            a = torch.softmax(self.scale * q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
            return self.head((a @ v).transpose(1, 2).reshape(x.shape).mean(1))

    tok, label = torch.randint(0, 50, (8, 10)), torch.randint(0, 5, (8,))
    _, st = TransformerAnalyzer(SoftmaxAttention()).analyze(lambda: tok, lambda o: F.cross_entropy(o, label), 2)
    assert list(st.layers) == ["(root)"] and st.layers["(root)"].heads == 2 and st.attention_entropy_mean > 0.8
    issues, st = TransformerAnalyzer(SoftmaxAttention(scale=100.0)).analyze(
        lambda: tok, lambda o: F.cross_entropy(o, label), 2)
    assert "low_attention_entropy" in {i.kind for i in issues}

    x = torch.randn(4, 12, 32)  # hand-written blocks calling F.scaled_dot_product_attention
    _, st = TransformerAnalyzer(SdpaNet()).analyze(lambda: x, lambda o: o.pow(2).mean(), steps=2)
    assert list(st.layers) == ["blocks.0", "blocks.1"] == [b.block for b in st.blocks]
    assert st.rank_collapse_risk == "LOW" and st.attention_entropy_mean > 0.8

    analyzer = TransformerAnalyzer(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)))
    _, st = analyzer.analyze(lambda: torch.randn(4, 8), lambda o: o.pow(2).mean(), steps=2)
    assert st.layers == {} and "no attention was measured" in st.notice
    assert st.rank_collapse_risk == "UNKNOWN" and "no attention was measured" in st.risk_reason
    assert analyzer.report.meta["notices"] == [st.notice]
    assert analyzer.report.sections["attention"]["summary"]["notice"] == st.notice


def test_no_bottleneck_on_rotary_embeddings_of_a_fresh_llama():
    from gradflow_agent.analyze import GradientFlowAnalyzer

    model = llama().train()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    analyzer = GradientFlowAnalyzer(model)
    issues = analyzer.analyze(lambda: {"input_ids": ids, "labels": ids}, lambda o: o.loss, steps=3)
    assert not [i for i in issues if i.kind == "bottleneck"], [str(i) for i in issues]
    rotary = analyzer.report.get_layer("model.rotary_emb")
    assert math.isnan(rotary.compression_ratio) and rotary.effective_rank_out > 0  # measured, never judged


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_jacobian_view_of_a_recurrent_layer_uses_the_recurrent_weight(cell):
    from gradflow_agent.analyze import GradientFlowAnalyzer

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = (nn.RNN if cell == "rnn" else nn.LSTM)(8, 8, batch_first=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model = Seq()
    with torch.no_grad():
        model.rnn.weight_ih_l0.copy_(torch.eye(8).repeat(model.rnn.weight_ih_l0.shape[0] // 8, 1) * 0.79)
        model.rnn.weight_hh_l0.copy_(torch.eye(8).repeat(model.rnn.weight_hh_l0.shape[0] // 8, 1) * 0.5)
        candidate = model.rnn.weight_hh_l0[16:24] if cell == "lstm" else model.rnn.weight_hh_l0  # LSTM: g block
        candidate.copy_(torch.diag(torch.linspace(0.1, 0.61, 8)))
    x = torch.randn(4, 6, 8)
    analyzer = GradientFlowAnalyzer(model, enable_jacobian=True)
    analyzer.analyze(lambda: x, lambda o: o.pow(2).mean(), steps=1)
    spectrum = analyzer.results["jacobian"]["rnn"]
    assert spectrum.shape == tuple(model.rnn.weight_hh_l0.shape)
    assert spectrum.spectral_radius == pytest.approx(0.61, rel=1e-5)


def test_the_config_key_turns_the_attention_plugin_on():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 6, 16)

    model = nn.Sequential(Attn(), nn.Linear(16, 1))
    agent = gradflow_agent.attach(model, {"exporters": {"prometheus": {"enabled": False}},
                                          "stats": {"attention": {"enabled": True}}})
    model(torch.randn(2, 6, 16)).sum().backward()
    snap = agent.snapshot()
    agent.detach()
    names = {m.name for m, _, _ in snap.extra}
    assert "gradflow_attention_entropy_ratio" in names, names


# -- the detector: attention_collapse on the attention layers ------------------------------------------------------
def _train_with_agent(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = gradflow_agent.attach(model, config(stats={"attention": {"enabled": True}}), optimizer=opt)
    start = agent.latest
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 100, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)
    snap = agent.snapshot()
    agent.detach()
    return start, snap


def _collapse(snap):
    return [(i.layer, i.severity) for i in snap.issues if i.kind == "attention_collapse"]


def test_collapsed_attention_of_a_tiny_llama_is_an_issue_and_a_healthy_one_is_not():
    model = llama().train()
    with torch.no_grad():  # queries and keys scaled so that every softmax row is one-hot
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(100.0)
            layer.self_attn.k_proj.weight.mul_(100.0)
    _, snap = _train_with_agent(model)
    assert _collapse(snap) == [(name, "critical") for name in LLAMA_NAMES]
    for name in LLAMA_NAMES:
        i = snap.layers.index(name)
        assert snap.layer_types[i] == "LlamaAttention" and snap.health[i] == 50.0
        assert snap.stats["attention_entropy"][i] < 0.02 and snap.stats["attention_max_prob"][i] > 0.99
    issue = next(i for i in snap.issues if i.kind == "attention_collapse")
    assert "attention entropy" in issue.message and issue.recommendation

    start, healthy = _train_with_agent(llama().train())
    assert _collapse(healthy) == []
    for name in LLAMA_NAMES:  # declared at attach (the layer list is fixed), unknown until measured
        i = start.layers.index(name)
        assert math.isnan(start.health[i]) and math.isnan(start.stats["attention_entropy"][i])
        j = healthy.layers.index(name)
        assert healthy.health[j] == 100.0 and healthy.stats["attention_entropy"][j] > 0.9
    assert start.layers == healthy.layers


def test_a_fresh_gpt2_is_not_flagged():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                      attn_implementation="sdpa")).train()
    _, snap = _train_with_agent(gpt2)
    assert _collapse(snap) == []
    assert all(snap.stats["attention_max_prob"][snap.layers.index(n)] < 0.5
               for n in ("transformer.h.0.attn", "transformer.h.1.attn"))
