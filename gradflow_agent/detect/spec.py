"""The rule table: every detectable condition, defined once.

Each `Rule` says which statistic of the snapshot it judges (and so which view of the interval: the
mean over its steps, the latest measurement, the streaming window), how it compares with which key of
the `thresholds:` config section, its severity and when that escalates, the alert that carries it and
that alert's `for:`. Everything else reads this table:

- `detect/rules.py` evaluates it on each snapshot (the in-process detector, `agent.issues()`);
- `alerting/rules.py` renders one Prometheus alert per (rule, severity) from it; the alerts fire on the
  agent's own verdict (`gradflow_issue{kind, severity}`), so an alert fires exactly where, and with the
  severity with which, the detector reports the issue (no second copy of the logic in PromQL);
- `alerting/dashboards.py` draws the thresholds from it, the offline analyzers take their thresholds
  and severities from it, and `detect/health.py` turns the issues into the one health score.
"""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Condition:
    """`statistic` `op` `thresholds.<threshold>`; critical when beyond `critical_at` (an absolute
    value) or beyond the threshold scaled by `critical_factor` (x for "above", / for "below")."""

    statistic: str
    op: str  # "above" | "below"
    threshold: str  # key of the thresholds: section
    critical_at: float | None = None
    critical_factor: float | None = None

    def holds(self, value: float, threshold: float) -> bool:
        """NaN (no data) never holds."""
        if value != value:
            return False
        return value > threshold if self.op == "above" else value < threshold

    def critical(self, value: float, threshold: float) -> bool:
        if self.critical_at is not None:
            return value >= self.critical_at if self.op == "above" else value <= self.critical_at
        if self.critical_factor is not None:
            return (value > threshold * self.critical_factor if self.op == "above"
                    else value < threshold / self.critical_factor)
        return False


@dataclass(frozen=True)
class Rule:
    kind: str  # the issue kind (`Issue.kind`, `gradflow_issue{kind}`)
    alert: str  # the Prometheus alert carrying it
    conditions: tuple[Condition, ...]  # any of them (the first one holding is reported)
    severity: str  # severity when a condition holds and does not escalate
    for_: str  # the alert's `for:`
    view: str  # which view of the interval is judged (documentation and runbooks)
    summary: str  # alert summary / issue title
    requires: str | None = None  # judged only where this statistic is known (e.g. ReLU-family layers)
    warmup: bool = True  # silent for the first thresholds.warmup_steps steps

    @property
    def severities(self) -> tuple[str, ...]:
        """Every severity this rule can report, lowest first."""
        escalates = any(c.critical_at is not None or c.critical_factor is not None for c in self.conditions)
        found = {self.severity} | ({"critical"} if escalates else set())
        return tuple(s for s in SEVERITIES if s in found)


RULES: tuple[Rule, ...] = (
    Rule("vanishing", "GradientVanishing",
         (Condition("grad_pressure", "below", "vanishing", critical_factor=100.0),),
         "warning", "10m", "mean gradient pressure over the interval's steps",
         "Vanishing gradients"),
    Rule("exploding", "GradientExploding",
         (Condition("grad_pressure", "above", "exploding"),),
         "critical", "2m", "mean gradient pressure over the interval's steps",
         "Exploding gradients"),
    Rule("dead", "DeadNeurons",
         (Condition("activation_dead_unit_ratio", "above", "dead_unit_ratio", critical_at=0.99),
          Condition("activation_zero_ratio", "above", "dead_ratio", critical_at=0.999)),
         "warning", "10m", "units that never fired over the last complete window; exact zeros over the interval",
         "Dead neurons", requires="activation_dead_unit_ratio"),
    Rule("nonfinite", "NonFiniteValues", (), "critical", "0s",
         "NaN/Inf counts since the start of the run; attributed to where and when the first appeared",
         "Non-finite values", warmup=False),
    Rule("unstable", "GradientUnstable",
         (Condition("grad_turbulence", "above", "unstable_cv"),),
         "warning", "5m", "coefficient of variation of the pressure over the streaming window",
         "Unstable gradients"),
    Rule("saturated", "ActivationSaturation",
         (Condition("activation_saturation_ratio", "above", "saturation_ratio"),),
         "warning", "10m", "fraction of saturated outputs over the interval",
         "Saturated activations"),
    Rule("stalled", "TrainingStalled",
         (Condition("update_ratio_last", "below", "stalled_update_ratio"),),
         "warning", "10m", "the latest measured update-to-weight ratio (a learning rate that drops to zero "
         "within an interval is seen at once)",
         "Training has stalled"),
    # Plug-in statistics (snapshot.PLUGIN_STATS), on the attention / router layers the plug-ins report; a
    # layer with no measurement yet is NaN: never judged, and without a health score.
    Rule("attention_collapse", "AttentionCollapse",
         (Condition("attention_entropy", "below", "attention_collapse_entropy", critical_at=0.02),
          Condition("attention_max_prob", "above", "attention_collapse_max_prob", critical_at=0.99)),
         "warning", "5m", "mean over the sampled query rows of the interval's attention calls (the last "
         "interval with a call)",
         "Attention has collapsed"),
    Rule("expert_imbalance", "ExpertLoadImbalance",
         (Condition("moe_load_imbalance_ratio", "above", "expert_imbalance", critical_at=0.9),),
         "warning", "10m", "expert loads over the latest complete routing window (the export interval, "
         "extended to stats.moe.min_assignments_per_expert assignments per expert)",
         "Mixture-of-experts load imbalance"),
    Rule("dead_experts", "DeadExperts",
         (Condition("moe_dead_expert_ratio", "above", "dead_expert_ratio", critical_at=0.5),),
         "warning", "10m", "experts that received no token over the latest complete routing window",
         "Dead experts"),
)

BY_KIND = {rule.kind: rule for rule in RULES}
KINDS = tuple(rule.kind for rule in RULES)


def rule(kind: str) -> Rule:
    return BY_KIND[kind]


def severity_rank(severity: str) -> int:
    """0 for info, 1 warning, 2 critical: for sorting and for the worst of several issues."""
    return SEVERITIES.index(severity)
