"""Attention statistics for models whose attention is functional (no module outputs the attention matrix).

Hugging Face eager/sdpa attention, `F.scaled_dot_product_attention` and hand-written attention compute the
attention probabilities inside a function call, and fused kernels never materialise them at all. So the
statistics are computed from the call's own query and key on a small fixed sample: at most `heads` query
heads x `queries` query positions x `batch` samples (strided, the last query position always included:
under a causal mask it sees the most keys), P = softmax(q k^T * scale + mask) for those rows only, against
every key. Cost per observed call: one (heads x queries x keys x head_dim) product, never the full matrix.

For each sampled row i with n_i >= 2 valid keys (rows with fewer say nothing and are left out):

- normalised entropy = -sum_j P_ij ln P_ij / ln n_i, in [0, 1] (1 = uniform over the valid keys, 0 = one key);
- max probability = max_j P_ij (collapse / saturation: near 1 when one key takes all the attention);
- head diversity (per call) = 1 - mean over pairs of sampled heads of cos(P_h - U, P_h' - U) over the sampled
  rows, U the uniform distribution over each row's valid keys, clipped to [0, 1]: 0 = heads attend alike,
  ~1 = unrelated patterns; heads that are exactly uniform carry no pattern and are left out of the pairs
  (the TransformerAnalyzer's definition, on the sample).

Per layer, entropy and max probability are means over the sampled rows of the interval, diversity the mean
over the calls. Everything is reduced on the device into one small buffer per model (sum columns per layer)
with no host sync in the hot path; `device_parts()` / `finish(host)` read it once per snapshot, like the
other statistics. The probabilities are those before attention dropout (the distribution the model chose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .engine import device_index

# Per-layer columns of the device buffer: sum of row entropies, rows, sum of row max probabilities, sum of
# per-call head diversities, calls with a diversity.
COLS = ("entropy_sum", "rows", "max_prob_sum", "diversity_sum", "diversity_calls")
N_COLS = len(COLS)
KEYS = ("attention_entropy", "attention_max_prob", "attention_head_diversity")


@dataclass(frozen=True)
class AttentionSample:
    """How many rows of each attention call are recomputed: query heads, query positions, batch samples
    (None = all). The defaults bound the extra work to 64 rows per call."""

    heads: int | None = 4
    queries: int | None = 16
    batch: int | None = 1


def _strided(n: int, limit: int | None, *, from_end: bool = False) -> list[int]:
    """At most `limit` indices of range(n), evenly strided; from_end keeps the last index."""
    if limit is None or n <= limit:
        return list(range(n))
    step = math.ceil(n / limit)
    idx = list(range(n - 1, -1, -step)) if from_end else list(range(0, n, step))
    return sorted(idx)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., L, D) as (B, H, L, D): a 3-D tensor is one head, extra leading dims fold into the batch."""
    if t.ndim == 2:
        return t.reshape(1, 1, *t.shape)
    if t.ndim == 3:
        return t.unsqueeze(1)
    if t.ndim > 4:
        return t.reshape(-1, *t.shape[-3:])
    return t


def _select(t: torch.Tensor, dim: int, idx: list[int], full: int) -> torch.Tensor:
    """Rows `idx` of `t` along `dim` when that dim has the full size (a broadcast dim of 1 stays)."""
    if t.shape[dim] == 1 or len(idx) == full:
        return t
    return t.index_select(dim, device_index(idx, t.device))


def _rows_of(m: torch.Tensor, bi: list[int], hi: list[int], qi: list[int], B: int, Hq: int, L: int, S: int
             ) -> torch.Tensor:
    """The sampled rows of a mask or bias broadcastable to (B, Hq, L, S)."""
    m = m.detach()
    m = m.reshape(*([1] * (4 - m.ndim)), *m.shape) if m.ndim < 4 else m.reshape(-1, *m.shape[-3:])
    return _select(_select(_select(m[..., :S], 0, bi, B), 1, hi, Hq), 2, qi, L)


