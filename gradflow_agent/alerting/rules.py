"""Prometheus recording and alerting rules built from the config's `thresholds:` section.

The in-process detectors and these rules read the same thresholds, so the rule file is generated, never
hand-edited: `gradflow-agent rules --config FILE [--format prometheus|k8s]` writes it, and the checked-in
`deploy/prometheus/rules/gradflow-alerts.yml` is the output for `config/default.yaml`.

Conventions the rules keep (the promtool unit tests in `deploy/prometheus/tests/` pin them down):
- every per-layer alert aggregates with an explicit `by (job, instance, run, rank, layer)`, so extra
  target labels (pod, namespace, user labels) never split or duplicate an alert;
- threshold alerts stay silent until the run is past `thresholds.warmup_steps` optimizer steps, like the
  in-process detectors;
- NaN never satisfies a comparison, so non-finite values are alerted from the `gradflow_nonfinite_total`
  counters (including a counter that is already non-zero at its first scrape), never from a threshold
  on a gauge. A NaN gauge alone is no alert either: the agent exports a NaN `gradflow_loss` for an
  interval in which no loss was given, so `gradflow_loss != gradflow_loss` would also mean "no data".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from gradflow_agent.config import Section, load_config

#: Where the runbooks are published; `docs/runbooks/<Alert>.md` in the repository.
RUNBOOK_BASE_URL = "https://github.com/gradflow-agent/gradflow-agent/blob/main/docs/runbooks"
#: Scrape jobs whose `up` series belong to gradflow agents (the shipped scrape configs match it; a
#: prometheus-operator PodMonitor names its job `<namespace>/<name>`).
DEFAULT_JOB_REGEX = ".*gradflow.*"
GROUP_NAME = "gradflow-agent"

RUN_LABELS = ("job", "instance", "run", "rank")
LAYER_LABELS = (*RUN_LABELS, "layer")

#: Recording rules (level:metric:operations).
PAST_WARMUP = "run_rank:gradflow_steps_total:past_warmup"
NONFINITE_NEW = "layer_tensor:gradflow_nonfinite_total:new5m"

#: How a gauge's value is printed in annotations: 3 significant digits, scientific when small or large.
VALUE = '{{ printf "%.3g" $value }}'

#: The window in which a non-finite event keeps NonFiniteValues firing.
NONFINITE_WINDOW = "5m"


@dataclass(frozen=True)
class AlertSpec:
    """One shipped alert: its name, the issue kind it mirrors, severity and `for:` duration."""

    name: str
    kind: str
    severity: str
    for_: str


#: The shipped alerts, in file order. `kind` is the in-process detector's issue kind (`gradflow_issue`).
ALERTS: tuple[AlertSpec, ...] = (
    AlertSpec("GradientVanishing", "vanishing", "warning", "10m"),
    AlertSpec("GradientExploding", "exploding", "critical", "2m"),
    AlertSpec("DeadNeurons", "dead", "warning", "10m"),
    AlertSpec("NonFiniteValues", "nonfinite", "critical", "0s"),
    AlertSpec("GradientUnstable", "unstable", "info", "5m"),
    AlertSpec("ActivationSaturation", "saturated", "warning", "10m"),
    AlertSpec("TrainingStalled", "stalled", "warning", "10m"),
    AlertSpec("GradflowAgentDown", "agent_down", "warning", "5m"),
)


def _num(value: float) -> str:
    """A threshold as a PromQL literal: exact (`repr`) and without a noisy trailing `.0`."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _pct(ratio: float) -> str:
    """A ratio threshold as people read it in an annotation (0.5 -> 50%)."""
    return f"{float(ratio) * 100:g}%"


def _by(labels: Sequence[str]) -> str:
    return ", ".join(labels)


def _max_by_layer(metric: str) -> str:
    return f"max by ({_by(LAYER_LABELS)}) ({metric})"


def _past_warmup(expr: str) -> str:
    """`expr`, kept only for runs past the detectors' warm-up (comparisons bind tighter than `and`)."""
    if "\n" in expr:
        expr = "(\n  " + expr.replace("\n", "\n  ") + "\n)"
    return f"{expr}\nand on ({_by(RUN_LABELS)})\n  {PAST_WARMUP}\n"


