"""TransformerAnalyzer: attention patterns, Q/K/V gradient balance, residual stream, FFN bottlenecks.

Attention maps come through forward hooks: an nn.MultiheadAttention gets a forward pre-hook that asks for
per-head weights (need_weights=True, average_attn_weights=False; same outputs), and its forward hook reads
them; an nn.Softmax layer whose output is (batch, heads, queries, keys) or (batch, queries, keys) is read
as an attention map too (custom attention). Functional attention, with no module whose output is the
map, is read through `gradflow_agent.integrations.attention` (the statistics of the live AttentionPlugin):
transformers' attention functions (eager, sdpa and any registered one: Llama, GPT-2, BERT, Qwen, ... under
the attention module's name, `model.layers.0.self_attn`), `F.scaled_dot_product_attention` calls and
attention-shaped softmax calls made inside a module; the map is recomputed from the call's query, key and
mask on every head x up to 64 query positions x up to 4 samples (never the full matrix of a fused kernel).
For a map A with valid positions V (from the attention mask, the key-padding mask or is_causal; for
softmax outputs, the positions non-zero somewhere in the batch), each row i having n_i valid keys:

- entropy (normalised) = mean over rows with n_i >= 2 of -sum_j A_ij ln A_ij / ln n_i, per head, in [0, 1];
- sparsity = share of valid entries with A_ij < 0.1 / n_i (less than a tenth of the uniform share);
- sink (attention bottleneck) = max over keys j of the mean over rows of A_ij, per head: the share of all
  attention that flows into the single most attended position;
- head diversity = 1 - mean over head pairs of cos(A_h - U, A_h' - U), U the uniform map over V, clipped to
  [0, 1]: 0 = identical heads, ~1 = unrelated heads (uniform, pattern-free heads are left out);
- Q/K/V gradient balance = max / min of the mean L2 norms of the gradients of the query, key and value
  projection weights (in_proj_weight split in three, or q/k/v-named Linear layers);
- residual stream, per block (the module holding an attention layer: its parent, or the closest ancestor
  with a feed-forward part, e.g. BERT's layer around `attention.self`; the attention module itself when
  its parent is a plain Sequential/ModuleList; for functional attention read from the second step on):
  token residual
  res(X) = mean over samples ||X - 1 mean_t(X_t)||_F / ||X||_F (0 = every token identical) and the mean
  L2 norm of dL/d(block output). rank-collapse ratio = res(last block output) / res(first block input):
  risk HIGH below 0.1, MEDIUM below 0.3, LOW otherwise (UNKNOWN without blocks). residual gradient ratio =
  gradient norm at the first block's output / at the last block's output;
- FFN: the first and last Linear of a block outside its attention: compression = effective rank of the FFN
  input / effective rank of its hidden activation (the last Linear's input); dead hidden units = share of
  hidden units never > 0 over the analysis;
- norm placement: `norm_first` when the block has it; otherwise pre-norm if a LayerNorm (or RMSNorm) of the
  block runs before its attention, post-norm if they all run after it.

When no attention at all was measured the result says so (`notice`, also in the report's meta["notices"]
and the section), and rank_collapse_risk is UNKNOWN with its `risk_reason`: never a silent NaN.

Issues: LOW_ATTENTION_ENTROPY (entropy < min_entropy_threshold, HIGH below half of it), LOW_HEAD_DIVERSITY
(< min_diversity_threshold), ATTN_BOTTLENECK (sink > sink_threshold), RANK_COLLAPSE (risk MEDIUM/HIGH),
QKV_IMBALANCE (> qkv_imbalance_threshold), RESIDUAL_DECAY (residual gradient ratio < residual_decay_threshold),
FFN_BOTTLENECK (compression >= bottleneck_ratio or dead hidden units > ffn_dead_threshold).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..integrations.attention import AttentionHandle, install
from ..report.flow_report import FlowReport, section, table
from ..stats.attention import AttentionSample
from .base import FlowIssue, FlowThresholds, IssueSeverity, IssueType, contract_call, jsonable, make_issue
from .core import FlowEngine
from .engine import AnalysisRun, Collector, Extension, ExtensionResult, batches_from
from .metrics import FlowMetrics

log = logging.getLogger("gradflow_agent")

# Functional attention (transformers' registry, F.scaled_dot_product_attention, attention-shaped softmax) is
# recomputed on these rows of each call: every head, up to 64 query positions of up to 4 samples.
ANALYZER_SAMPLE = AttentionSample(heads=None, queries=64, batch=4)
NO_ATTENTION = ("no attention was measured: the model has no nn.MultiheadAttention or nn.Softmax layer, and no "
                "transformers attention function, F.scaled_dot_product_attention or attention-shaped softmax call "
                "ran inside it; attention entropy, sparsity and head diversity are unknown")

_QKV = {"q": re.compile(r"(^|[._])(q|query|q_proj|to_q|wq|q_lin)$"),
        "k": re.compile(r"(^|[._])(k|key|k_proj|to_k|wk|k_lin)$"),
        "v": re.compile(r"(^|[._])(v|value|v_proj|to_v|wv|v_lin)$")}


# -- pure measurements on one attention map (B, H, L, S) ------------------------------------------------------------
def _valid_rows(A: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = valid.sum(-1).double()  # (B|1, H|1, L)
    return n, n >= 2


def attention_entropy_t(A: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Normalised entropy per head (see the module docstring), on A's device (no host read)."""
    A = A.double()
    n, rows = _valid_rows(A, valid)
    h = -(torch.where(A > 0, A * A.clamp_min(1e-300).log(), 0.0)).sum(-1)
    norm = torch.where(rows, h / n.clamp_min(2).log(), float("nan"))
    norm = norm.expand(A.shape[:-1])
    return torch.nanmean(norm.permute(1, 0, 2).reshape(A.shape[1], -1), dim=1)


