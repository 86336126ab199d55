"""The detector and the alert rules agree: synthetic snapshots judged both ways, as promtool unit tests.

For every rule of the table (detect/spec.py) a synthetic snapshot holds layers on each side of its
thresholds (fires, escalates, healthy, exactly at the threshold, NaN, statistic missing) and a run
still in its warm-up, scraped from two ranks. The in-process detector judges it; the agent's exporter
turns the verdict into the series Prometheus would scrape; the expected alerts are one per run and
kind, at the highest severity the detector reports, carrying the number of flagged layers and the
first and worst of them (the recording rules' aggregation over many layers and ranks, one page).
`gradflow-agent rules --tests` writes the result as a promtool test file (the
checked-in `deploy/prometheus/tests/gradflow-alerts.test.yml`), which `promtool test rules` runs
against the generated rules: an alert that fires where the detector is silent, or the other way round,
fails it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from gradflow_agent.config import Section
from gradflow_agent.detect import diagnose
from gradflow_agent.detect.spec import RULES, severity_rank
from gradflow_agent.export.budget import issue_extremes
from gradflow_agent.export.metrics import ISSUE_EXTREME, ISSUE_LAYERS, samples
from gradflow_agent.snapshot import LAYER_STATS, NONFINITE_TENSORS, Snapshot

from .rules import _dump, build_rule_groups

JOB, INSTANCE = "gradflow", "trainer-0:9464"
MINUTES = 20  # length of every input series


def _snapshot(step: int, columns: dict[str, list[float]], layers: list[str], nonfinite=None,
              origin=None) -> Snapshot:
    stats = {k: np.array(columns.get(k, [math.nan] * len(layers)), dtype=np.float64) for k in LAYER_STATS}
    counts = {t: np.zeros(len(layers)) for t in NONFINITE_TENSORS}
    counts.update(nonfinite or {})
    return Snapshot(step=step, time=0.0, interval_steps=10, layers=tuple(layers),
                    layer_types=tuple("Linear" for _ in layers), stats=stats, nonfinite=counts,
                    grad_norm=math.nan, loss=None, counters={"steps_total": float(step)},
                    nonfinite_origin=origin)


def _case_values(cond, t: float) -> dict[str, float]:
    """Values of one condition's statistic on each side of its threshold `t`."""
    ratio = cond.statistic.endswith("ratio")
    if cond.op == "above":
        if cond.critical_at is not None:
            fires, critical = (t + cond.critical_at) / 2, cond.critical_at
        elif cond.critical_factor is not None:
            fires, critical = t * min(2.0, cond.critical_factor / 2), t * cond.critical_factor * 2
        else:
            fires, critical = ((t + 1) / 2, (t + 3) / 4) if ratio else (t * 1.5, t * 3)
        healthy = t / 2
    else:
        if cond.critical_at is not None:
            fires, critical = (t + cond.critical_at) / 2, cond.critical_at
        elif cond.critical_factor is not None:
            fires, critical = t / 2, t / cond.critical_factor / 10
        else:
            fires, critical = t / 2, t / 4
        healthy = t * 2
    return {"fires": fires, "escalates": critical, "healthy": healthy, "at_threshold": t, "nan": math.nan}


def _add(layers: list[str], columns: dict[str, list[float]], name: str, values: dict[str, float]) -> None:
    """One more layer: `values` for its statistics, NaN for the others."""
    layers.append(name)
    for key in {*columns, *values}:
        columns.setdefault(key, [math.nan] * (len(layers) - 1)).append(values.get(key, math.nan))


