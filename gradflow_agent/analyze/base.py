"""Shared vocabulary of the offline analyzers: issue types, severities, the issue record, thresholds.

The analyzers never measure anything the agent already measures: they attach the agent, read its
per-step snapshots, and add only what a live monitor cannot afford (effective ranks, attention maps,
gradients through time). Everything here is plain data: computing and displaying stay separate.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # type-only (never executed): report.flow_report imports this module
    from torch import nn

    from ..report.flow_report import FlowReport

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
# The severity map itself is analyze/health.py's (SEVERITY_FROM_AGENT / SEVERITY_TO_AGENT); `_missing_` above
# accepts the same names (tests/analyze/test_contract.py checks they agree).


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
    """The analyzers' standard advice for an issue type. The types the agent's rule table shares (vanishing,
    dead, ...) carry the agent's own text, filled in where those issues are made (detectors.py: this module
    stays free of the agent's packages, which import it)."""
    return RECOMMENDATIONS.get(issue_type, "")


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
    """Every threshold of every analyzer, in one place. The agent's (vanishing to stalled) default to the
    `thresholds:` section of default.yaml - the rule table's keys, the values the live detector and the alerts
    use; the rest are the analyzers' own structural thresholds (no live counterpart). Analyzers take them only
    from here (`thresholds=` a FlowThresholds or a `thresholds:` mapping, plus keyword overrides)."""

    vanishing: float = _AGENT_THRESHOLDS["vanishing"]  # absolute floor of pressure (the rule table's): VANISHING
    exploding: float = _AGENT_THRESHOLDS["exploding"]  # pressure above: EXPLODING
    dead: float = _AGENT_THRESHOLDS["dead_ratio"]  # fraction of exactly-zero gradients/ReLU outputs above: DEAD
    dead_unit_ratio: float = _AGENT_THRESHOLDS["dead_unit_ratio"]  # ReLU-family units that never fired, above
    unstable_cv: float = _AGENT_THRESHOLDS["unstable_cv"]  # coefficient of variation of pressure above: UNSTABLE
    saturation_ratio: float = _AGENT_THRESHOLDS["saturation_ratio"]  # saturated bounded outputs above: SATURATED
    stalled_update_ratio: float = _AGENT_THRESHOLDS["stalled_update_ratio"]  # update/weight ratio below: STALLED
    # relative vanishing: pressure below this fraction of the median pressure of the model's parametric layers
    vanishing_relative: float = 1e-3
    decay_decades: float = 3.0  # fitted pressure drop from the last to the first parametric layer, in decades
    layer_variance: float = 1.0  # std of the residuals of log10 pressure around the depth trend, in decades
    bottleneck_ratio: float = 6.0  # effective-rank compression (input / output of a layer) at or above: BOTTLENECK
    bottleneck_gain: float = 10.0  # backward gain across a compression layer above: the bottleneck amplifies
    oscillation_coherence: float = -0.5  # mean cosine of successive gradients at or below: OSCILLATION
    circulation_curl: float = 0.8  # turning consistency at or above (with >= half a turn): CIRCULATION
    low_rank_ratio: float = 0.1  # weight / hidden-state effective rank over its dimension below: LOW_RANK
    # recurrent (seed 003 / 004)
    optimal_radius: float = 0.9  # target spectral radius of the recurrent dynamics
    critical_band: float = 0.15  # |radius - optimal_radius| beyond: SPECTRAL_LOW / SPECTRAL_HIGH
    min_memory: float = 10.0  # effective memory length below (timesteps): SHORT_MEMORY
    temporal_decay_warning: float = 0.1  # |decay rate| above (nats per timestep): VANISHING/EXPLODING_TEMPORAL
    temporal_decay_critical: float = 0.3  # |decay rate| above: HIGH
    gate_saturation: float = 0.5  # share of saturated sigmoid gate values above: GATE_SATURATION
    # attention
    min_attention_entropy: float = 0.5  # normalised attention entropy below: LOW_ATTENTION_ENTROPY
    min_head_diversity: float = 0.3  # head diversity below: LOW_HEAD_DIVERSITY
    attention_sink: float = 0.5  # share of a head's attention on one key above: ATTN_BOTTLENECK
    qkv_imbalance: float = 100.0  # max/min Q/K/V gradient norm above: QKV_IMBALANCE
    residual_decay: float = 0.1  # first/last block residual gradient ratio below: RESIDUAL_DECAY
    ffn_dead: float = 0.5  # share of FFN hidden units that never fire above: FFN_BOTTLENECK
    # policies
    min_policy_entropy: float = 0.5  # normalised policy entropy below: ENTROPY_COLLAPSE / LOW_EXPLORATION
    min_action_std: float = 0.1  # mean Gaussian action std below: LOW_ACTION_STD
    max_action_std: float = 2.0  # mean Gaussian action std above: EXCESSIVE_EXPLORATION
    max_policy_entropy: float = math.inf  # normalised policy entropy above: EXCESSIVE_EXPLORATION (off)
    entropy_collapse_drop: float = 0.5  # relative entropy drop during the analysis above: ENTROPY_COLLAPSE

    def replace(self, **changes: Any) -> FlowThresholds:
        return replace(self, **{k: float(v) for k, v in changes.items() if v is not None})

    @classmethod
    def from_config(cls, thresholds: Any) -> FlowThresholds:
        """The agent's `thresholds:` section (a config Section or mapping) as analyzer thresholds; analyzer-own
        keys (the field names above) are read too when present."""
        get = thresholds.get if isinstance(thresholds, dict) else lambda k, d=None: getattr(thresholds, k, d)
        keys = {**{f.name: f.name for f in fields(cls)}, **_AGENT_KEYS}
        return cls(**{name: float(get(key)) for name, key in keys.items() if get(key) is not None})

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_thresholds(thresholds: FlowThresholds | Mapping[str, Any] | None = None,
                       **overrides: float | None) -> FlowThresholds:
    """The one way an analyzer gets its thresholds: a FlowThresholds, or a `thresholds:` config mapping (the
    rule table's keys), or None for default.yaml's; then keyword overrides (None = keep)."""
    if thresholds is None:
        base = FlowThresholds()
    elif isinstance(thresholds, FlowThresholds):
        base = thresholds
    else:
        base = FlowThresholds.from_config(thresholds)
    unknown = set(overrides) - {f.name for f in fields(FlowThresholds)}
    if unknown:
        raise TypeError(f"unknown threshold(s): {', '.join(sorted(unknown))}")
    return base.replace(**overrides)