def attention_sparsity_t(A: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Share of valid entries below a tenth of the uniform share, per head (on the device)."""
    A = A.double()
    n, rows = _valid_rows(A, valid)
    share = 0.1 / n.clamp_min(1).unsqueeze(-1)
    small = torch.lt(A, share) & valid & rows.unsqueeze(-1)
    counted = (valid & rows.unsqueeze(-1)).expand(A.shape)
    num = small.expand(A.shape).double().sum((0, 2, 3))
    den = counted.double().sum((0, 2, 3)).clamp_min(1)
    return num / den


def attention_sink_t(A: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per head: the largest mean share of attention any single key position receives (on the device)."""
    A = A.double()
    _, rows = _valid_rows(A, valid)
    w = rows.expand(A.shape[:-1]).double().unsqueeze(-1)
    col = (A * w).sum((0, 2)) / w.sum((0, 2)).clamp_min(1)  # (H, S)
    return col.max(-1).values


def head_diversity_t(A: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - mean pairwise cosine of the heads' deviations from uniform attention, clipped to [0, 1] (a 0-dim
    tensor on the device; NaN with fewer than two patterned heads)."""
    A = A.double()
    nan = torch.full((), float("nan"), dtype=torch.float64, device=A.device)
    if A.shape[1] < 2:
        return nan
    n = valid.sum(-1, keepdim=True).double().clamp_min(1)
    U = valid.double() / n
    C = (A - U).transpose(0, 1).reshape(A.shape[1], -1)  # (H, B*L*S)
    norms = C.norm(dim=1)
    keep = norms > 1e-6 * norms.max().clamp_min(1e-300)
    C = C / norms.clamp_min(1e-300)[:, None]
    cos = C @ C.T
    iu = torch.triu_indices(len(C), len(C), 1, device=C.device)
    w = (keep[iu[0]] & keep[iu[1]]).double()
    mean = (cos[iu[0], iu[1]] * w).sum() / w.sum().clamp_min(1)
    return torch.where(w.sum() > 0, (1.0 - mean).clamp(0.0, 1.0), nan)


def token_residual_t(x: torch.Tensor, token_dim: int = 1) -> torch.Tensor:
    """mean over samples of ||X - mean over tokens||_F / ||X||_F for X the (tokens, features) slice of a
    sample (a 0-dim tensor on the device; NaN when not a (batch, tokens, features) tensor)."""
    x = x.detach().double()
    if x.ndim != 3 or x.shape[token_dim] < 2:
        return torch.full((), float("nan"), dtype=torch.float64, device=x.device)
    if token_dim != 1:
        x = x.transpose(0, 1)
    centred = x - x.mean(1, keepdim=True)
    num = centred.flatten(1).norm(dim=1)
    den = x.flatten(1).norm(dim=1).clamp_min(1e-300)
    return (num / den).mean()


def attention_entropy(A: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Normalised entropy per head (see the module docstring)."""
    return attention_entropy_t(A, valid).cpu().numpy()


def attention_sparsity(A: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Share of valid entries below a tenth of the uniform share, per head."""
    return attention_sparsity_t(A, valid).cpu().numpy()


def attention_sink(A: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Per head: the largest mean share of attention any single key position receives."""
    return attention_sink_t(A, valid).cpu().numpy()


def head_diversity(A: torch.Tensor, valid: torch.Tensor) -> float:
    """1 - mean pairwise cosine of the heads' deviations from uniform attention, clipped to [0, 1]."""
    return float(head_diversity_t(A, valid))


def token_residual(x: torch.Tensor, token_dim: int = 1) -> float:
    """mean over samples of ||X - mean over tokens||_F / ||X||_F for X the (tokens, features) slice of a sample."""
    return float(token_residual_t(x, token_dim))


def _host(values: list[torch.Tensor]) -> list[Any]:
    """Device tensors collected during the passes, read in one transfer after them (numpy rows / floats)."""
    if not values:
        return []
    flat = torch.cat([v.detach().double().reshape(-1).to(values[0].device) for v in values]).cpu().numpy()
    out, k = [], 0
    for v in values:
        n = v.numel()
        out.append(flat[k:k + n].reshape(v.shape) if v.ndim else float(flat[k]))
        k += n
    return out


def rank_collapse_risk(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "UNKNOWN"
    return "HIGH" if ratio < 0.1 else ("MEDIUM" if ratio < 0.3 else "LOW")


def _mha_valid(module: nn.MultiheadAttention, kwargs: dict[str, Any], A: torch.Tensor) -> torch.Tensor:
    """Valid (query, key) positions of an MHA call from its masks, shaped to broadcast against A (B, H, L, S)."""
    B, _, L, S = A.shape
    valid = torch.ones(1, 1, L, S, dtype=torch.bool, device=A.device)
    mask = kwargs.get("attn_mask")
    if mask is None and kwargs.get("is_causal"):
        valid = valid & torch.ones(L, S, dtype=torch.bool, device=A.device).tril()
    elif mask is not None:
        m = ~mask if mask.dtype == torch.bool else torch.isfinite(mask) & (mask > -1e30)
        m = m.reshape(-1, *m.shape[-2:])
        valid = valid & (m.reshape(B, -1, L, S) if m.shape[0] == B * A.shape[1] else m.unsqueeze(0)[:, :1])
    kpm = kwargs.get("key_padding_mask")
    if kpm is not None:
        k = ~kpm if kpm.dtype == torch.bool else torch.isfinite(kpm) & (kpm > -1e30)
        valid = valid & k.reshape(B, 1, 1, S)
    return valid


@dataclass
class _HeadAcc:
    # device tensors, appended inside the hooks and read once after the passes (`_host`)
    entropy: list[torch.Tensor] = field(default_factory=list)
    sparsity: list[torch.Tensor] = field(default_factory=list)
    sink: list[torch.Tensor] = field(default_factory=list)
    diversity: list[torch.Tensor] = field(default_factory=list)
    heads: int = 0
    seq: int = 0


@dataclass(frozen=True)
class AttentionLayerMetrics:
    layer: str
    heads: int
    sequence_length: int
    entropy_per_head: tuple[float, ...]
    entropy_mean: float
    sparsity: float
    sink: float
    head_diversity: float
    q_grad: float = float("nan")
    k_grad: float = float("nan")
    v_grad: float = float("nan")

    @property
    def qkv_imbalance(self) -> float:
        vals = [v for v in (self.q_grad, self.k_grad, self.v_grad) if math.isfinite(v)]
        if len(vals) < 3:
            return float("nan")
        return max(vals) / min(vals) if min(vals) > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = jsonable(self.__dict__)
        d["qkv_imbalance"] = jsonable(self.qkv_imbalance)
        return d


@dataclass(frozen=True)
class BlockMetrics:
    block: str
    depth: int
    token_residual_in: float
    token_residual_out: float
    output_grad_norm: float
    norm_placement: str
    ffn_in: str = ""
    ffn_out: str = ""
    ffn_compression: float = float("nan")
    ffn_dead_ratio: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


@dataclass(frozen=True)
class AttentionStats:
    """Seed 003's `attn_stats`, plus per-layer and per-block detail."""

    attention_entropy_mean: float
    attention_sparsity: float
    head_diversity: float
    rank_collapse_risk: str
    rank_collapse_ratio: float
    residual_gradient_ratio: float
    layers: dict[str, AttentionLayerMetrics] = field(default_factory=dict)
    blocks: list[BlockMetrics] = field(default_factory=list)
    notice: str = ""  # what could not be measured, and why (empty when every attention layer was read)
    risk_reason: str = ""  # why rank_collapse_risk is UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        return jsonable({k: v for k, v in self.__dict__.items() if k not in ("layers", "blocks")} |
                        {"layers": {k: v.to_dict() for k, v in self.layers.items()},
                         "blocks": [b.to_dict() for b in self.blocks]})


def _is_norm(module: nn.Module) -> bool:
    rms = getattr(nn, "RMSNorm", nn.LayerNorm)
    return isinstance(module, (nn.LayerNorm, rms)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: a Linear with its weight transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _branch(block: nn.Module, attn_mod: nn.Module) -> nn.Module:
    """The child of `block` that holds the attention module (BERT: `attention` around `attention.self`)."""
    for child in block.children():
        if any(m is attn_mod for m in child.modules()):
            return child
    return attn_mod


def _outside_linears(block: nn.Module, attn_mod: nn.Module) -> list[nn.Module]:
    inside = {id(m) for m in _branch(block, attn_mod).modules()}
    return [m for m in block.modules() if _is_linear(m) and id(m) not in inside]


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def block_of(model: nn.Module, attn_name: str) -> str:
    """The block (residual unit) of an attention layer: the closest ancestor below the root, not a plain
    container, holding a feed-forward part (two Linear layers outside the attention branch), else its
    parent; when the parent is a plain container (a stack of blocks), the attention module itself (it holds
    its residual: a hand-written block calling sdpa); "" at the top level."""
    if "." not in attn_name:
        return ""
    attn_mod = model.get_submodule(attn_name)
    parts = attn_name.split(".")
    parent = ".".join(parts[:-1])
    for k in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:k])
        mod = model.get_submodule(name)
        if not isinstance(mod, _CONTAINERS) and len(_outside_linears(mod, attn_mod)) >= 2:
            return name
    return attn_name if isinstance(model.get_submodule(parent), _CONTAINERS) else parent


class AttentionCollector(Collector):
    """Attention maps (MHA and softmax layers, and functional attention: transformers' attention functions,
    F.scaled_dot_product_attention, attention-shaped softmax calls, read through integrations/attention.py),
    Q/K/V gradients, block streams, FFN hidden units."""

    def __init__(self, attention_layers: list[str] | None = None) -> None:
        self.only = attention_layers
        self.acc: dict[str, _HeadAcc] = {}
        self.qkv: dict[str, dict[str, list[torch.Tensor]]] = {}  # device norms, read after the passes
        self._qkv_params: dict[str, dict[str, tuple[torch.Tensor, slice | None]]] = {}
        self.blocks: dict[str, dict[str, Any]] = {}
        self._kwargs: dict[int, dict[str, Any]] = {}
        self.functional: list[str] = []  # attention layers seen through a function call, in call order
        self._pending: list[str] = []  # functional layers whose block is registered at the next step
        self._handle: AttentionHandle | None = None
        self._run: AnalysisRun | None = None
        self._names: dict[nn.Module, str] = {}

    @property
    def unsupported(self) -> dict[str, str]:
        return dict(self._handle.unsupported) if self._handle is not None else {}

    # -- registration -----------------------------------------------------------------------------------------
    def attach(self, run: AnalysisRun) -> None:
        model = run.model
        names = {m: n for n, m in model.named_modules()}
        self._run, self._names = run, names
        attn_names = []
        for layer in run.layers:
            mod = layer.module
            if self.only is not None and layer.name not in self.only:
                continue
            if isinstance(mod, nn.MultiheadAttention):
                run.probes.pre(mod, self._mha_pre, name="attention-pre", with_kwargs=True)
                run.probes.forward(mod, self._mha_hook(layer.name), name="attention-probe")
                self._qkv_params[layer.name] = self._mha_qkv(mod)
                attn_names.append(layer.name)
            elif isinstance(mod, nn.Softmax):
                run.probes.forward(mod, self._softmax_hook(layer.name), name="softmax-probe")
                attn_names.append(layer.name)
                parent = model.get_submodule(layer.name.rsplit(".", 1)[0]) if "." in layer.name else model
                self._qkv_params[layer.name] = self._named_qkv(parent, set())  # q/k/v Linear siblings, by name
        for name in attn_names:
            self._block_for(run, name)
        # functional attention: every module path above is excluded (read by its own hooks already)
        handle = install(model, self, softmax=True, sample=ANALYZER_SAMPLE, exclude=attn_names,
                         active=lambda: run.probes.enabled, errors=run.agent.errors)
        self._handle = handle
        run.probes._handles.append(handle)  # removed with the probes, whatever happens to the run

    def _block_for(self, run: AnalysisRun, attn_name: str) -> None:
        parent = block_of(run.model, attn_name)
        if not parent or parent in self.blocks:
            return
        block = run.model.get_submodule(parent)
        if block is run.model:
            return
        self._add_block(run, parent, block, self._names, attn_name)

    def observe(self, name: str, probs: torch.Tensor, valid: torch.Tensor) -> None:
        """A functional attention call, sampled (every head, up to 64 queries of 4 samples)."""
        if self.only is not None and name not in self.only:
            return
        if name not in self.acc:
            self.functional.append(name)
            self._pending.append(name)
            if name != "(root)" and self._run is not None:
                self._qkv_params[name] = self._named_qkv(self._run.model.get_submodule(name), set())
        self._record(name, probs, valid)

    def begin_step(self, run: AnalysisRun) -> None:
        # blocks of layers found in the previous step: registering them mid-forward would see half a call
        pending, self._pending = self._pending, []
        for name in pending:
            if name != "(root)":
                self._block_for(run, name)

    def _add_block(self, run: AnalysisRun, name: str, block: nn.Module, names: dict[nn.Module, str],
                   attn_name: str) -> None:
        attn_mod = run.model.get_submodule(attn_name)
        batch_first = bool(getattr(attn_mod, "batch_first", True))
        linears = _outside_linears(block, attn_mod)
        info: dict[str, Any] = {"res_in": [], "res_out": [], "grad": [], "calls": [], "order": None,
                                "token_dim": 1 if batch_first else 0, "ffn_in": "", "ffn_out": "",
                                "fired": None, "norm_first": getattr(block, "norm_first", None),
                                "qkv_block": {}}
        self.blocks[name] = info
        if attn_name not in self._qkv_params or not self._qkv_params[attn_name]:
            self._qkv_params[attn_name] = self._named_qkv(block, set())
        run.probes.forward(block, self._block_hook(name, run), name="block-probe", with_kwargs=True)
        for child in block.modules():
            if _is_norm(child) or child is attn_mod:
                kind = "attn" if child is attn_mod else "norm"
                run.probes.forward(child, lambda m, a, o, kind=kind, info=info: info["calls"].append(kind),
                                   name="block-order")
        if len(linears) >= 2:
            info["ffn_in"], info["ffn_out"] = names[linears[0]], names[linears[-1]]
            run.probes.forward(linears[-1], self._ffn_hook(info), name="ffn-probe")

    @staticmethod
    def _mha_qkv(mod: nn.MultiheadAttention) -> dict[str, tuple[torch.Tensor, slice | None]]:
        if mod.in_proj_weight is not None:
            E = mod.embed_dim
            return {"q": (mod.in_proj_weight, slice(0, E)), "k": (mod.in_proj_weight, slice(E, 2 * E)),
                    "v": (mod.in_proj_weight, slice(2 * E, 3 * E))}
        return {"q": (mod.q_proj_weight, None), "k": (mod.k_proj_weight, None), "v": (mod.v_proj_weight, None)}

    @staticmethod
    def _named_qkv(block: nn.Module, skip: set[int]) -> dict[str, tuple[torch.Tensor, slice | None]]:
        out = {}
        for n, m in block.named_modules():
            if isinstance(m, nn.Linear):
                for key, pat in _QKV.items():
                    if pat.search(n) and key not in out:
                        out[key] = (m.weight, None)
        return out if len(out) == 3 else {}

    # -- hooks ------------------------------------------------------------------------------------------------
    def _mha_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = dict(kwargs)
        if len(args) > 4:  # need_weights given positionally
            args = (*args[:4], True, *args[5:])
        else:
            kwargs["need_weights"] = True
        if len(args) > 6:
            args = (*args[:6], False, *args[7:])
        else:
            kwargs["average_attn_weights"] = False
        self._kwargs[id(module)] = {k: kwargs.get(k) for k in ("attn_mask", "key_padding_mask", "is_causal")}
        if len(args) > 3:
            self._kwargs[id(module)]["key_padding_mask"] = args[3]
        return args, kwargs

    def _mha_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor)):
                return
            A = output[1].detach()
            if A.ndim == 3:  # unbatched (H, L, S)
                A = A.unsqueeze(0)
            valid = _mha_valid(module, self._kwargs.get(id(module), {}), A)
            self._record(name, A, valid)
        return hook

    def _softmax_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or output.ndim not in (3, 4) \
                    or module.dim not in (-1, output.ndim - 1):
                return
            A = output.detach()
            if A.ndim == 3:
                A = A.unsqueeze(1)
            valid = (A > 0).any(0, keepdim=True).any(1, keepdim=True)
            self._record(name, A, valid)
        return hook

    def _record(self, name: str, A: torch.Tensor, valid: torch.Tensor) -> None:
        acc = self.acc.setdefault(name, _HeadAcc())
        acc.heads, acc.seq = A.shape[1], A.shape[-1]
        acc.entropy.append(attention_entropy_t(A, valid))
        acc.sparsity.append(attention_sparsity_t(A, valid))
        acc.sink.append(attention_sink_t(A, valid))
        acc.diversity.append(head_diversity_t(A, valid))

    def _block_hook(self, name: str, run: AnalysisRun) -> Callable[..., None]:
        info = self.blocks[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            x = x if isinstance(x, torch.Tensor) else None
            y = output[0] if isinstance(output, tuple) else output
            if info["order"] is None:
                info["order"] = len([b for b in self.blocks.values() if b["order"] is not None])
            if x is not None:
                info["res_in"].append(token_residual_t(x, info["token_dim"]))
            if isinstance(y, torch.Tensor):
                info["res_out"].append(token_residual_t(y, info["token_dim"]))
                run.probes.on_grad(y, lambda g: info["grad"].append(torch.linalg.vector_norm(g.double())))
        return hook

    @staticmethod
    def _ffn_hook(info: dict[str, Any]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            h = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if h is None or h.ndim < 2:
                return
            fired = (h.detach().reshape(-1, h.shape[-1]) > 0).any(0)
            info["fired"] = fired if info["fired"] is None else (info["fired"] | fired)
        return hook

    def after_backward(self, run: AnalysisRun, output: Any, loss: torch.Tensor) -> None:
        for name, parts in self._qkv_params.items():
            if not parts:
                continue
            rec = self.qkv.setdefault(name, {"q": [], "k": [], "v": []})
            for key, (w, rows) in parts.items():
                g = w.grad
                if g is None:
                    continue
                g = g[rows] if rows is not None else g
                rec[key].append(torch.linalg.vector_norm(g.detach().double()))  # read after the passes


class TransformerExtension(Extension):
    """Attention, residual-stream and FFN analysis; its thresholds are FlowThresholds' attention ones."""

    name = "attention"

    def __init__(self, attention_layers: list[str] | None = None) -> None:
        self.collector = AttentionCollector(attention_layers)

    def collectors(self) -> list[Collector]:
        return [self.collector]

    def stats(self, metrics: list[FlowMetrics]) -> AttentionStats:
        c = self.collector
        layers: dict[str, AttentionLayerMetrics] = {}
        for name, acc in c.acc.items():
            entropy = _host(acc.entropy)
            ent = np.nanmean(np.stack(entropy), axis=0) if entropy else np.array([])
            q = {k: _host(v) for k, v in c.qkv.get(name, {}).items()}
            layers[name] = AttentionLayerMetrics(
                name, acc.heads, acc.seq, tuple(float(v) for v in ent), _mean(ent),
                _mean([float(np.mean(s)) for s in _host(acc.sparsity)]),
                _mean([float(np.max(s)) for s in _host(acc.sink)]),
                _mean(_host(acc.diversity)), _mean(q.get("q", [])), _mean(q.get("k", [])), _mean(q.get("v", [])))
        by_name = {m.layer: m for m in metrics}
        blocks = []
        for name, info in sorted(c.blocks.items(), key=lambda kv: (kv[1]["order"] is None, kv[1]["order"] or 0)):
            if info["norm_first"] is not None:
                placement = "pre-norm" if info["norm_first"] else "post-norm"
            else:
                calls = info["calls"]
                if "norm" not in calls:
                    placement = "none"
                elif "attn" in calls and calls.index("norm") < calls.index("attn"):
                    placement = "pre-norm"
                else:
                    placement = "post-norm"
            comp, dead = float("nan"), float("nan")
            if info["ffn_in"] and info["ffn_in"] in by_name and info["ffn_out"] in by_name:
                r_in = by_name[info["ffn_in"]].effective_rank_in
                r_hidden = by_name[info["ffn_out"]].effective_rank_in
                comp = r_in / r_hidden if r_hidden > 0 and math.isfinite(r_in) else float("nan")
            if info["fired"] is not None:
                dead = float(1.0 - info["fired"].double().mean())
            blocks.append(BlockMetrics(name, info["order"] if info["order"] is not None else -1,
                                       _mean(_host(info["res_in"])), _mean(_host(info["res_out"])),
                                       _mean(_host(info["grad"])), placement, info["ffn_in"], info["ffn_out"],
                                       comp, dead))
        ratio = blocks[-1].token_residual_out / blocks[0].token_residual_in if blocks and \
            blocks[0].token_residual_in > 0 else float("nan")
        grad_ratio = blocks[0].output_grad_norm / blocks[-1].output_grad_norm if len(blocks) >= 2 and \
            blocks[-1].output_grad_norm > 0 else float("nan")
        notices = [] if layers else [NO_ATTENTION]
        notices += [f"{name}: not measured ({why})" for name, why in c.unsupported.items() if name not in layers]
        risk = rank_collapse_risk(ratio)
        reason = ""
        if risk == "UNKNOWN":
            reason = ("no attention was measured, so no transformer block was found" if not layers else
                      "no block around the attention layers was measured (attention at the model's top level, "
                      "or a single analysis step: functional attention's blocks are read from the second step)"
                      if not blocks else "the token residual of the blocks' input could not be measured")
        return AttentionStats(
            attention_entropy_mean=_mean([m.entropy_mean for m in layers.values()]),
            attention_sparsity=_mean([m.sparsity for m in layers.values()]),
            head_diversity=_mean([m.head_diversity for m in layers.values()]),
            rank_collapse_risk=risk, rank_collapse_ratio=ratio,
            residual_gradient_ratio=grad_ratio, layers=layers, blocks=blocks, notice="; ".join(notices),
            risk_reason=reason)

    def issues(self, st: AttentionStats, th: FlowThresholds, step: int = 0) -> list[FlowIssue]:
        t = SimpleNamespace(min_entropy=th.min_attention_entropy, min_diversity=th.min_head_diversity,
                            sink=th.attention_sink, qkv_imbalance=th.qkv_imbalance, residual_decay=th.residual_decay,
                            ffn_dead=th.ffn_dead)
        out = []
        for m in st.layers.values():
            if math.isfinite(m.entropy_mean) and m.entropy_mean < t.min_entropy:
                out.append(make_issue(IssueType.LOW_ATTENTION_ENTROPY, IssueSeverity.HIGH if m.entropy_mean <
                                      t.min_entropy / 2 else IssueSeverity.MEDIUM, m.layer, m.entropy_mean,
                                      t.min_entropy, f"normalised attention entropy {m.entropy_mean:.2f} < "
                                      f"{t.min_entropy:g} (sparsity {m.sparsity:.0%})", step))
            if m.heads >= 2 and math.isfinite(m.head_diversity) and m.head_diversity < t.min_diversity:
                out.append(make_issue(IssueType.LOW_HEAD_DIVERSITY, IssueSeverity.MEDIUM, m.layer, m.head_diversity,
                                      t.min_diversity, f"head diversity {m.head_diversity:.2f} < {t.min_diversity:g}: "
                                      f"the {m.heads} heads attend alike", step))
            if m.sequence_length >= 4 and math.isfinite(m.sink) and m.sink > t.sink:
                out.append(make_issue(IssueType.ATTN_BOTTLENECK, IssueSeverity.MEDIUM, m.layer, m.sink, t.sink,
                                      f"{m.sink:.0%} of the attention of a head goes to one key position", step))
            imb = m.qkv_imbalance
            if imb == float("inf") or (math.isfinite(imb) and imb > t.qkv_imbalance):
                out.append(make_issue(IssueType.QKV_IMBALANCE, IssueSeverity.MEDIUM, m.layer, imb, t.qkv_imbalance,
                                      f"Q/K/V gradient norms {m.q_grad:.3g} / {m.k_grad:.3g} / {m.v_grad:.3g} "
                                      f"(max/min {imb:.3g} > {t.qkv_imbalance:g})", step))
        if st.rank_collapse_risk in ("MEDIUM", "HIGH"):
            out.append(make_issue(IssueType.RANK_COLLAPSE, IssueSeverity.HIGH if st.rank_collapse_risk == "HIGH" else
                                  IssueSeverity.MEDIUM, st.blocks[-1].block, st.rank_collapse_ratio, 0.3,
                                  f"token diversity falls to {st.rank_collapse_ratio:.0%} of the input's through "
                                  f"{len(st.blocks)} blocks (risk {st.rank_collapse_risk})", step))
        if math.isfinite(st.residual_gradient_ratio) and st.residual_gradient_ratio < t.residual_decay:
            out.append(make_issue(IssueType.RESIDUAL_DECAY, IssueSeverity.HIGH if st.residual_gradient_ratio <
                                  t.residual_decay ** 2 else IssueSeverity.MEDIUM, st.blocks[0].block,
                                  st.residual_gradient_ratio, t.residual_decay,
                                  f"the residual-stream gradient at the first block is {st.residual_gradient_ratio:.2g}"
                                  f" of the last block's ({len(st.blocks)} blocks, "
                                  f"{st.blocks[0].norm_placement})", step))
        for b in st.blocks:
            bad_comp = math.isfinite(b.ffn_compression) and b.ffn_compression >= th.bottleneck_ratio
            bad_dead = math.isfinite(b.ffn_dead_ratio) and b.ffn_dead_ratio > t.ffn_dead
            if bad_comp or bad_dead:
                why = []
                if bad_comp:
                    why.append(f"the hidden layer uses {b.ffn_compression:.1f}x fewer effective dimensions than "
                               "its input")
                if bad_dead:
                    why.append(f"{b.ffn_dead_ratio:.0%} of the hidden units never fire")
                out.append(make_issue(IssueType.FFN_BOTTLENECK, IssueSeverity.MEDIUM, b.ffn_out or b.block,
                                      b.ffn_compression if bad_comp else b.ffn_dead_ratio,
                                      th.bottleneck_ratio if bad_comp else t.ffn_dead,
                                      f"feed-forward bottleneck in {b.block}: " + "; ".join(why), step))
        return out

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        st = self.stats(metrics)
        step = int(run.history.steps[-1]) if run.history is not None else 0
        return ExtensionResult(self.issues(st, th, step), attention_section(st), st)


def attention_section(st: AttentionStats) -> dict[str, Any]:
    rows = [[m.layer, m.heads, m.sequence_length, m.entropy_mean, m.sparsity, m.sink, m.head_diversity, m.q_grad,
             m.k_grad, m.v_grad, m.qkv_imbalance] for m in st.layers.values()]
    brows = [[b.block, b.depth, b.norm_placement, b.token_residual_in, b.token_residual_out, b.output_grad_norm,
              b.ffn_compression, b.ffn_dead_ratio] for b in st.blocks]
    head_rows = [[m.layer, h, e] for m in st.layers.values() for h, e in enumerate(m.entropy_per_head)]
    tables = [table("Attention layers", ["layer", "heads", "keys", "entropy", "sparsity", "sink", "head diversity",
                                         "|dQ|", "|dK|", "|dV|", "Q/K/V max/min"], rows),
              table("Entropy per head", ["layer", "head", "normalised entropy"], head_rows)]
    if brows:
        tables.append(table("Blocks (residual stream and FFN)", ["block", "depth", "norm", "token residual in",
                                                                 "token residual out", "|dL/d out|",
                                                                 "FFN compression", "FFN dead units"], brows))
    summary: dict[str, Any] = {"attention layers measured": len(st.layers),
                               "attention entropy (mean)": st.attention_entropy_mean,
                               "attention sparsity": st.attention_sparsity,
                               "head diversity": st.head_diversity,
                               "rank collapse risk": st.rank_collapse_risk,
                               "rank collapse ratio": st.rank_collapse_ratio,
                               "residual gradient ratio (first/last block)": st.residual_gradient_ratio}
    if st.risk_reason:
        summary["rank collapse risk (why unknown)"] = st.risk_reason
    if st.notice:
        summary["notice"] = st.notice
    return section("Attention", summary=summary, tables=tables, notes=st.notice)


def _mean(values: Any) -> float:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


_NOT_TRACKED = dict(notice="attention was not tracked (track_attention_weights=False)",
                    risk_reason="attention was not tracked")


class TransformerAnalyzer(FlowEngine):
    """Transformer analyzer. The contract (`analyze(model, inputs, ...) -> FlowReport`, the statistics at
    `report.result("attention")`), or seed 003's `issues, attn_stats = TransformerAnalyzer(model).analyze(
    input_fn, loss_fn, steps=20)`. Its thresholds (min_entropy_threshold, ...) are FlowThresholds'."""

    analyzer_name = "TransformerAnalyzer"
    default_steps = 20

    def __init__(self, model: nn.Module | None = None, enable_jacobian: bool = False,
                 enable_vector_analysis: bool = False, min_entropy_threshold: float | None = None,
                 min_diversity_threshold: float | None = None, track_attention_weights: bool = True, *,
                 sink_threshold: float | None = None, qkv_imbalance_threshold: float | None = None,
                 residual_decay_threshold: float | None = None, ffn_dead_threshold: float | None = None,
                 attention_layers: list[str] | None = None, optimizer: torch.optim.Optimizer | None = None,
                 thresholds: FlowThresholds | Any = None, **threshold_overrides: float) -> None:
        super().__init__(model, thresholds=thresholds, enable_jacobian=enable_jacobian,
                         enable_vector_analysis=enable_vector_analysis, optimizer=optimizer,
                         min_attention_entropy=min_entropy_threshold, min_head_diversity=min_diversity_threshold,
                         attention_sink=sink_threshold, qkv_imbalance=qkv_imbalance_threshold,
                         residual_decay=residual_decay_threshold, ffn_dead=ffn_dead_threshold, **threshold_overrides)
        self.track_attention_weights = track_attention_weights
        self.attention_layers = attention_layers

    def _extensions(self) -> list[Extension]:
        exts = super()._extensions()
        if self.track_attention_weights:
            exts.append(TransformerExtension(self.attention_layers))
        return exts

    @property
    def attention_stats(self) -> AttentionStats:
        """The attention statistics of the last analysis (UNKNOWN ones when attention was not tracked)."""
        st = self.results.get("attention")
        return st if st is not None else AttentionStats(float("nan"), float("nan"), float("nan"), "UNKNOWN",
                                                        float("nan"), float("nan"), **_NOT_TRACKED)

    def _finish(self, report: FlowReport, model: nn.Module) -> None:
        st = self.attention_stats
        if st.notice:
            report.meta.setdefault("notices", []).append(st.notice)
            log.warning("gradflow_agent: %s: %s", self.analyzer_name, st.notice)

    def analyze(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The contract -> FlowReport, or seed 003's `analyze(input_fn, loss_fn, steps=20) -> (issues, stats)`."""
        if contract_call(args, kwargs, frozenset({"input_fn"})):
            return super().analyze(*args, **kwargs)
        return self._seed003(*args, **kwargs)

    def _seed003(self, input_fn: Callable[[], Any], loss_fn: Callable[[Any], torch.Tensor], steps: int = 20
                 ) -> tuple[list[FlowIssue], AttentionStats]:
        report = self._analyze(self._bind(None), batches_from(input_fn), loss_fn, steps, None)
        return report.issues, self.attention_stats

    def print_summary(self, issues: list[FlowIssue] | None = None, attn_stats: AttentionStats | None = None,
                      console: Any = None) -> None:
        from ..report.console import ConsoleReporter
        self.report.print_summary(console=console)
        self.report.print_issues(issues if issues is not None else self.report.issues, console=console)
        ConsoleReporter(console).print_sections(self.report)