def _where() -> str:
    return "layer {{ $labels.layer }} (run {{ $labels.run }}, rank {{ $labels.rank }}, {{ $labels.instance }})"


def _recording_rules(th: Section) -> list[dict[str, Any]]:
    warmup = int(th.warmup_steps)
    return [
        {
            "record": PAST_WARMUP,
            # One series per run and rank, present only once the detectors' warm-up is over; every
            # threshold alert joins on it (cheaper than repeating the aggregation in each alert).
            "expr": f"max by ({_by(RUN_LABELS)}) (gradflow_steps_total) > {warmup}\n",
        },
        {
            "record": NONFINITE_NEW,
            # NaN/Inf elements counted in the last 5 minutes. The second branch catches a counter that
            # is already non-zero at its first scrape, for which increase() is 0.
            "expr": (
                f"sum by ({_by(LAYER_LABELS)}, tensor) (\n"
                f"    increase(gradflow_nonfinite_total[{NONFINITE_WINDOW}]) > 0\n"
                f"  or\n"
                f"    (gradflow_nonfinite_total > 0 unless gradflow_nonfinite_total offset {NONFINITE_WINDOW})\n"
                f")\n"
            ),
        },
    ]


def _alert(spec: AlertSpec, expr: str, summary: str, description: str, runbook_base: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": spec.name, "expr": expr, "for": spec.for_}
    rule["labels"] = {"severity": spec.severity, "kind": spec.kind}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": f"{runbook_base.rstrip('/')}/{spec.name}.md",
    }
    return rule


def _text(template: str, **values: str) -> str:
    """An annotation: Go template text (`{{ $labels.layer }}`) with `%(name)s` filled in here."""
    return template % {"where": _where(), "value": VALUE, **values}


