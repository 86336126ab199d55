"""Shared vocabulary of the offline analyzers: issue types, severities, the issue record, thresholds.

The analyzers never measure anything the agent already measures: they attach the agent, read its
per-step snapshots, and add only what a live monitor cannot afford (effective ranks, attention maps,
gradients through time). Everything here is plain data: computing and displaying stay separate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

MODEL = "(model)"  # the `layer` of a model-level issue (decay through depth, entropy collapse, ...)


class IssueSeverity(str, Enum):
    """How urgent an issue is; ordered LOW < MEDIUM < HIGH < CRITICAL."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]

    @classmethod
    def _missing_(cls, value: object) -> IssueSeverity | None:
        """The agent's severities are accepted too: info -> LOW, warning -> MEDIUM (`IssueSeverity('warning')`)."""
        return {"info": cls.LOW, "warning": cls.MEDIUM}.get(str(value).lower())

    def __str__(self) -> str:
        return self.value


_SEVERITY_RANK = {IssueSeverity.LOW: 0, IssueSeverity.MEDIUM: 1, IssueSeverity.HIGH: 2, IssueSeverity.CRITICAL: 3}
# The agent's in-process detector speaks info/warning/critical.
FROM_AGENT_SEVERITY = {"info": IssueSeverity.LOW, "warning": IssueSeverity.MEDIUM, "critical": IssueSeverity.CRITICAL}


class IssueType(str, Enum):
    """Every problem an analyzer can report (seed 003 and seed 004 names, plus a few precise extras)."""

    # scalar gradient flow (seed 003)
    VANISHING = "vanishing"
    EXPLODING = "exploding"
    DEAD = "dead"
    UNSTABLE = "unstable"
    NUMERICAL = "numerical"
    SATURATED = "saturated"
    STALLED = "stalled"
    # architecture (seed 004)
    BOTTLENECK = "bottleneck"
    DECAY = "decay"
    AMPLIFICATION = "amplification"
    LAYER_VARIANCE = "layer_variance"
    # vector and Jacobian analysis
    OSCILLATION = "oscillation"
    CIRCULATION = "circulation"
    LOW_RANK = "low_rank"
    # recurrent
    VANISHING_TEMPORAL = "vanishing_temporal"
    EXPLODING_TEMPORAL = "exploding_temporal"
    SHORT_MEMORY = "short_memory"
    SPECTRAL_LOW = "spectral_low"
    SPECTRAL_HIGH = "spectral_high"
    GATE_SATURATION = "gate_saturation"
    # attention
    LOW_ATTENTION_ENTROPY = "low_attention_entropy"
    LOW_HEAD_DIVERSITY = "low_head_diversity"
    RANK_COLLAPSE = "rank_collapse"
    ATTN_BOTTLENECK = "attn_bottleneck"
    FFN_BOTTLENECK = "ffn_bottleneck"
    QKV_IMBALANCE = "qkv_imbalance"
    RESIDUAL_DECAY = "residual_decay"
    # reinforcement-learning policies
    ENTROPY_COLLAPSE = "entropy_collapse"
    LOW_EXPLORATION = "low_exploration"
    EXCESSIVE_EXPLORATION = "excessive_exploration"
    LOW_ACTION_STD = "low_action_std"

    def __str__(self) -> str:
        return self.value


# The agent's detector kinds -> issue types (the analyzers reuse its detectors on aggregated snapshots).
FROM_AGENT_KIND = {"vanishing": IssueType.VANISHING, "exploding": IssueType.EXPLODING, "dead": IssueType.DEAD,
                   "nonfinite": IssueType.NUMERICAL, "unstable": IssueType.UNSTABLE,
                   "saturated": IssueType.SATURATED, "stalled": IssueType.STALLED}

