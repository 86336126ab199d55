"""Prometheus recording and alert rules rendered from the rule table (`detect/spec.py`).

Design: the alerts fire on the agent's own verdict, which the in-process detector computes from the
rule table on every snapshot, over every layer, with the interval views (mean, latest, window) the
table names, NaN handling, warm-up and severity escalation. PromQL only routes it, so no condition
exists twice (the thresholds still come from the config the agent runs with).

**One page per incident.** The agent exports, per run and rank, how many layers each (kind, severity)
flags (`gradflow_issue_layers`) and the first and the worst flagged layer with the judged value
(`gradflow_issue_extreme`), exact over every layer whatever the series budget. The recording group
reduces these, and the depth profile, per run (`gradflow_run:*`: over ranks and instances); the
alerts read only those recorded series. So a fault of all 1000 layers on 8 ranks is one alert per
kind per run (the warning alert stands down while the same kind is critical), carrying the number of
layers and the first and worst layer in its annotations, and a global Prometheus that federates the
`job_run:gradflow_*` series (deploy/prometheus/federation) evaluates the very same alerts. Per-layer
detail lives in the dashboards. `GradflowAgentDown` (on `up`) and `TrainingHung` stay per target.

`gradflow-agent rules --config FILE [--format prometheus|k8s]` writes the file; the checked-in
`deploy/prometheus/rules/gradflow-alerts.yml` is the output for `config/default.yaml`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from gradflow_agent.config import Section, load_config
from gradflow_agent.detect.spec import RULES, Rule, severity_rank

#: Where the runbooks are published; `docs/runbooks/<Alert>.md` in the repository.
RUNBOOK_BASE_URL = "https://github.com/gradflow-agent/gradflow-agent/blob/main/docs/runbooks"
#: Scrape jobs whose `up` series belong to gradflow agents (the shipped scrape configs match it; a
#: prometheus-operator PodMonitor names its job `<namespace>/<name>`).
DEFAULT_JOB_REGEX = ".*gradflow.*"
GROUP_NAME = "gradflow-agent"
RECORDS_GROUP_NAME = "gradflow-agent-records"

RUN_LABELS = ("job", "instance", "run", "rank")  # one training process
JOB_RUN = ("job", "run")  # one run, over its ranks and instances: what a per-run alert is about

#: How a gauge's value is printed in annotations: 3 significant digits.
VALUE = '{{ printf "%.3g" $value }}'


@dataclass(frozen=True)
class AlertSpec:
    """One shipped alert name: the issue kind it carries, its severities and `for:` duration."""

    name: str
    kind: str
    severities: tuple[str, ...]
    for_: str

    @property
    def severity(self) -> str:
        """The lowest severity it fires with."""
        return self.severities[0]


#: The shipped alerts, in file order (one rule per severity of each).
ALERTS: tuple[AlertSpec, ...] = (
    *(AlertSpec(r.alert, r.kind, r.severities, r.for_) for r in RULES),
    AlertSpec("GradflowAgentDown", "agent_down", ("warning",), "5m"),
    AlertSpec("TrainingHung", "hung", ("critical",), "5m"),
    AlertSpec("TrainingStraggler", "straggler", ("warning",), "5m"),
)
#: How long a served run may go without an optimizer step before TrainingHung (plus its `for:`).
DEFAULT_HUNG_AFTER = "10m"


def _by(labels) -> str:
    return ", ".join(labels)


def _extreme(kind: str, which: str) -> str:
    """Go template: '<layer> (<value>)' of the run's first or worst layer flagged with `kind`."""
    query = (f'printf `{RUN_ISSUE_EXTREME}{{job="%s", run="%s", kind="{kind}", which="{which}"}}` '
             "$labels.job $labels.run")
    return (f"{{{{ with query ({query}) }}}}{{{{ with first . }}}}{{{{ .Labels.layer }}}} "
            f'({{{{ printf "%.3g" .Value }}}}){{{{ end }}}}{{{{ end }}}}')


