"""The generated alert rules: in step with the config, valid for promtool, unit-tested, conventional."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from gradflow_agent.alerting import cli
from gradflow_agent.alerting.rules import ALERTS, JOB_RUN, build_rule_groups, render_k8s, render_prometheus
from gradflow_agent.config import load_config
from gradflow_agent.export.metrics import ALL as EXPORTED
from tests.support.prometheus import require_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules/gradflow-alerts.yml"
PROMETHEUS_RULE = ROOT / "deploy/k8s/prometheusrule.yaml"
UNIT_TESTS = ROOT / "deploy/prometheus/tests"
RUNBOOKS = ROOT / "docs/runbooks"
DESIGN_ALERTS = {"GradientVanishing", "GradientExploding", "DeadNeurons", "NonFiniteValues", "GradientUnstable",
                 "ActivationSaturation", "TrainingStalled", "AttentionCollapse", "ExpertLoadImbalance",
                 "DeadExperts", "GradflowAgentDown", "TrainingHung", "TrainingStraggler"}
PER_TARGET = ("GradflowAgentDown", "TrainingHung", "TrainingStraggler")  # not the detector's verdict


def _default_cfg():
    return load_config(ROOT / "config/default.yaml", environ={})


def _rules(groups: list[dict]) -> list[dict]:
    return [rule for group in groups for rule in group["rules"]]


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool", "prometheus")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_checked_in_rules_are_the_output_for_the_default_config() -> None:
    expected = render_prometheus(build_rule_groups(_default_cfg()), "config/default.yaml")
    assert RULES.read_text(encoding="utf-8") == expected, (
        "deploy/prometheus/rules/gradflow-alerts.yml is stale: run "
        "`gradflow-agent rules --config config/default.yaml -o deploy/prometheus/rules/gradflow-alerts.yml`")


def test_checked_in_prometheusrule_is_the_output_for_the_default_config() -> None:
    expected = render_k8s(build_rule_groups(_default_cfg()), "config/default.yaml")
    assert PROMETHEUS_RULE.read_text(encoding="utf-8") == expected, (
        "deploy/k8s/prometheusrule.yaml is stale: run `gradflow-agent rules --config config/default.yaml "
        "--format k8s -o deploy/k8s/prometheusrule.yaml`")
    resource = yaml.safe_load(expected)
    assert resource["spec"]["groups"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]


def test_promtool_checks_the_rule_file_and_the_prometheusrule_groups(tmp_path: Path) -> None:
    groups = yaml.safe_load(PROMETHEUS_RULE.read_text(encoding="utf-8"))["spec"]
    extracted = tmp_path / "prometheusrule-groups.yml"
    extracted.write_text(yaml.safe_dump(groups), encoding="utf-8")
    result = _promtool("check", "rules", str(RULES), str(extracted))
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(_rules(build_rule_groups(_default_cfg())))
    assert result.stdout.count(f"SUCCESS: {count} rules found") == 2, result.stdout


def test_promtool_unit_tests_pass() -> None:
    files = sorted(UNIT_TESTS.glob("*.test.yml"))
    assert files
    result = _promtool("test", "rules", *(f.name for f in files), cwd=UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checked_in_unit_tests_are_the_output_for_the_default_config() -> None:
    from gradflow_agent.alerting.agreement import render_promtool_tests
    expected = render_promtool_tests(_default_cfg())
    assert (UNIT_TESTS / "gradflow-alerts.test.yml").read_text(encoding="utf-8") == expected, (
        "deploy/prometheus/tests/gradflow-alerts.test.yml is stale: run `gradflow-agent rules --format "
        "promtool-tests -o deploy/prometheus/tests/gradflow-alerts.test.yml`")


def test_alerts_fire_exactly_where_the_detector_reports_and_a_drift_fails(tmp_path: Path) -> None:
    """The detector's issues on synthetic snapshots are the expected alerts: one per run and kind, at the
    highest severity reported (two ranks, many layers, one page); a rule that drifts from the verdict
    (here: the warning alert no longer standing down for the critical one) makes promtool fail."""
    from gradflow_agent.alerting.agreement import promtool_tests
    from gradflow_agent.alerting.rules import ALERTS as SHIPPED

    custom = load_config({"thresholds": {"vanishing": 3e-4, "dead_unit_ratio": 0.3, "warmup_steps": 7}}, {})
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    doc = promtool_tests(custom)
    expected = [(c["alertname"], a["exp_labels"]["severity"], a["exp_labels"]["run"])
                for t in doc["tests"] for c in t["alert_rule_test"] for a in c["exp_alerts"]
                if "run" in a["exp_labels"] and "instance" not in a["exp_labels"] and c["alertname"] not in PER_TARGET]
    assert {name for name, _, _ in expected} == {a.name for a in SHIPPED} - set(PER_TARGET)
    assert ("GradientVanishing", "critical", "vanishing") in expected
    assert ("GradientVanishing", "warning", "vanishing") not in expected  # one page per incident
    assert ("DeadNeurons", "critical", "dead") in expected
    assert not [e for e in expected if e[2].endswith("-warmup")]
    assert len(expected) == len(set(expected))
    (tmp_path / "tests" / "t.test.yml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    rules = render_prometheus(build_rule_groups(custom))
    (tmp_path / "rules" / "gradflow-alerts.yml").write_text(rules, encoding="utf-8")
    result = _promtool("test", "rules", "t.test.yml", cwd=tmp_path / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    drifted = re.sub(r"unless on \(job, run\)\n.*\n", "", rules)
    assert drifted != rules
    (tmp_path / "rules" / "gradflow-alerts.yml").write_text(drifted, encoding="utf-8")
    result = _promtool("test", "rules", "t.test.yml", cwd=tmp_path / "tests")
    assert result.returncode != 0


def test_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    """For every alert: an evaluation where it fires and one (earlier, inside `for:`) where it does not."""
    firing, quiet = set(), set()
    for path in UNIT_TESTS.glob("*.test.yml"):
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert firing == DESIGN_ALERTS and quiet == DESIGN_ALERTS, (firing, quiet)


def test_alert_names_and_labels_follow_the_contract() -> None:
    rules = _rules(build_rule_groups(_default_cfg()))
    alerts = [r for r in rules if "alert" in r]
    assert {r["alert"] for r in alerts} == DESIGN_ALERTS == {a.name for a in ALERTS}
    for rule in alerts:
        assert re.fullmatch(r"[A-Z][a-z]+(?:[A-Z][a-z]+)+", rule["alert"]), rule["alert"]  # UpperCamelCase
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        runbook = RUNBOOKS / f"{rule['alert']}.md"
        assert rule["annotations"]["runbook_url"].endswith(f"/docs/runbooks/{rule['alert']}.md")
        assert runbook.is_file(), f"missing runbook {runbook}"
        if rule["alert"] not in PER_TARGET:
            description = rule["annotations"]["description"]
            assert "$labels.run" in description and "$value" in description
            assert 'which="first"' in description and 'which="worst"' in description
    for rule in rules:
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:gradflow_[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
    from gradflow_agent.detect.spec import RULES
    for spec in RULES:  # one alert per severity the rule can report, with the rule's `for:`
        mine = [r for r in alerts if r["alert"] == spec.alert]
        assert [r["labels"]["severity"] for r in mine] == list(spec.severities)
        assert {r["for"] for r in mine} == {spec.for_}


def test_per_run_alerts_read_recorded_series_aggregated_by_job_and_run() -> None:
    """Recording rules reduce with an explicit `by (job, run, ...)` (never `without`), and the per-run
    alerts read only recorded series: a global Prometheus that federates them evaluates the same alerts."""
    rules = _rules(build_rule_groups(_default_cfg()))
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        expr = rule["expr"]
        assert " without " not in expr
        if "record" in rule:
            groupings = re.findall(r"\b(?:max|min|sum|avg|count|quantile)\s+by\s*\(([^)]*)\)", expr)
            assert groupings, rule["record"]
            for labels in groupings:
                assert [x.strip() for x in labels.split(",")][:2] == list(JOB_RUN), (rule["record"], labels)
        elif rule["alert"] not in PER_TARGET:
            names = set(re.findall(r"\b([a-z_]+:gradflow_[a-z_]+:[a-z0-9_]+|gradflow_[a-z_]+)\b", expr))
            assert names and names <= recorded, (rule["alert"], names)
            assert re.findall(r"\bon\s*\(([^)]*)\)", expr) in ([], ["job, run"]), rule["alert"]


def test_rules_read_only_metrics_the_agent_exports() -> None:
    exported = {m.name for m in EXPORTED}
    recorded = {r["record"] for r in _rules(build_rule_groups(_default_cfg())) if "record" in r}
    for rule in _rules(build_rule_groups(_default_cfg())):
        for name in re.findall(r"\b(gradflow_[a-z_]+|[a-z_]+:gradflow_[a-z_]+:[a-z0-9_]+)\b", rule["expr"]):
            assert name in exported or name in recorded, f"{rule.get('alert') or rule['record']}: {name}"


def test_thresholds_come_from_the_config(tmp_path: Path) -> None:
    custom = {"thresholds": {"warmup_steps": 123, "vanishing": 2.5e-5, "exploding": 77.0, "dead_ratio": 0.8,
                             "dead_unit_ratio": 0.6, "unstable_cv": 4.5, "saturation_ratio": 0.7,
                             "stalled_update_ratio": 3e-9}}
    rules = {r["alert"]: r["annotations"]["description"] for r in _rules(build_rule_groups(load_config(custom, {})))
             if "alert" in r
             if r.get("labels", {}).get("severity") != "critical" or r["alert"] == "GradientExploding"}
    assert "thresholds.vanishing = 2.5e-05" in rules["GradientVanishing"]
    assert "thresholds.exploding = 77" in rules["GradientExploding"]
    assert "thresholds.dead_unit_ratio = 0.6" in rules["DeadNeurons"] and "dead_ratio = 0.8" in rules["DeadNeurons"]
    assert "thresholds.unstable_cv = 4.5" in rules["GradientUnstable"]
    assert "thresholds.saturation_ratio = 0.7" in rules["ActivationSaturation"]
    assert "thresholds.stalled_update_ratio = 3e-09" in rules["TrainingStalled"]
    path = tmp_path / "custom.yml"
    path.write_text(render_prometheus(build_rule_groups(load_config(custom, {}))), encoding="utf-8")
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_writes_checks_and_rejects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for name in [k for k in os.environ if k.startswith("GRADFLOW_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "gradflow.yaml"
    config.write_text("thresholds:\n  exploding: 42\n", encoding="utf-8")
    out = tmp_path / "rules.yml"
    assert cli.main(["--config", str(config), "-o", str(out)]) == 0
    assert "thresholds.exploding = 42" in out.read_text(encoding="utf-8")
    assert cli.main(["--config", str(config), "-o", str(out), "--check"]) == 0
    assert cli.main(["-o", str(out), "--check"]) == 1  # defaults differ from the file
    k8s = tmp_path / "rule.yaml"
    assert cli.main(["--config", str(config), "--format", "k8s", "--namespace", "ml", "-o", str(k8s)]) == 0
    resource = yaml.safe_load(k8s.read_text(encoding="utf-8"))
    assert resource["kind"] == "PrometheusRule" and resource["metadata"]["namespace"] == "ml"
    assert cli.main(["--alert-absent", "--job-regex", "trainers"]) == 0
    stdout = capsys.readouterr().out
    assert 'absent(up{job=~"trainers"})' in stdout
    config.write_text("thresholds:\n  exploding: -1\n", encoding="utf-8")
    assert cli.main(["--config", str(config)]) == 2
    assert "thresholds.exploding" in capsys.readouterr().err


def test_runbooks_cover_meaning_confirmation_causes_and_fixes() -> None:
    topics = ("initialisation", "normalisation", "residual", "learning rate", "data bug", "clipping",
              "gradient_scale")
    text = ""
    for alert in DESIGN_ALERTS:
        body = (RUNBOOKS / f"{alert}.md").read_text(encoding="utf-8")
        assert body.startswith(f"# {alert}\n")
        for heading in ("## What it means", "## Confirm", "## Usual causes and fixes"):
            assert heading in body, f"{alert}.md lacks {heading!r}"
        text += body.lower()
    missing = [t for t in topics if t.lower() not in text]
    assert not missing, missing


def test_runbooks_state_the_rule_tables_severities_and_duration() -> None:
    from gradflow_agent.detect.spec import RULES
    for spec in RULES:
        body = (RUNBOOKS / f"{spec.alert}.md").read_text(encoding="utf-8")
        assert f"| Severity | {' / '.join(spec.severities)} |" in body, spec.alert
        assert f'gradflow_issue{{kind="{spec.kind}"}}' in body, spec.alert