#: default.yaml's thresholds (seed 003's table); kept as a name for existing user code.
SEED003 = FlowThresholds()
#: Seed 004's absolute table (pressure < 0.01 vanishing, > 100 exploding). No analyzer defaults to it any more:
#: an absolute 0.01 flags healthy fresh transformers (their Q/K and norm gradients sit near 0.01); the offline
#: VANISHING is the rule table's floor plus `vanishing_relative` (docs/analyzers.md).
SEED004 = FlowThresholds(vanishing=0.01, exploding=100.0)


# -- the one analyzer contract --------------------------------------------------------------------------------
LossFn = Callable[..., Any]


class Analyzer(ABC):
    """The contract every analyzer implements (captum-style: one call shape for every algorithm)::

        report = SomeAnalyzer(...options...).analyze(model, inputs, loss_fn=..., targets=..., steps=...)

    - `model`: the nn.Module to analyse (None: the one given to the constructor);
    - `inputs`: what the model is called with (a tensor, a tuple -> model(*x), a dict -> model(**x)), or a
      zero-argument callable returning fresh inputs on each step;
    - `loss_fn`: loss_fn(output) without targets, loss_fn(output, targets) with them; None uses `output.loss`
      (Hugging Face models given labels) or the output itself when it is a scalar tensor;
    - `targets`: passed to loss_fn (None: no targets);
    - `steps`: forward/backward passes (None: the analyzer's `default_steps`);
    - returns a FlowReport; analyzer-specific results are its typed `results` (and rendered `sections`).

    Thresholds come only from FlowThresholds (`resolve_thresholds`), severities from detect/spec through
    analyze/health.py's map, hooks only from gradflow_agent.hooks.add_module_hook."""

    default_steps: ClassVar[int] = 10
    analyzer_name: ClassVar[str] = "Analyzer"

    @abstractmethod
    def analyze(self, model: nn.Module | None = None, inputs: Any = None, *, loss_fn: LossFn | None = None,
                targets: Any = None, steps: int | None = None, title: str | None = None) -> FlowReport:
        """Analyse `model` on `inputs`; see the class docstring."""


def contract_call(args: tuple[Any, ...], kwargs: dict[str, Any], legacy_keywords: frozenset[str]) -> bool:
    """Whether a call to a seed class's `analyze` uses the contract's shape (model first, at most two
    positionals, no legacy keyword) rather than that seed's documented shape."""
    if len(args) > 2 or legacy_keywords & set(kwargs):
        return False
    first = args[0] if args else kwargs.get("model")
    return first is None or _is_module(first)


def _is_module(obj: Any) -> bool:
    """An nn.Module, recognised without importing torch here (base.py stays light)."""
    return any(c.__module__ == "torch.nn.modules.module" and c.__name__ == "Module" for c in type(obj).__mro__)


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