#: The recorded per-run series the alerts (and the dashboards' overview) read.
RUN_ISSUE_LAYERS = "job_run:gradflow_issue_layers:max"
RUN_ISSUE_EXTREME = "job_run:gradflow_issue_extreme:max"


def recording_rules() -> list[dict[str, Any]]:
    """Per-run reductions: over ranks and instances of a run, kept small enough to federate."""
    by_run = _by(JOB_RUN)
    return [
        {"record": RUN_ISSUE_LAYERS,
         "expr": f"max by ({by_run}, kind, severity) (gradflow_issue_layers)"},
        {"record": RUN_ISSUE_EXTREME,
         "expr": f"max by ({by_run}, kind, which, layer) (gradflow_issue_extreme)"},
        {"record": "job_run:gradflow_depth_profile:min",
         "expr": f'min by ({by_run}, statistic, bin) (gradflow_depth_profile{{agg="min"}})'},
        {"record": "job_run:gradflow_depth_profile:max",
         "expr": f'max by ({by_run}, statistic, bin) (gradflow_depth_profile{{agg="max"}})'},
        {"record": "job_run:gradflow_layer_worst:min",
         "expr": f'min by ({by_run}, statistic) (gradflow_depth_profile{{agg="min"}})'},
        {"record": "job_run:gradflow_layer_worst:max",
         "expr": f'max by ({by_run}, statistic) (gradflow_depth_profile{{agg="max"}})'},
        {"record": "job_run:gradflow_steps:rate5m",
         "expr": f"max by ({by_run}) (rate(gradflow_steps_total[5m]))"},
        {"record": "job_run:gradflow_grad_norm:max", "expr": f"max by ({by_run}) (gradflow_grad_norm)"},
        {"record": "job_run:gradflow_loss:avg", "expr": f"avg by ({by_run}) (gradflow_loss)"},
        {"record": "job_run:gradflow_ranks:count", "expr": f"count by ({by_run}) (gradflow_steps_total)"},
        {"record": "job_run:gradflow_forward_seconds:max", "expr": f"max by ({by_run}) (gradflow_forward_seconds)"},
        {"record": "job_run:gradflow_forward_seconds:median",
         "expr": f"quantile by ({by_run}) (0.5, gradflow_forward_seconds)"},
        {"record": "job_run_rank:gradflow_forward_seconds:max",
         "expr": f"max by ({by_run}, rank) (gradflow_forward_seconds)"},
    ]


def _condition_text(rule: Rule, th: Section) -> str:
    """The rule's condition as people read it, with this config's thresholds."""
    parts = []
    for c in rule.conditions:
        sign = ">" if c.op == "above" else "<"
        parts.append(f"{c.statistic} {sign} thresholds.{c.threshold} = {float(th[c.threshold]):g}")
    return " or ".join(parts) if parts else "a NaN/Inf value was counted"


def _escalation_text(rule: Rule, th: Section) -> str:
    parts = []
    for c in rule.conditions:
        sign = ">=" if c.op == "above" else "<="
        if c.critical_at is not None:
            parts.append(f"{c.statistic} {sign} {c.critical_at:g}")
        elif c.critical_factor is not None:
            bound = float(th[c.threshold]) * c.critical_factor if c.op == "above" else \
                float(th[c.threshold]) / c.critical_factor
            parts.append(f"{c.statistic} {sign[0]} {bound:g}")
    return " or ".join(parts)