def sample_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None,
                 scale: float | None = None, *, is_causal: bool = False, softcap: float | None = None,
                 sliding_window: int | None = None, bias: torch.Tensor | None = None,
                 sample: AttentionSample = AttentionSample()) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention probabilities of the sampled rows and their valid keys, from q (.., Hq, L, D) and
    k (.., Hk, S, D) (grouped-query heads map to key head h // (Hq / Hk)).

    `mask`: boolean (True = attend) or additive float, broadcastable to (B, Hq, L, S), as for
    `F.scaled_dot_product_attention`; `is_causal`: key j visible to query i when j <= i (torch's upper-left
    alignment); `bias`: an additive position bias (T5-style `position_bias`), added before the mask. Returns
    (P, valid): P (b, h, l, S) float32, valid (b, h or 1, l, S) bool. Computed without autograd and without
    touching the random generators.
    """
    with torch.no_grad():
        q, k = _as_4d(query.detach()), _as_4d(key.detach())
        B, Hq, L, D = q.shape
        Bk, Hk, S, _ = k.shape
        if Hq % Hk:
            raise ValueError(f"query heads {Hq} are not a multiple of key heads {Hk}")
        bi = _strided(B, sample.batch)
        hi = _strided(Hq, sample.heads)
        qi = _strided(L, sample.queries, from_end=True)
        qs = _select(_select(_select(q, 0, bi, B), 1, hi, Hq), 2, qi, L)
        kv = [h // (Hq // Hk) for h in hi]
        ks = _select(k, 0, bi, B) if Bk == B else k[:1]
        ks = ks if kv == list(range(Hk)) else ks.index_select(1, device_index(kv, k.device))
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        scores = torch.matmul(qs.float(), ks.float().transpose(-1, -2)) * scale  # (b, h, l, S)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if bias is not None:
            scores = scores + _rows_of(bias, bi, hi, qi, B, Hq, L, S).float()
        valid = torch.ones(1, 1, len(qi), S, dtype=torch.bool, device=scores.device)
        if mask is not None:
            m = _rows_of(mask, bi, hi, qi, B, Hq, L, S)
            if m.dtype == torch.bool:
                valid = valid & m
            else:
                valid = valid & (m > torch.finfo(m.dtype).min / 2)
                scores = scores + torch.where(valid, m.float(), 0.0)
        if is_causal or sliding_window:
            qpos = device_index(qi, scores.device).unsqueeze(-1)
            kpos = torch.arange(S, device=scores.device).unsqueeze(0)
            if is_causal:
                valid = valid & (kpos <= qpos)
            if sliding_window:
                valid = valid & (kpos > qpos - int(sliding_window))
        scores = scores.masked_fill(~valid, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no valid key: all zeros
        return probs, valid


def sample_softmax_output(probs: torch.Tensor, sample: AttentionSample = AttentionSample()
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled rows of an attention matrix that already exists (a softmax output (B, H, L, S) or
    (B, L, S)), with valid keys = positions non-zero somewhere in the batch and heads (as the nn.Softmax
    path of the TransformerAnalyzer reads them: a collapsed row keeps its keys)."""
    with torch.no_grad():
        A = _as_4d(probs.detach())
        B, H, L, _ = A.shape
        bi, hi, qi = _strided(B, sample.batch), _strided(H, sample.heads), _strided(L, sample.queries, from_end=True)
        rows = _select(A, 2, qi, L)
        valid = (rows > 0).any(0, keepdim=True).any(1, keepdim=True)
        return _select(_select(rows, 0, bi, B), 1, hi, H).float(), valid


def row_statistics(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The COLS sums of one call, as a (N_COLS,) float64 device tensor (no host sync). float32 inside:
    ~25 small ops per call, the cost is their dispatch, not their size."""
    with torch.no_grad():
        P = probs.float()
        n = valid.sum(-1, dtype=torch.float32).expand(P.shape[:-1])  # (b, h, l)
        w = (n >= 2).float()
        ent = torch.special.entr(P).sum(-1) / n.clamp_min(2).log()
        head = [(ent * w).sum(), w.sum(), (P.amax(-1) * w).sum()]
        H = P.shape[1]
        if H >= 2:
            C = ((P - valid / n.clamp_min(1).unsqueeze(-1)) * w.unsqueeze(-1)).transpose(0, 1).reshape(H, -1)
            norms = torch.linalg.vector_norm(C, dim=1)
            keep = (norms > 1e-6 * norms.max()).float()
            Cn = C / norms.clamp_min(1e-30).unsqueeze(-1)
            pairs = torch.outer(keep, keep).triu(1)
            npairs = pairs.sum()
            mean_cos = ((Cn @ Cn.T) * pairs).sum() / npairs.clamp_min(1)
            has = (npairs > 0).float()
            head += [(1.0 - mean_cos).clamp(0.0, 1.0) * has, has]
        else:
            zero = P.new_zeros(())
            head += [zero, zero]
        return torch.stack(head).double()


def reference_statistics(probs: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """The three statistics of one call on the host (for tests and offline checks)."""
    s = row_statistics(probs, valid).cpu().numpy()
    return _ratios(s[None, :])[0]


def _ratios(acc: np.ndarray) -> list[dict[str, float]]:
    out = []
    for ent, rows, mx, div, calls in acc:
        out.append({"attention_entropy": ent / rows if rows > 0 else float("nan"),
                    "attention_max_prob": mx / rows if rows > 0 else float("nan"),
                    "attention_head_diversity": div / calls if calls > 0 else float("nan")})
    return out


class AttentionStats:
    """Per attention layer: normalised entropy, max probability and head diversity, reduced on the device.

    `layer_names` may be empty: a layer seen for the first time is added (the buffer grows on the device,
    no sync). `observe` takes sampled probabilities, `observe_qk` the call's query and key.
    """

    def __init__(self, layer_names: list[str] | tuple[str, ...] = (), device: torch.device | str = "cpu", *,
                 sample: AttentionSample = AttentionSample()) -> None:
        self.device = torch.device(device)
        self.sample = sample
        self.layers: list[str] = []
        self._index: dict[str, int] = {}
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.acc = torch.zeros(0, N_COLS, dtype=dtype, device=self.device)
        self._last = np.full((0, len(KEYS)), np.nan)
        self.calls = 0  # observed calls since the last finish (host count)
        for name in layer_names:
            self._slot(name)

    def _slot(self, name: str) -> int:
        i = self._index.get(name)
        if i is None:
            i = self._index[name] = len(self.layers)
            self.layers.append(name)
            self.acc = torch.cat([self.acc, self.acc.new_zeros(1, N_COLS)])
            self._last = np.concatenate([self._last, np.full((1, len(KEYS)), np.nan)])
        return i

    # -- hot path ---------------------------------------------------------------------------------------
    def observe(self, name: str, probs: torch.Tensor, valid: torch.Tensor) -> None:
        """Add one call's sampled probabilities (b, h, l, S) and valid keys to layer `name`."""
        i = self._slot(name)
        self.acc[i].add_(row_statistics(probs, valid).to(self.acc.device, self.acc.dtype, non_blocking=True))
        self.calls += 1

    def observe_qk(self, name: str, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None,
                   scale: float | None = None, *, is_causal: bool = False, softcap: float | None = None,
                   sliding_window: int | None = None, bias: torch.Tensor | None = None) -> None:
        """Sample the call's attention from its query and key (see `sample_probs`) and add it."""
        probs, valid = sample_probs(query, key, mask, scale, is_causal=is_causal, softcap=softcap,
                                    sliding_window=sliding_window, bias=bias, sample=self.sample)
        self.observe(name, probs, valid)

    # -- snapshot -----------------------------------------------------------------------------------------
    def device_parts(self) -> list[torch.Tensor]:
        return [self.acc]

    def finish(self, host: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Per-layer means of the interval (a layer not observed in it keeps its last value; NaN = never
        observed), keyed KEYS, over `self.layers`; the buffer starts again."""
        flat = np.asarray(host[0], dtype=np.float64)
        n = flat.size // N_COLS
        acc = flat[: n * N_COLS].reshape(n, N_COLS)
        for i, r in enumerate(_ratios(acc)):
            for j, k in enumerate(KEYS):
                if math.isfinite(r[k]):
                    self._last[i, j] = r[k]
        self.acc[:n].zero_()
        self.calls = 0
        return {k: self._last[:, j].copy() for j, k in enumerate(KEYS)}


__all__ = ["AttentionSample", "AttentionStats", "COLS", "KEYS", "reference_statistics", "row_statistics",
           "sample_probs", "sample_softmax_output"]