def cases(th: Section) -> list[tuple[str, Snapshot]]:
    """(run label, snapshot) pairs covering every rule of the table, and each rule's warm-up."""
    out = []
    for rule in RULES:
        if not rule.conditions:
            continue
        layers: list[str] = []
        columns: dict[str, list[float]] = {}

        for ci, cond in enumerate(rule.conditions):
            for case, value in _case_values(cond, float(th[cond.threshold])).items():
                values = {cond.statistic: value}
                if rule.requires and rule.requires != cond.statistic:
                    values[rule.requires] = 0.0  # known (and healthy): the rule judges this layer
                _add(layers, columns, f"{rule.kind}.c{ci}.{case}", values)
        if rule.requires:  # a firing value where the required statistic is unknown: never judged
            cond = rule.conditions[-1]
            fires = _case_values(cond, float(th[cond.threshold]))["fires"]
            _add(layers, columns, f"{rule.kind}.unknown", {cond.statistic: fires})
        out.append((rule.kind, _snapshot(int(th.warmup_steps) + 100, columns, layers)))
        out.append((f"{rule.kind}-warmup", _snapshot(int(th.warmup_steps), columns, layers)))
    layers = ["in", "origin", "spread"]
    out.append(("nonfinite", _snapshot(40, {}, layers, nonfinite={"activation": np.array([0.0, 3.0, 12.0])},
                                       origin=(37, 1, "activation"))))
    out.append(("nonfinite-none", _snapshot(40, {"grad_pressure": [1.0, 1.0, 1.0]}, layers)))
    return out


RANKS = (("0", INSTANCE), ("1", "trainer-1:9465"))  # every series is scraped from two ranks


def _labels(run: str, labels: dict[str, str], rank: str = "0", instance: str = INSTANCE) -> dict[str, str]:
    return {"job": JOB, "instance": instance, "run": run, "rank": rank, **labels}


def _series_text(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}"


_QUERY = re.compile(r"\{\{ with query \(printf `([^`]*)` [^)]*\) \}\}\{\{ with first \. \}\}(.*?)"
                    r"\{\{ end \}\}\{\{ end \}\}")
Answer = Callable[[str], "tuple[dict[str, str], float] | None"]


def _expand(template: str, labels: dict[str, str], value: float, answer: Answer | None = None) -> str:
    """The Go templates of the shipped annotations, expanded as Prometheus does for these labels.
    `answer(query)` -> (labels, value) of the first sample an annotation's `query` returns, or None."""

    def query(m: re.Match) -> str:
        found = answer(m.group(1)) if answer is not None else None
        if found is None:
            return ""
        sample_labels, sample_value = found
        body = m.group(2).replace('{{ printf "%.3g" .Value }}', _go_g(sample_value))
        return re.sub(r"\{\{ \.Labels\.(\w+) \}\}", lambda n: sample_labels.get(n.group(1), ""), body)

    text = _QUERY.sub(query, template)
    text = text.replace('{{ printf "%.3g" $value }}', _go_g(value)).replace('{{ printf "%.0f" $value }}',
                                                                           f"{value:.0f}")
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)


def _extremes(snap: Snapshot, kind: str) -> Answer:
    """What the per-run alerts' query of the first/worst flagged layer returns for `snap`."""
    found = {which: ({"layer": layer}, value) for k, which, layer, value in issue_extremes(snap) if k == kind}

    def answer(query: str) -> tuple[dict[str, str], float] | None:
        which = re.search(r'which="(\w+)"', query)
        return found.get(which.group(1)) if which else None

    return answer


def _go_g(value: float) -> str:
    """Go's %.3g (same as C's, which Python follows)."""
    return f"{value:.3g}"


