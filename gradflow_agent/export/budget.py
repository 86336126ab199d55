"""The series budget: which layers are exported by name, and the views that cover every layer.

The detectors judge every monitored layer in process; what a thousand-layer model on many ranks may
*export* per layer is bounded, so that Prometheus, its rule evaluation and the dashboards stay fast.
Three views are exported:

- **named layers**: every per-layer series (statistics, health, issues, non-finite counts, info) for
  all layers while `layers x PER_LAYER_SERIES` fits the budget; beyond it, for a chosen set: the first
  and the last layer, the layers with an active issue (most severe first) and the `worst_k` worst
  layers of every statistic a rule judges (in the direction the rule judges it), until the budget is
  spent (`named_layers`);
- **the depth profile** (`gradflow_depth_profile{statistic, agg, bin}`): every statistic a rule
  judges, reduced over contiguous depth bins in the direction that rule judges it (min for "below",
  max for "above"), over ALL layers, always exported: a vanishing first block and an exploding last
  block stay visible whatever the budget;
- **per-run counts** (`gradflow_issue_layers{kind, severity}`, `gradflow_issue_extreme{kind, which,
  layer}`): how many layers each kind flags, and the first and the worst of them, exact over all
  layers; the alerts page once per run on these.

The budget is for the whole job: each of `world_size` processes gets an equal share.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from ..detect.spec import RULES, severity_rank
from ..snapshot import LAYER_STATS, NONFINITE_TENSORS, Snapshot
from ..stats.sharding import world_size

#: Series one named layer can cost: its statistics gauges, health, non-finite counters and info.
PER_LAYER_SERIES = len(LAYER_STATS) - 1 + 1 + len(NONFINITE_TENSORS) + 1
#: Bins of the depth profile (fewer when the model has fewer layers).
DEFAULT_DEPTH_BINS = 32


def _directions() -> dict[str, tuple[str, ...]]:
    """statistic -> the aggregations a rule judges it by ("min" for "below" rules, "max" for "above")."""
    found: dict[str, list[str]] = {}
    for rule in RULES:
        for c in rule.conditions:
            agg = "min" if c.op == "below" else "max"
            aggs = found.setdefault(c.statistic, [])
            if agg not in aggs:
                aggs.append(agg)
    found.setdefault("health", ["min"])
    return {k: tuple(sorted(v)) for k, v in found.items()}


#: The statistics of the depth profile and the worst-K choice, with their judged direction(s).
DIRECTIONS = _directions()


@dataclass(frozen=True)
class Budget:
    """`series`: per-layer series this process may export (0 = no limit); `worst_k`: named worst layers
    per statistic and direction when folding; `depth_bins`: bins of the depth profile."""

    series: int = 0
    worst_k: int = 5
    depth_bins: int = DEFAULT_DEPTH_BINS
    per_layer: bool = True  # False: another rank exports this job's per-layer series

    @classmethod
    def from_config(cls, cfg, world_size: int = 1) -> Budget:
        """`exporters.prometheus.series_budget` is for the job: each rank gets its share."""
        total = int(getattr(cfg, "series_budget", 0) or 0)
        share = max(PER_LAYER_SERIES, total // max(1, world_size)) if total else 0
        return cls(share, int(getattr(cfg, "worst_k", 5)), int(getattr(cfg, "depth_bins", DEFAULT_DEPTH_BINS)))

    @classmethod
    def for_agent(cls, agent) -> Budget:
        """The budget of `agent`'s process: its share of the job's `exporters.prometheus.series_budget`.
        In a combined data-parallel job every rank holds the job's statistics: rank 0 exports them with
        the whole budget and the other ranks export no per-layer series."""
        cfg = agent.config.exporters.prometheus
        if not getattr(agent, "combined", False):
            return cls.from_config(cfg, world_size())
        if getattr(agent, "rank", 0):
            return replace(cls.from_config(cfg, 1), per_layer=False)
        return cls.from_config(cfg, 1)

    @property
    def max_named(self) -> int:
        """How many layers may be named (0 = all)."""
        return self.series // PER_LAYER_SERIES if self.series else 0


def _values(snap: Snapshot, statistic: str) -> np.ndarray | None:
    if statistic == "health":
        return None if snap.health is None else np.asarray(snap.health, dtype=float)
    values = snap.stats.get(statistic)
    return None if values is None else np.asarray(values, dtype=float)


def _worst(values: np.ndarray, agg: str, k: int) -> list[int]:
    """The k layers with the lowest ("min") or highest ("max") known value."""
    known = np.flatnonzero(~np.isnan(values))
    if not len(known) or k <= 0:
        return []
    order = np.argsort(values[known], kind="stable")
    if agg == "max":
        order = order[::-1]
    return [int(i) for i in known[order[:k]]]


def named_layers(snap: Snapshot, budget: Budget) -> list[int]:
    """Indices (in depth order) of the layers exported by name: all of them while they fit the budget.

    Beyond it: both ends; the flagged layers, most severe first, leaving room for the worst layers of
    every judged statistic; those worst layers; then the remaining flagged ones, up to the cap."""
    n = len(snap.layers)
    cap = budget.max_named
    if not cap or n <= cap:
        return list(range(n))
    worst: dict[int, None] = {}
    for statistic, aggs in DIRECTIONS.items():
        values = _values(snap, statistic)
        if values is None or len(values) != n:
            continue
        for agg in aggs:
            worst.update(dict.fromkeys(_worst(values, agg, budget.worst_k)))
    index = {name: i for i, name in enumerate(snap.layers)}
    flagged = [index[i.layer] for i in sorted(snap.issues, key=lambda x: -severity_rank(x.severity))
               if i.layer in index]
    chosen: dict[int, None] = dict.fromkeys((0, n - 1)) if cap > 1 else {0: None}
    reserve = min(len(worst), cap // 2)
    for i in flagged:
        if len(chosen) >= cap - reserve:
            break
        chosen.setdefault(i, None)
    for i in (*worst, *flagged):
        if len(chosen) >= cap:
            break
        chosen.setdefault(i, None)
    return sorted(chosen)


def depth_bins(n: int, bins: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of layer indices, as equal as possible, at most `bins` of them."""
    count = max(1, min(n, bins))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def bin_label(i: int, count: int) -> str:
    """Zero-padded, so that dashboards sort bins in depth order."""
    return str(i).zfill(len(str(max(0, count - 1))))


