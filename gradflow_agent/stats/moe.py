"""Mixture-of-experts router statistics: expert load, load imbalance, dead experts, router entropy.

Per MoE layer (one router), reduced on the device with no host sync in the hot path: each observed router
call adds, into one small float64 buffer per layer, how many of its tokens' top-k assignments went to each
expert (`index_add_` of ones at the chosen expert indices; a top-k router assigns every token k times) and
the sum over its tokens of the normalised router entropy H(softmax(logits)) / ln E. The token count comes
from the call's shape (host-side, no sync). `device_parts()` / `finish(host)` read the buffers once per
snapshot, like the other statistics.

Over the window (defined below), with N tokens, k assignments per token, E experts and c_i the
assignments expert i received:

- expert load_i = c_i / N: the fraction of tokens routed to expert i; sum_i load_i = k (top-k aware);
- load imbalance = (E * max_i c_i / sum_j c_j - 1) / (E / k - 1), clipped to [0, 1]: 0 when every expert
  gets its fair share, 1 when the same k experts get every token (the worst a top-k router can do). It is
  the busiest expert's excess over its fair share (max/mean - 1, the "MaxVio" of auxiliary-loss-free
  balancing) divided by the largest possible excess, so one threshold fits any E and k;
- dead experts = #{i : c_i = 0}, and their fraction of E (what the detector judges);
- router entropy = mean over tokens of H(softmax(logits)) / ln E: 1 uniform router, 0 one expert per token.

The window is the export interval, extended until it holds at least `min_assignments_per_expert` x E
assignments: a small interval is not judged (the statistics keep their previous values, NaN before the
first complete window) and its counts carry over into the next. With uniform routing an expert then
misses every assignment with probability about exp(-min_assignments_per_expert), so a dead expert is
dead, not unlucky. Assignments to an index outside [0, E) (expert-parallel or dropped tokens) count
towards no expert.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Per-layer statistics, in the names the snapshot and the rule table use.
KEYS = ("moe_load_imbalance_ratio", "moe_dead_expert_ratio", "moe_router_entropy_ratio")


def router_statistics(logits: torch.Tensor | None, indices: torch.Tensor, num_experts: int
                      ) -> torch.Tensor:
    """One call's (E + 2,) float64 device sums: assignments per expert, assignments outside [0, E), and the
    sum of normalised router entropies over the tokens (0 without logits). No host sync."""
    with torch.no_grad():
        E = int(num_experts)
        idx = indices.detach().reshape(-1).long()
        idx = torch.where((idx >= 0) & (idx < E), idx, E)
        out = torch.zeros(E + 2, dtype=torch.float64, device=idx.device)
        out.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        if logits is not None and E >= 2:
            x = logits.detach().reshape(-1, E).float()
            ent = torch.special.entr(torch.softmax(x, dim=-1)).sum(-1) / math.log(E)
            out[E + 1] = ent.sum().double()
        return out


def top_k_indices(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The experts a softmax top-k router picks from its logits (softmax is monotone: the logits' top-k)."""
    with torch.no_grad():
        return logits.detach().topk(int(top_k), dim=-1).indices


def summarise(counts: np.ndarray, tokens: float, entropy_sum: float, top_k: int) -> dict[str, float | np.ndarray]:
    """The documented statistics of one window from its sums (host side; also the tests' reference)."""
    E = len(counts)
    total = float(counts.sum())
    load = counts / tokens if tokens > 0 else np.full(E, np.nan)
    fair = E / top_k - 1 if top_k else 0.0
    if total > 0 and fair > 0:
        imbalance = float(np.clip((E * counts.max() / total - 1) / fair, 0.0, 1.0))
    else:
        imbalance = float("nan")
    dead = float((counts == 0).sum()) if total > 0 else float("nan")
    return {"load": load, "moe_load_imbalance_ratio": imbalance, "dead": dead,
            "moe_dead_expert_ratio": dead / E if E else float("nan"),
            "moe_router_entropy_ratio": entropy_sum / tokens if tokens > 0 and E >= 2 else float("nan")}