def promtool_tests(config: Section, rule_file: str = "../rules/gradflow-alerts.yml") -> dict[str, Any]:
    """A promtool unit-test document: the detector's verdicts as input series (two ranks), one expected
    alert per run and kind at its highest severity (after the rule's `for:`), silence before."""
    th = config.thresholds
    alerts = [r for g in build_rule_groups(config) for r in g["rules"] if "alert" in r]
    by_name: dict[str, list[dict]] = {}
    for rule in alerts:
        by_name.setdefault(rule["alert"], []).append(rule)
    tests = []
    for run, snap in cases(th):
        snap = diagnose(snap, th)
        series = []
        for rank, instance in RANKS:
            for metric, labels, value in samples(snap, {}):
                if metric in (ISSUE_LAYERS, ISSUE_EXTREME):
                    series.append({"series": _series_text(metric.name, _labels(run, labels, rank, instance)),
                                   "values": f"{value!r}x{MINUTES}"})
        kinds = {run.split("-")[0]}
        cases_out = []
        for name, rules in by_name.items():
            kind = rules[0]["labels"]["kind"]
            if kind not in kinds:
                continue
            minutes = _minutes(rules[0]["for"])
            flagged = [i for i in snap.issues if i.kind == kind]
            expected = []
            if flagged:
                top = max((i.severity for i in flagged), key=severity_rank)
                rule = next(r for r in rules if r["labels"]["severity"] == top)
                count = sum(1 for i in flagged if i.severity == top)
                labels = {"job": JOB, "run": run, **rule["labels"]}
                answer = _extremes(snap, kind)
                expected.append({"exp_labels": labels, "exp_annotations": {
                    k: _expand(v, labels, float(count), answer) for k, v in rule["annotations"].items()}})
            if minutes:
                cases_out.append({"eval_time": f"{minutes - 1}m", "alertname": name, "exp_alerts": []})
            cases_out.append({"eval_time": f"{minutes + 1}m", "alertname": name, "exp_alerts": expected})
        tests.append({"name": f"{run}: one alert per run and kind, the detector's verdict", "interval": "1m",
                      "input_series": series, "alert_rule_test": cases_out})
    tests.append(_many_layers_test(config, by_name))
    tests.append(_agent_down_test(by_name["GradflowAgentDown"][0]["annotations"]["runbook_url"]))
    tests.append(_hung_test(by_name["TrainingHung"][0]))
    tests.append(_straggler_test(by_name["TrainingStraggler"][0]))
    return {"rule_files": [rule_file], "evaluation_interval": "1m", "tests": tests}


def _many_layers_test(config: Section, by_name: dict[str, list[dict]]) -> dict[str, Any]:
    """1000 vanishing layers on 8 ranks: one GradientVanishing for the run, naming the first and the
    worst layer (the aggregation the recording rules make)."""
    th = config.thresholds
    n, ranks = 1000, 8
    t = float(th.vanishing)
    pressure = [t / 2 * (1 + i / n) for i in range(n)]  # all below the threshold, the deepest least so
    pressure[-1] = t / 3  # the first layer flagged is blocks.0, the worst the last one
    layers = [f"blocks.{i}" for i in range(n)]
    snap = diagnose(_snapshot(int(th.warmup_steps) + 100, {"grad_pressure": pressure}, layers), th)
    series = []
    for r in range(ranks):
        for metric, labels, value in samples(snap, {}):
            if metric in (ISSUE_LAYERS, ISSUE_EXTREME):
                series.append({"series": _series_text(metric.name, _labels("deep", labels, str(r),
                                                                            f"trainer-{r}:9464")),
                               "values": f"{value!r}x{MINUTES}"})
    rule = next(r for r in by_name["GradientVanishing"] if r["labels"]["severity"] == "warning")
    labels = {"job": JOB, "run": "deep", **rule["labels"]}
    count = sum(1 for i in snap.issues if i.kind == "vanishing")
    assert count == n, count
    return {"name": f"deep: {n} vanishing layers on {ranks} ranks page once", "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{"eval_time": f"{_minutes(rule['for']) + 1}m", "alertname": "GradientVanishing",
                                 "exp_alerts": [{"exp_labels": labels, "exp_annotations": {
                                     k: _expand(v, labels, float(count), _extremes(snap, "vanishing"))
                                     for k, v in rule["annotations"].items()}}]}]}


def _agent_down_test(runbook_url: str) -> dict[str, Any]:
    up = _series_text("up", {"job": JOB, "instance": INSTANCE})
    labels = {"job": JOB, "instance": INSTANCE, "severity": "warning", "kind": "agent_down"}
    return {"name": "GradflowAgentDown", "interval": "1m",
            "input_series": [{"series": up, "values": "1x4 0x10"}],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "GradflowAgentDown", "exp_alerts": []},
                {"eval_time": "7m", "alertname": "GradflowAgentDown", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "GradflowAgentDown", "exp_alerts": [{
                    "exp_labels": labels,
                    "exp_annotations": {
                        "summary": f"gradflow agent {INSTANCE} is down",
                        "description": f"Prometheus cannot scrape the gradflow agent at {INSTANCE} (job {JOB}): "
                                       "the training process exited or hangs, its metrics port is "
                                       "unreachable, or service discovery lost it.",
                        "runbook_url": runbook_url}}]}]}