def _alert(rule: Rule, severity: str, th: Section, runbook_base: str) -> dict[str, Any]:
    count = f'{RUN_ISSUE_LAYERS}{{kind="{rule.kind}", severity="{severity}"}} > 0'
    expr = count + "\n"
    worse = [s for s in rule.severities if severity_rank(s) > severity_rank(severity)]
    for higher in worse:  # one page per incident: the higher severity stands in for this one
        expr += (f"unless on ({_by(JOB_RUN)})\n"
                 f'  {RUN_ISSUE_LAYERS}{{kind="{rule.kind}", severity="{higher}"}} > 0\n')
    condition = _condition_text(rule, th)
    if severity == "critical" and severity != rule.severity:
        condition += f", critical when {_escalation_text(rule, th)}"
    layers = '{{ printf "%.0f" $value }}'
    description = (f"The in-process detector flags {layers} layer(s) of run {{{{ $labels.run }}}} "
                   f"(job {{{{ $labels.job }}}}) as {rule.kind} ({severity}): {condition} (judged on the "
                   f"{rule.view}). First: {_extreme(rule.kind, 'first')}; worst: {_extreme(rule.kind, 'worst')}. "
                   f"Per-layer detail: the gradflow-layers dashboard, or `gradflow-agent top`.")
    return {
        "alert": rule.alert,
        "expr": expr,
        "for": rule.for_,
        "labels": {"severity": severity, "kind": rule.kind},
        "annotations": {
            "summary": f"{rule.summary} in {layers} layer(s) of run {{{{ $labels.run }}}}",
            "description": description,
            "runbook_url": f"{runbook_base.rstrip('/')}/{rule.alert}.md",
        },
    }


def _agent_down(runbook_base: str, job_regex: str, alert_absent: bool) -> dict[str, Any]:
    down = f'max by (job, instance) (up{{job=~"{job_regex}"}}) == 0'
    if alert_absent:
        down += f'\nor\nabsent(up{{job=~"{job_regex}"}})'
    return {
        "alert": "GradflowAgentDown",
        "expr": down + "\n",
        "for": "5m",
        "labels": {"severity": "warning", "kind": "agent_down"},
        "annotations": {
            "summary": "{{ if $labels.instance }}gradflow agent {{ $labels.instance }} is down"
                       "{{ else }}No gradflow agent is scraped{{ end }}",
            "description": "{{ if $labels.instance }}Prometheus cannot scrape the gradflow agent at "
                           "{{ $labels.instance }} (job {{ $labels.job }}){{ else }}No scrape target matches "
                           f'job=~"{job_regex}"{{{{ end }}}}: the training process exited or hangs, its metrics '
                           "port is unreachable, or service discovery lost it.",
            "runbook_url": f"{runbook_base.rstrip('/')}/GradflowAgentDown.md",
        },
    }


def _training_hung(runbook_base: str, hung_after: str) -> dict[str, Any]:
    """The process serves its metrics (up) but its step counter stopped: a collective hang, a deadlocked
    data loader, a stuck checkpoint write. The agent cannot see this itself: no step, no snapshot. A run
    whose series is younger than the window is not judged (its first steps may still be coming)."""
    return {
        "alert": "TrainingHung",
        "expr": (f"max by ({_by(RUN_LABELS)}) (changes(gradflow_steps_total[{hung_after}])) == 0\n"
                 f"and on ({_by(RUN_LABELS)})\n"
                 f"  max by ({_by(RUN_LABELS)}) (gradflow_steps_total offset {hung_after})\n"
                 f"and on (job, instance)\n"
                 f"  max by (job, instance) (up) == 1\n"),
        "for": "5m",
        "labels": {"severity": "critical", "kind": "hung"},
        "annotations": {
            "summary": "Training of run {{ $labels.run }} (rank {{ $labels.rank }}) has stopped stepping",
            "description": f"{{{{ $labels.instance }}}} still serves its metrics, but gradflow_steps_total of run "
                           f"{{{{ $labels.run }}}}, rank {{{{ $labels.rank }}}} has not advanced for {hung_after}: "
                           "a hung collective, a deadlocked data loader or a stuck checkpoint write.",
            "runbook_url": f"{runbook_base.rstrip('/')}/TrainingHung.md",
        },
    }