def _alert_rules(th: Section, runbook_base: str, job_regex: str, alert_absent: bool) -> list[dict[str, Any]]:
    specs = {a.name: a for a in ALERTS}
    in_layer = "in layer {{ $labels.layer }} (run {{ $labels.run }})"
    rules = []

    rules.append(_alert(
        specs["GradientVanishing"],
        _past_warmup(f"{_max_by_layer('gradflow_grad_pressure')} < {_num(th.vanishing)}"),
        "Vanishing gradients " + in_layer,
        _text("The gradient pressure (mean per-step L2 norm of the parameter gradient) of %(where)s is "
              "%(value)s, below the vanishing threshold %(t)s: the layer barely learns.", t=_num(th.vanishing)),
        runbook_base))

    rules.append(_alert(
        specs["GradientExploding"],
        _past_warmup(f"{_max_by_layer('gradflow_grad_pressure')} > {_num(th.exploding)}"),
        "Exploding gradients " + in_layer,
        _text("The gradient pressure of %(where)s is %(value)s, above the exploding threshold %(t)s; "
              "non-finite values usually follow.", t=_num(th.exploding)),
        runbook_base))

    dead_units = _max_by_layer("gradflow_activation_dead_unit_ratio")
    zeros = _max_by_layer("gradflow_activation_zero_ratio")
    rules.append(_alert(
        specs["DeadNeurons"],
        _past_warmup(
            f"{dead_units} > {_num(th.dead_unit_ratio)}\n"
            f"or\n"
            f"(\n  {zeros} > {_num(th.dead_ratio)}\n"
            f"  and on ({_by(LAYER_LABELS)})\n"
            f"  gradflow_activation_dead_unit_ratio\n)"),
        "Dead neurons " + in_layer,
        _text("{{ $value | humanizePercentage }} of the units of %(where)s never fired over the window "
              "(threshold %(units)s), or of its outputs are exactly zero (threshold %(zeros)s): those units "
              "pass no gradient.", units=_pct(th.dead_unit_ratio), zeros=_pct(th.dead_ratio)),
        runbook_base))

    new = f"{NONFINITE_NEW} > 0"
    origin = f'{new} and on ({_by(LAYER_LABELS)}) gradflow_issue{{kind="nonfinite"}}'
    rules.append(_alert(
        specs["NonFiniteValues"],
        # NaN/Inf propagate downstream, so every later layer counts them too. Alert on the layer the
        # agent attributes them to (its `gradflow_issue{kind="nonfinite"}`: the first layer whose output
        # went non-finite) when that layer has fresh counts, else on every layer with fresh counts.
        # Not from `gradflow_loss != gradflow_loss`: the agent also exports a NaN loss when no loss was
        # given in the interval, so a NaN loss alone is "no data".
        f"{origin}\nor\n{new}\nunless on ({_by(RUN_LABELS)})\n({origin})\n",
        "Non-finite {{ $labels.tensor }} values " + in_layer,
        _text("{{ $value | humanize }} NaN/Inf elements were seen in the {{ $labels.tensor }} tensors of "
              "%(where)s in the last %(window)s; NaN/Inf spread to every later layer and, through the "
              "optimizer step, into the weights unless the step is skipped.", window=NONFINITE_WINDOW),
        runbook_base))

    rules.append(_alert(
        specs["GradientUnstable"],
        _past_warmup(f"{_max_by_layer('gradflow_grad_turbulence')} > {_num(th.unstable_cv)}"),
        "Unstable gradients " + in_layer,
        _text("The gradient turbulence (coefficient of variation of the pressure over the window) of "
              "%(where)s is %(value)s, above %(t)s: the gradient norm spikes from step to step.",
              t=_num(th.unstable_cv)),
        runbook_base))

    rules.append(_alert(
        specs["ActivationSaturation"],
        _past_warmup(f"{_max_by_layer('gradflow_activation_saturation_ratio')} > {_num(th.saturation_ratio)}"),
        "Saturated activations " + in_layer,
        _text("{{ $value | humanizePercentage }} of the outputs of %(where)s sit at the bounds of the "
              "activation (threshold %(t)s), where its derivative is close to zero.",
              t=_pct(th.saturation_ratio)),
        runbook_base))

    rules.append(_alert(
        specs["TrainingStalled"],
        _past_warmup(f"{_max_by_layer('gradflow_update_ratio')} < {_num(th.stalled_update_ratio)}"),
        "Training has stalled " + in_layer,
        _text("The update-to-weight ratio ||dw||/||w|| of %(where)s is %(value)s per optimizer step, below "
              "%(t)s: the optimizer no longer moves its weights.", t=_num(th.stalled_update_ratio)),
        runbook_base))

    down = f'max by (job, instance) (up{{job=~"{job_regex}"}}) == 0'
    if alert_absent:
        down += f'\nor\nabsent(up{{job=~"{job_regex}"}})'
    rules.append(_alert(
        specs["GradflowAgentDown"],
        down + "\n",
        "{{ if $labels.instance }}gradflow agent {{ $labels.instance }} is down"
        "{{ else }}No gradflow agent is scraped{{ end }}",
        _text("{{ if $labels.instance }}Prometheus cannot scrape the gradflow agent at {{ $labels.instance }} "
              "(job {{ $labels.job }}){{ else }}No scrape target matches job=~\"%(jobs)s\"{{ end }}: the "
              "training process exited or hangs, its metrics port is unreachable, or service discovery "
              "lost it.", jobs=job_regex),
        runbook_base))

    assert [r["alert"] for r in rules] == [a.name for a in ALERTS]
    return rules


def build_rule_groups(config: Section | Mapping[str, Any] | str | os.PathLike | None = None, *,
                      runbook_base_url: str = RUNBOOK_BASE_URL, job_regex: str = DEFAULT_JOB_REGEX,
                      alert_absent: bool = False) -> list[dict[str, Any]]:
    """The rule groups (as plain data) for `config`'s thresholds.

    `alert_absent` adds `absent(up{job=~job_regex})` to GradflowAgentDown: off by default because
    training jobs come and go, so "no target at all" is normal between runs.
    """
    cfg = config if isinstance(config, Section) else load_config(config)
    th = cfg.thresholds
    return [{
        "name": GROUP_NAME,
        "rules": _recording_rules(th) + _alert_rules(th, runbook_base_url, job_regex, alert_absent),
    }]


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
            f"# Thresholds come from the config's `thresholds:` section, the same values the in-process\n"
            f"# detectors use. Regenerate after changing them.\n")


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