def depth_profile(snap: Snapshot, budget: Budget) -> Iterator[tuple[str, str, str, float]]:
    """(statistic, agg, bin, value) over every layer; a bin whose layers all lack the statistic is left out."""
    bins = depth_bins(len(snap.layers), budget.depth_bins)
    for statistic, aggs in DIRECTIONS.items():
        values = _values(snap, statistic)
        if values is None or len(values) != len(snap.layers):
            continue
        for b, (start, stop) in enumerate(bins):
            part = values[start:stop]
            part = part[~np.isnan(part)]
            if not len(part):
                continue
            for agg in aggs:
                yield statistic, agg, bin_label(b, len(bins)), float(part.min() if agg == "min" else part.max())


def bin_info(snap: Snapshot, budget: Budget) -> Iterator[dict[str, str]]:
    """The layers each depth bin spans (labels of `gradflow_depth_bin_info`)."""
    bins = depth_bins(len(snap.layers), budget.depth_bins)
    for b, (start, stop) in enumerate(bins):
        yield {"bin": bin_label(b, len(bins)), "first_layer": snap.layers[start],
               "last_layer": snap.layers[stop - 1], "layers": str(stop - start)}


def issue_counts(snap: Snapshot) -> dict[tuple[str, str], int]:
    """(kind, severity) -> layers flagged, over every layer; every (kind, severity) a rule can report is
    present (0 when none), so that an alert resolves rather than goes stale."""
    counts = {(rule.kind, sev): 0 for rule in RULES for sev in rule.severities}
    for issue in snap.issues:
        counts[(issue.kind, issue.severity)] = counts.get((issue.kind, issue.severity), 0) + 1
    return counts


def issue_extremes(snap: Snapshot) -> Iterator[tuple[str, str, str, float]]:
    """(kind, which, layer, value): per kind the first layer flagged (earliest start, then shallowest)
    and the worst (furthest beyond its threshold, as a ratio), over every layer."""
    index = {name: i for i, name in enumerate(snap.layers)}
    by_kind: dict[str, list] = {}
    for issue in snap.issues:
        by_kind.setdefault(issue.kind, []).append(issue)
    for kind, issues in sorted(by_kind.items()):
        first = min(issues, key=lambda x: (x.first_step if x.first_step is not None else x.step,
                                           index.get(x.layer, 0)))
        worst = max(issues, key=lambda x: (severity_rank(x.severity), _beyond(x), -index.get(x.layer, 0)))
        for which, issue in (("first", first), ("worst", worst)):
            yield kind, which, issue.layer, float(issue.value) if math.isfinite(issue.value) else 0.0


def _beyond(issue) -> float:
    """How far beyond its threshold an issue is, as a log ratio (either direction), NaN-safe."""
    v, t = abs(issue.value), abs(issue.threshold)
    if not (math.isfinite(v) and math.isfinite(t)) or v == 0 or t == 0:
        return math.inf if not math.isfinite(v) else 0.0
    return abs(math.log(v / t))