def _training_straggler(th: Section, runbook_base: str) -> dict[str, Any]:
    """One rank's forward pass (compute no collective waits for) takes longer than the run's median by
    `thresholds.straggler_skew`: the whole job runs at that rank's pace. Lockstep makes step times equal,
    so step time cannot show it (stats/pace.py)."""
    skew = float(th.straggler_skew)
    slowest = ('{{ with query (printf `topk(1, job_run_rank:gradflow_forward_seconds:max{job="%s", run="%s"})` '
               "$labels.job $labels.run) }}{{ with first . }}{{ .Labels.rank }}{{ end }}{{ end }}")
    median = ('{{ with query (printf `job_run:gradflow_forward_seconds:median{job="%s", run="%s"}` '
              '$labels.job $labels.run) }}{{ with first . }}{{ printf "%.3g" .Value }}{{ end }}{{ end }}')
    return {
        "alert": "TrainingStraggler",
        "expr": (f"job_run:gradflow_forward_seconds:max\n"
                 f"  > {1 + skew:g} * job_run:gradflow_forward_seconds:median\n"
                 f"and on ({_by(JOB_RUN)})\n"
                 f"  job_run:gradflow_ranks:count > 1\n"),
        "for": "5m",
        "labels": {"severity": "warning", "kind": "straggler"},
        "annotations": {
            "summary": f"Rank {slowest} of run {{{{ $labels.run }}}} is a straggler",
            "description": (f"The forward pass of rank {slowest} of run {{{{ $labels.run }}}} "
                            f"(job {{{{ $labels.job }}}}) "
                            f'takes {{{{ printf "%.3g" $value }}}} s against a median of {median} s over the ranks '
                            f"(thresholds.straggler_skew = {skew:g}): every rank waits for it in the gradient "
                            "collectives. A slow or throttled device, a noisy neighbour, an unbalanced batch or "
                            "data loader on that rank."),
            "runbook_url": f"{runbook_base.rstrip('/')}/TrainingStraggler.md",
        },
    }


def _alert_rules(th: Section, runbook_base: str, job_regex: str, alert_absent: bool,
                 hung_after: str = DEFAULT_HUNG_AFTER) -> list[dict[str, Any]]:
    rules = [_alert(rule, severity, th, runbook_base) for rule in RULES for severity in rule.severities]
    rules.append(_agent_down(runbook_base, job_regex, alert_absent))
    rules.append(_training_hung(runbook_base, hung_after))
    rules.append(_training_straggler(th, runbook_base))
    return rules


def build_rule_groups(config: Section | Mapping[str, Any] | str | os.PathLike | None = None, *,
                      runbook_base_url: str = RUNBOOK_BASE_URL, job_regex: str = DEFAULT_JOB_REGEX,
                      alert_absent: bool = False, hung_after: str = DEFAULT_HUNG_AFTER) -> list[dict[str, Any]]:
    """The rule groups (as plain data) for `config`'s thresholds.

    `alert_absent` adds `absent(up{job=~job_regex})` to GradflowAgentDown: off by default because
    training jobs come and go, so "no target at all" is normal between runs.
    """
    cfg = config if isinstance(config, Section) else load_config(config)
    return [{"name": RECORDS_GROUP_NAME, "rules": recording_rules()},
            {"name": GROUP_NAME,
             "rules": _alert_rules(cfg.thresholds, runbook_base_url, job_regex, alert_absent, hung_after)}]


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as `|` literals, no aliases: the output is read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000,
                     allow_unicode=True)


def _header(source: str) -> str:
    return (f"# Generated by `gradflow-agent rules` from {source}; do not edit by hand.\n"
            f"# The alerts page once per run on the in-process detector's verdict (gradflow_issue_layers,\n"
            f"# reduced per run by the recording group), computed from the rule table\n"
            f"# (gradflow_agent/detect/spec.py) with the config's `thresholds:`. Regenerate after changing either.\n")


def render_prometheus(groups: list[dict[str, Any]], source: str = "config/default.yaml") -> str:
    """A Prometheus rule file (`rule_files:`), as YAML text."""
    return _header(source) + _dump({"groups": groups})


def render_k8s(groups: list[dict[str, Any]], source: str = "config/default.yaml", *,
               name: str = "gradflow-alerts", namespace: str | None = None) -> str:
    """A prometheus-operator `PrometheusRule` resource holding the same groups, as YAML text."""
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {
        "app.kubernetes.io/name": "gradflow-agent",
        "app.kubernetes.io/component": "alerting",
        "role": "alert-rules",
    }
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": {"groups": groups},
    }
    return _header(source) + _dump(resource)