class MoEStats:
    """Router statistics per MoE layer, reduced on the device; a layer seen for the first time is added."""

    def __init__(self, device: torch.device | str = "cpu", *, min_assignments_per_expert: int = 32) -> None:
        self.device = torch.device(device)
        self.min_assignments = int(min_assignments_per_expert)
        self.layers: list[str] = []
        self.experts: list[int] = []
        self.top_k: list[int] = []
        self._index: dict[str, int] = {}
        self._acc: list[torch.Tensor] = []  # per layer: (E + 2,) sums on the device
        self._tokens: list[int] = []  # per layer: tokens observed in the current window (host, from shapes)
        self.last: list[dict[str, float | np.ndarray]] = []  # per layer: the latest complete window

    def add_layer(self, name: str, num_experts: int, top_k: int) -> int:
        """Declare a router (E experts, top-k); returns its index. Re-declaring keeps its buffer."""
        i = self._index.get(name)
        if i is not None:
            if self.experts[i] != num_experts:
                raise ValueError(f"router {name!r} had {self.experts[i]} experts, now {num_experts}")
            self.top_k[i] = int(top_k)
            return i
        i = self._index[name] = len(self.layers)
        self.layers.append(name)
        self.experts.append(int(num_experts))
        self.top_k.append(int(top_k))
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._acc.append(torch.zeros(num_experts + 2, dtype=dtype, device=self.device))
        self._tokens.append(0)
        self.last.append(summarise(np.zeros(num_experts), 0.0, 0.0, int(top_k)))
        return i

    # -- hot path ---------------------------------------------------------------------------------------
    def observe(self, name: str, logits: torch.Tensor | None, indices: torch.Tensor | None = None,
                top_k: int | None = None) -> None:
        """Add one router call: logits (..., E) and/or the chosen experts (..., k). Without indices the
        top-k of the logits is taken (`top_k` needed then). No host sync."""
        if indices is None:
            if logits is None or not top_k:
                raise ValueError("observe needs the chosen expert indices, or logits and top_k")
            indices = top_k_indices(logits, top_k)
        k = int(indices.shape[-1]) if indices.ndim else 1
        i = self._index.get(name)
        if i is None:
            if logits is None:
                raise ValueError(f"router {name!r} is not declared and no logits give its number of experts")
            i = self.add_layer(name, int(logits.shape[-1]), k)
        elif self.top_k[i] != k:
            self.top_k[i] = k
        E = self.experts[i]
        if logits is not None and logits.shape[-1] != E:
            raise ValueError(f"router {name!r}: logits over {logits.shape[-1]} experts, declared {E}")
        acc = self._acc[i]
        acc.add_(router_statistics(logits, indices, E).to(acc.device, acc.dtype, non_blocking=True))
        self._tokens[i] += indices.numel() // max(k, 1)

    # -- snapshot -----------------------------------------------------------------------------------------
    def device_parts(self) -> list[torch.Tensor]:
        return list(self._acc)

    def finish(self, host: list[np.ndarray]) -> list[dict[str, float | np.ndarray]]:
        """Per layer, the statistics of its latest complete window (see the module docstring); the buffers
        of the layers whose window completed start again, the others keep accumulating."""
        for i, flat in enumerate(host[: len(self.layers)]):
            flat = np.asarray(flat, dtype=np.float64)
            E = self.experts[i]
            counts, entropy_sum = flat[:E], float(flat[E + 1])
            if counts.sum() < self.min_assignments * E or self._tokens[i] == 0:
                continue  # not enough routed tokens yet: the window goes on
            self.last[i] = summarise(counts, float(self._tokens[i]), entropy_sum, self.top_k[i])
            self._acc[i].zero_()
            self._tokens[i] = 0
        return self.last

    def values(self) -> dict[str, dict[str, float]]:
        """statistic -> {layer: value} of the latest complete windows (NaN before the first)."""
        return {key: {name: float(s[key]) for name, s in zip(self.layers, self.last)} for key in KEYS}


__all__ = ["KEYS", "MoEStats", "router_statistics", "summarise", "top_k_indices"]