def _hung_test(rule: dict[str, Any]) -> dict[str, Any]:
    """A run that steps for 5 minutes, then serves without stepping: TrainingHung after the window + for:."""
    window = _minutes(re.search(r"\[(\w+)\]", rule["expr"]).group(1))
    labels = {"job": JOB, "instance": INSTANCE, "run": "r1", "rank": "0"}
    fire_at = 5 + window + _minutes(rule["for"]) + 1
    expected = {**labels, **rule["labels"]}
    return {"name": "TrainingHung", "interval": "1m",
            "input_series": [
                {"series": _series_text("gradflow_steps_total", labels), "values": f"0+10x5 50x{fire_at + 5}"},
                {"series": _series_text("up", {"job": JOB, "instance": INSTANCE}), "values": f"1x{fire_at + 10}"}],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "TrainingHung", "exp_alerts": []},
                {"eval_time": f"{fire_at - 2}m", "alertname": "TrainingHung", "exp_alerts": []},
                {"eval_time": f"{fire_at}m", "alertname": "TrainingHung", "exp_alerts": [{
                    "exp_labels": expected,
                    "exp_annotations": {k: _expand(v, labels, 0.0) for k, v in rule["annotations"].items()}}]}]}


def _straggler_test(rule: dict[str, Any]) -> dict[str, Any]:
    """Four ranks; rank 2's forward takes 45 ms against 5 ms from minute 11: TrainingStraggler for that run
    after `for:`, naming rank 2, silent before and for a second run whose ranks are even."""
    series = []
    for run, slow in (("r1", "2"), ("even", None)):
        for r in range(4):
            labels = {"job": JOB, "instance": f"trainer-{r}:9464", "run": run, "rank": str(r)}
            values = "0.005x10 0.045x20" if str(r) == slow else "0.005x30"
            series.append({"series": _series_text("gradflow_forward_seconds", labels), "values": values})
            series.append({"series": _series_text("gradflow_steps_total", labels), "values": "0+10x30"})
    # rank 2 is slow from minute 11; the alert reads recorded series, which may lag one evaluation when
    # promtool evaluates the alert group first: quiet until 11 + for - 1, firing from 11 + for + 1
    fire_at = 11 + _minutes(rule["for"]) + 1
    labels = {"job": JOB, "run": "r1", **rule["labels"]}

    def answer(query: str) -> tuple[dict[str, str], float] | None:
        """The slowest rank (rank 2, 45 ms) and the run's median forward time (5 ms)."""
        return ({"rank": "2"}, 0.045) if "job_run_rank:" in query else ({}, 0.005)

    return {"name": "TrainingStraggler", "interval": "1m", "input_series": series,
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "TrainingStraggler", "exp_alerts": []},
                {"eval_time": f"{fire_at - 3}m", "alertname": "TrainingStraggler", "exp_alerts": []},
                {"eval_time": f"{fire_at}m", "alertname": "TrainingStraggler", "exp_alerts": [{
                    "exp_labels": labels,
                    "exp_annotations": {k: _expand(v, labels, 0.045, answer)
                                        for k, v in rule["annotations"].items()}}]}]}


def _minutes(duration: str) -> int:
    match = re.fullmatch(r"(\d+)([ms])", duration)
    if not match:
        raise ValueError(f"unsupported for: {duration!r}")
    n = int(match.group(1))
    return n if match.group(2) == "m" else math.ceil(n / 60)


def render_promtool_tests(config: Section, source: str = "config/default.yaml") -> str:
    """The promtool test file as YAML text (`gradflow-agent rules --format promtool-tests`)."""
    header = (f"# Generated by `gradflow-agent rules --format promtool-tests` from {source}; do not edit.\n"
              f"# Synthetic snapshots judged by the in-process detector; the expected alerts are its issues.\n"
              f"#   cd deploy/prometheus/tests && promtool test rules gradflow-alerts.test.yml\n")
    return header + _dump(promtool_tests(config))


__all__ = ["cases", "promtool_tests", "render_promtool_tests"]
