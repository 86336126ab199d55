"""Parameter name -> component and layer group, across the naming conventions of common model families."""

from __future__ import annotations

import pytest
from torch import nn

from gradflow_agent.dynamics import COMPONENTS, ParameterChangeMetrics, ParameterDelta, component_of, layer_of
from gradflow_agent.dynamics.components import family_of, group

CASES = {
    # Llama / Mistral / Qwen
    "model.layers.3.self_attn.q_proj.weight": ("q_proj", "model.layers.3"),
    "model.layers.3.self_attn.o_proj.weight": ("o_proj", "model.layers.3"),
    "model.layers.3.mlp.gate_proj.weight": ("gate_proj", "model.layers.3"),
    "model.layers.3.post_attention_layernorm.weight": ("norm", "model.layers.3"),
    "model.embed_tokens.weight": ("embedding", "model.embed_tokens"),
    "lm_head.weight": ("head", "lm_head"),
    # GPT-2: attn.c_proj is the output projection, mlp.c_proj the down projection
    "transformer.h.0.attn.c_attn.weight": ("qkv_proj", "transformer.h.0"),
    "transformer.h.0.attn.c_proj.weight": ("o_proj", "transformer.h.0"),
    "transformer.h.0.mlp.c_fc.weight": ("up_proj", "transformer.h.0"),
    "transformer.h.0.mlp.c_proj.bias": ("down_proj", "transformer.h.0"),
    "transformer.ln_f.weight": ("norm", "transformer.ln_f"),
    # GPT-NeoX / Falcon
    "gpt_neox.layers.1.attention.query_key_value.weight": ("qkv_proj", "gpt_neox.layers.1"),
    "gpt_neox.layers.1.attention.dense.weight": ("o_proj", "gpt_neox.layers.1"),
    "gpt_neox.layers.1.mlp.dense_4h_to_h.weight": ("down_proj", "gpt_neox.layers.1"),
    # BERT
    "bert.encoder.layer.2.attention.self.value.weight": ("v_proj", "bert.encoder.layer.2"),
    "bert.encoder.layer.2.attention.output.dense.weight": ("o_proj", "bert.encoder.layer.2"),
    "bert.encoder.layer.2.intermediate.dense.weight": ("up_proj", "bert.encoder.layer.2"),
    "bert.encoder.layer.2.output.dense.weight": ("down_proj", "bert.encoder.layer.2"),
    "bert.encoder.layer.2.output.LayerNorm.bias": ("norm", "bert.encoder.layer.2"),
    # T5, original Llama checkpoints, Mixtral
    "encoder.block.0.layer.0.SelfAttention.k.weight": ("k_proj", "encoder.block.0"),
    "encoder.block.0.layer.1.DenseReluDense.wo.weight": ("down_proj", "encoder.block.0"),
    "layers.5.attention.wo.weight": ("o_proj", "layers.5"),
    "layers.5.feed_forward.w3.weight": ("up_proj", "layers.5"),
    "model.layers.0.block_sparse_moe.experts.7.w1.weight": ("gate_proj", "model.layers.0"),
    "model.layers.0.block_sparse_moe.gate.weight": ("router", "model.layers.0"),
    # torch.nn.Transformer
    "encoder.layers.0.self_attn.in_proj_weight": ("qkv_proj", "encoder.layers.0"),
    "encoder.layers.0.linear2.weight": ("down_proj", "encoder.layers.0"),
    # unknown
    "0.weight": ("other", "0"),
    "scale": ("other", "(root)"),
}


@pytest.mark.parametrize(("name", "expected"), CASES.items())
def test_component_and_layer_of_known_names(name, expected):
    assert (component_of(name), layer_of(name)) == expected
    assert component_of(name) in COMPONENTS


def test_families_split_attention_and_mlp():
    assert {family_of(c) for c in ("q_proj", "qkv_proj", "o_proj")} == {"attention"}
    assert {family_of(c) for c in ("gate_proj", "up_proj", "down_proj", "router")} == {"mlp"}


def test_layer_groups_are_capped_into_other():
    names = [f"h.{i}.w" for i in range(10)]
    groups = group(names, layer_of, max_groups=4)
    assert list(groups) == ["h.0", "h.1", "h.2", "other"] and groups["other"] == names[3:]
    assert list(group(names[:4], layer_of, max_groups=4)) == ["h.0", "h.1", "h.2", "h.3"]  # no merge when it fits


def test_per_layer_series_respect_max_layers():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    delta = ParameterDelta.from_tensors({n: p.detach() for n, p in model.named_parameters()})
    out = ParameterChangeMetrics(thresholds=(0.1,), per_layer=True, max_layers=3).compute(delta=delta)
    layers = {k.split("/")[2] for k in out if k.startswith("param_change/layer/")}
    assert layers == {"0", "1", "other"}
