"""Parameter name -> component (q_proj, down_proj, ...) and -> layer group, for bounded per-group series.

Components form a fixed vocabulary (COMPONENTS), recognised from the naming conventions of Llama/Mistral/
Qwen, GPT-2, GPT-NeoX/Falcon, BERT/RoBERTa, T5, OPT/BART, Mixtral, Phi, the original Llama checkpoint and
`torch.nn.Transformer*`; anything else is "other". A layer group is the repeated block a parameter belongs
to ("model.layers.3", from the first numeric path element) or, outside blocks, its owning module
("model.embed_tokens", "lm_head").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

ATTENTION = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "gate_up_proj", "down_proj", "router")
COMPONENTS = (*ATTENTION, *MLP, "embedding", "head", "norm", "other")

_EXACT = {
    "q_proj": "q_proj", "query": "q_proj", "wq": "q_proj", "to_q": "q_proj", "q_lin": "q_proj", "q": "q_proj",
    "k_proj": "k_proj", "key": "k_proj", "wk": "k_proj", "to_k": "k_proj", "k_lin": "k_proj", "k": "k_proj",
    "v_proj": "v_proj", "value": "v_proj", "wv": "v_proj", "to_v": "v_proj", "v_lin": "v_proj", "v": "v_proj",
    "o_proj": "o_proj", "out_proj": "o_proj", "to_out": "o_proj", "out_lin": "o_proj", "o": "o_proj",
    "qkv_proj": "qkv_proj", "c_attn": "qkv_proj", "query_key_value": "qkv_proj", "wqkv": "qkv_proj",
    "qkv": "qkv_proj", "in_proj": "qkv_proj", "in_proj_weight": "qkv_proj", "in_proj_bias": "qkv_proj",
    "gate_proj": "gate_proj", "w1": "gate_proj", "wi_0": "gate_proj",
    "up_proj": "up_proj", "w3": "up_proj", "c_fc": "up_proj", "fc1": "up_proj", "dense_h_to_4h": "up_proj",
    "wi_1": "up_proj", "wi": "up_proj", "lin1": "up_proj", "linear1": "up_proj", "fc_in": "up_proj",
    "gate_up_proj": "gate_up_proj",
    "down_proj": "down_proj", "w2": "down_proj", "fc2": "down_proj", "dense_4h_to_h": "down_proj",
    "lin2": "down_proj", "linear2": "down_proj", "fc_out": "down_proj",
    "router": "router",
    "embed_tokens": "embedding", "wte": "embedding", "wpe": "embedding", "word_embeddings": "embedding",
    "position_embeddings": "embedding", "token_type_embeddings": "embedding", "tok_embeddings": "embedding",
    "embed_positions": "embedding", "embed_in": "embedding", "shared": "embedding", "embedding": "embedding",
    "lm_head": "head", "embed_out": "head", "classifier": "head", "score": "head", "cls": "head",
}
_NORM = re.compile(r"(^|_)(ln|norm|layernorm|layer_norm|rmsnorm)(_?\w*)?$|norm\d*$", re.IGNORECASE)
_ATTN = re.compile(r"attn|attention", re.IGNORECASE)


def component_of(name: str) -> str:
    """The component of a parameter, from its qualified name; "other" when not recognised."""
    parts = name.split(".")
    leaf_param = parts[-1]
    mods = [p for p in parts[:-1] if not p.isdigit()]
    if leaf_param in _EXACT and leaf_param.startswith("in_proj"):
        return _EXACT[leaf_param]
    if not mods:
        return "other"
    leaf = mods[-1]
    parent = mods[-2] if len(mods) > 1 else ""
    in_attn = any(_ATTN.search(m) for m in mods[:-1])
    low = leaf.lower()
    if _NORM.search(low):
        return "norm"
    if low == "c_proj":  # GPT-2: attn.c_proj is the output projection, mlp.c_proj the down projection
        return "o_proj" if in_attn else "down_proj"
    if low == "wo":  # original Llama attention.wo vs T5 DenseReluDense.wo
        return "o_proj" if in_attn else "down_proj"
    if low == "dense":  # BERT: attention.output.dense / intermediate.dense / output.dense; NeoX attention.dense
        if in_attn:
            return "o_proj"
        if parent == "intermediate":
            return "up_proj"
        if parent == "output":
            return "down_proj"
        return "other"
    if low == "gate":  # MoE router (Mixtral block_sparse_moe.gate, Qwen-MoE mlp.gate)
        return "router"
    if low == "output" and len(mods) == 1:  # original Llama's top-level output head
        return "head"
    return _EXACT.get(low, "other")


def family_of(component: str) -> str:
    """attention | mlp | embedding | head | norm | other."""
    if component in ATTENTION:
        return "attention"
    if component in MLP:
        return "mlp"
    return component


def layer_of(name: str) -> str:
    """The repeated block holding a parameter ("model.layers.3"), else its owning module, else "(root)"."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or "(root)"


def group(names: Iterable[str], key: Callable[[str], str], max_groups: int | None = None,
          overflow: str = "other") -> dict[str, list[str]]:
    """Names grouped by key, in first-seen order. With more than `max_groups` groups, the first
    `max_groups - 1` are kept and the rest merge into `overflow` (bounded label cardinality)."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(key(n), []).append(n)
    if max_groups is None or len(out) <= max_groups:
        return out
    kept: dict[str, list[str]] = {}
    for i, (g, members) in enumerate(out.items()):
        target = g if i < max_groups - 1 and g != overflow else overflow
        kept.setdefault(target, []).extend(members)
    return kept