RECOMMENDATIONS: dict[IssueType, str] = {
    IssueType.BOTTLENECK: "The representation is squeezed through too few dimensions here: widen this layer, add a "
                          "skip connection around it, or, if gradients are amplified through it, normalise its "
                          "input and damp its gradient (gradflow_agent.analyze.gradient_scale(x, 0.1)).",
    IssueType.DECAY: "Gradients shrink layer after layer toward the input: use residual connections, "
                     "normalisation, a variance-preserving initialisation or non-saturating activations.",
    IssueType.AMPLIFICATION: "Gradients grow layer after layer toward the input: lower the initialisation gain, "
                             "add normalisation, clip gradients.",
    IssueType.LAYER_VARIANCE: "This layer's gradient is out of line with its neighbours by orders of magnitude: "
                              "check its initialisation scale, a missing/extra normalisation, or a frozen or "
                              "rescaled parameter; per-layer learning rates (Adam) hide but do not fix it. For "
                              "parallel heads trained by different losses (actor and critic), balance the loss "
                              "coefficients instead.",
    IssueType.OSCILLATION: "Successive gradients point in opposite directions: the step size overshoots; lower the "
                           "learning rate or add momentum damping.",
    IssueType.CIRCULATION: "The gradient rotates steadily instead of pointing downhill (typical of adversarial or "
                           "game objectives): use a smaller learning rate, extragradient/optimistic updates, or "
                           "gradient penalties.",
    IssueType.LOW_RANK: "The weight matrix uses only a few directions: re-initialise it (orthogonal/kaiming), "
                        "lower weight decay, or check for a collapse caused by a too-large learning rate.",
    IssueType.VANISHING_TEMPORAL: "Gradients fade within a few timesteps: use an LSTM/GRU, initialise the forget-gate "
                                  "bias to 1-2, use an orthogonal recurrent initialisation, or shorten the "
                                  "dependency with attention/skip connections through time.",
    IssueType.EXPLODING_TEMPORAL: "Gradients grow through time: clip gradients, lower the recurrent weight scale "
                                  "(spectral radius below 1), or truncate backpropagation through time.",
    IssueType.SHORT_MEMORY: "Inputs more than a few steps back no longer influence the state: raise the recurrent "
                            "spectral radius toward ~1 (orthogonal init), use gated cells with a positive forget "
                            "bias, or add attention over past states.",
    IssueType.SPECTRAL_LOW: "Recurrent dynamics are subcritical (fast forgetting): initialise recurrent weights "
                            "orthogonally or scale them so the spectral radius is near the target.",
    IssueType.SPECTRAL_HIGH: "Recurrent dynamics are supercritical (states and gradients explode): scale the "
                             "recurrent weights down, clip gradients, add layer normalisation in the cell.",
    IssueType.GATE_SATURATION: "Gates are stuck fully open or closed, passing no gradient: lower the weight scale, "
                               "normalise the cell input, check the gate biases.",
    IssueType.LOW_ATTENTION_ENTROPY: "Attention attends to very few positions (sharp softmax): scale the logits by "
                                     "1/sqrt(head_dim), lower the learning rate, add QK-normalisation or "
                                     "attention dropout / logit soft-capping.",
    IssueType.LOW_HEAD_DIVERSITY: "Heads compute the same pattern: they are redundant; prune heads, re-initialise "
                                  "Q/K independently per head, or add head dropout.",
    IssueType.RANK_COLLAPSE: "Token representations become identical with depth (rank collapse): keep residual "
                             "connections intact, prefer pre-norm, and avoid near-uniform attention stacks.",
    IssueType.ATTN_BOTTLENECK: "Most queries send their attention to one key position (an attention sink): check "
                               "padding masks and special tokens, add QK-normalisation, or give the model a "
                               "dedicated sink token.",
    IssueType.FFN_BOTTLENECK: "The feed-forward block loses capacity (too narrow hidden layer or dead hidden units): "
                              "use dim_feedforward of about 4x d_model, GELU instead of ReLU, lower the learning "
                              "rate.",
    IssueType.QKV_IMBALANCE: "Query/key/value projections receive gradients orders of magnitude apart: check the "
                             "Q/K initialisation scale and the 1/sqrt(d) logit scaling; consider QK-normalisation.",
    IssueType.RESIDUAL_DECAY: "The gradient along the residual stream fades toward the input: keep the identity path "
                              "unscaled, prefer pre-norm, and do not gate the residual with a small factor.",
    IssueType.ENTROPY_COLLAPSE: "The policy became near-deterministic and stopped exploring: add or raise the entropy "
                                "bonus, lower the learning rate, clip the policy update (PPO), or reset the "
                                "policy head.",
    IssueType.LOW_EXPLORATION: "The policy explores too little: raise the entropy coefficient or the minimum action "
                               "std, or use epsilon-greedy/noise exploration.",
    IssueType.EXCESSIVE_EXPLORATION: "The policy acts almost at random: lower the entropy bonus or the action std, "
                                     "check that the advantage signal reaches the policy head.",
    IssueType.LOW_ACTION_STD: "The Gaussian policy's std is collapsing: clamp log-std from below, add an entropy "
                              "bonus, or parameterise the std state-independently.",
}


@dataclass(frozen=True)
class FlowIssue:
    """One finding of an analyzer: what, where, how bad, the measured value against its threshold, what to do."""

    issue_type: IssueType
    severity: IssueSeverity
    layer: str
    value: float
    threshold: float
    message: str
    recommendation: str = ""
    step: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The issue type as a lower-case string (the agent's `Issue.kind` convention)."""
        return self.issue_type.value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["issue_type"] = self.issue_type.value
        d["severity"] = self.severity.value
        d["value"] = _clean(self.value)
        d["threshold"] = _clean(self.threshold)
        d["details"] = {k: _jsonable(v) for k, v in self.details.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowIssue:
        return cls(IssueType(d["issue_type"]), IssueSeverity(d["severity"]), d["layer"],
                   float("nan") if d.get("value") is None else float(d["value"]),
                   float("nan") if d.get("threshold") is None else float(d["threshold"]),
                   d.get("message", ""), d.get("recommendation", ""), int(d.get("step", 0)),
                   dict(d.get("details", {})))

    def __str__(self) -> str:
        return f"[{self.severity.value.upper()}] {self.issue_type.value} at {self.layer}: {self.message}"


def recommendation(issue_type: IssueType) -> str:
    """The standard advice for an issue type (the agent's own text for the types its detector shares)."""
    if issue_type in RECOMMENDATIONS:
        return RECOMMENDATIONS[issue_type]
    from ..detect.issues import RECOMMENDATIONS as AGENT_RECOMMENDATIONS

    kind = {v: k for k, v in FROM_AGENT_KIND.items()}.get(issue_type)
    return AGENT_RECOMMENDATIONS.get(kind, "") if kind else ""


def make_issue(issue_type: IssueType, severity: IssueSeverity, layer: str, value: float, threshold: float,
               message: str, step: int = 0, **details: Any) -> FlowIssue:
    """An issue with the standard recommendation of its type."""
    return FlowIssue(issue_type, severity, layer, float(value), float(threshold), message,
                     recommendation(issue_type), step, details)


def sort_issues(issues: list[FlowIssue], layer_order: dict[str, int] | None = None) -> list[FlowIssue]:
    """Most severe first, then in layer order (model-level issues first)."""
    order = layer_order or {}
    return sorted(issues, key=lambda i: (-i.severity.rank, order.get(i.layer, -1), i.issue_type.value))


def filter_issues(issues: list[FlowIssue], *, min_severity: IssueSeverity | str | None = None,
                  types: list[IssueType | str] | None = None, layer: str | None = None) -> list[FlowIssue]:
    """Keep issues at or above `min_severity`, of the given types, whose layer name contains `layer`."""
    out = list(issues)
    if min_severity is not None:
        floor = IssueSeverity(min_severity).rank
        out = [i for i in out if i.severity.rank >= floor]
    if types is not None:
        wanted = {IssueType(t) for t in types}
        out = [i for i in out if i.issue_type in wanted]
    if layer is not None:
        out = [i for i in out if layer.lower() in i.layer.lower()]
    return out


def _agent_thresholds() -> dict[str, float]:
    from ..config import load_default
    return {k: float(v) for k, v in load_default()["thresholds"].items()}


_AGENT_THRESHOLDS = _agent_thresholds()
#: FlowThresholds field -> key of the agent's thresholds: section.
_AGENT_KEYS = {"vanishing": "vanishing", "exploding": "exploding", "dead": "dead_ratio",
               "dead_unit_ratio": "dead_unit_ratio", "unstable_cv": "unstable_cv",
               "saturation_ratio": "saturation_ratio", "stalled_update_ratio": "stalled_update_ratio"}


@dataclass(frozen=True)
class FlowThresholds:
    """Detection thresholds of the gradient-flow detectors. The agent's thresholds (vanishing to stalled)
    default to the `thresholds:` section of default.yaml, the values the live detector and the alerts
    use (seed 003's); the structural ones below them are the analyzers' own."""

    vanishing: float = _AGENT_THRESHOLDS["vanishing"]  # mean per-layer gradient L2 norm ("pressure") below
    exploding: float = _AGENT_THRESHOLDS["exploding"]  # pressure above: EXPLODING
    dead: float = _AGENT_THRESHOLDS["dead_ratio"]  # fraction of exactly-zero gradients/ReLU outputs above: DEAD
    dead_unit_ratio: float = _AGENT_THRESHOLDS["dead_unit_ratio"]  # ReLU-family units that never fired, above
    unstable_cv: float = _AGENT_THRESHOLDS["unstable_cv"]  # coefficient of variation of pressure above: UNSTABLE
    saturation_ratio: float = _AGENT_THRESHOLDS["saturation_ratio"]  # saturated bounded outputs above: SATURATED
    stalled_update_ratio: float = _AGENT_THRESHOLDS["stalled_update_ratio"]  # update/weight ratio below: STALLED
    decay_decades: float = 3.0  # fitted pressure drop from the last to the first parametric layer, in decades
    layer_variance: float = 1.0  # std of the residuals of log10 pressure around the depth trend, in decades
    bottleneck_ratio: float = 6.0  # effective-rank compression (input / output of a layer) at or above: BOTTLENECK
    bottleneck_gain: float = 10.0  # backward gain across a compression layer above: the bottleneck amplifies
    oscillation_coherence: float = -0.5  # mean cosine of successive gradients at or below: OSCILLATION
    circulation_curl: float = 0.8  # turning consistency at or above (with >= half a turn): CIRCULATION
    low_rank_ratio: float = 0.1  # weight effective rank / min(shape) below (enable_jacobian): LOW_RANK

    def replace(self, **changes: Any) -> FlowThresholds:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_config(cls, thresholds: Any) -> FlowThresholds:
        """The agent's `thresholds:` section (a config Section or mapping) as analyzer thresholds."""
        get = thresholds.get if isinstance(thresholds, dict) else lambda k, d=None: getattr(thresholds, k, d)
        return cls(**{name: float(get(key)) for name, key in _AGENT_KEYS.items() if get(key) is not None})

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SEED003 = FlowThresholds()
# Seed 004's table: pressure < 0.01 is vanishing, > 100 exploding.
SEED004 = FlowThresholds(vanishing=0.01, exploding=100.0)


def _clean(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _jsonable(v: Any) -> Any:
    """Plain JSON data (NaN/inf -> None, numpy -> lists, enums -> values)."""
    import numpy as np

    if isinstance(v, Enum):
        return v.value
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _clean(v)
    if v is None or isinstance(v, str):
        return v
    if hasattr(v, "to_dict"):
        return _jsonable(v.to_dict())
    return str(v)


jsonable = _jsonable
