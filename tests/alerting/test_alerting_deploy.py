"""The deployment files: checked by the projects' own tools and by schemas that work offline.

- Prometheus config: `promtool check config`. Debian's Prometheus is built without Kubernetes service
  discovery, so the `kubernetes_sd_configs` block is swapped for a file_sd one before the check (its
  relabelling is still checked) and asserted on structurally.
- Alertmanager: `amtool check-config` and `amtool config routes test`.
- Kubernetes: the Job against the Kubernetes 1.37 OpenAPI schemas (`kubernetes-validate --strict`), the
  PodMonitor and PrometheusRule against the prometheus-operator CRD schemas (the pydantic models of
  `cloudcoil-models-prometheus-operator`, with a round trip that rejects unknown fields).
- Compose: the compose-spec JSON schema vendored by `check-jsonschema`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradflow_agent.alerting.rules import DEFAULT_JOB_REGEX
from tests.support.prometheus import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, cwd=cwd)


# --- Prometheus ---------------------------------------------------------------------------------------

def test_promtool_checks_the_prometheus_config(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    config = _yaml(DEPLOY / "prometheus/prometheus.yml")
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["file_sd_configs"] = [{"files": ["pods.json"]}]
    shutil.copytree(DEPLOY / "prometheus/rules", tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = _run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_scrape_jobs() -> None:
    config = _yaml(DEPLOY / "prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    agents = {"gradflow", "gradflow-pods"}
    assert agents <= set(jobs)
    for name in jobs:  # GradflowAgentDown covers the agents' jobs and nothing else
        assert bool(re.fullmatch(DEFAULT_JOB_REGEX, name)) == (name in agents), name
    assert jobs["pushgateway"]["honor_labels"] is True
    pods = jobs["gradflow-pods"]
    assert pods["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = {(tuple(r.get("source_labels", [])), r.get("action", "replace")): r for r in pods["relabel_configs"]}
    keep = relabel[(("__meta_kubernetes_pod_annotation_gradflow_agent_scrape",), "keep")]
    assert keep["regex"] == "true"
    port = relabel[(("__meta_kubernetes_pod_container_port_name",), "keep")]
    assert re.fullmatch(port["regex"], "gradflow") and re.fullmatch(port["regex"], "gradflow-3")
    assert relabel[(("__meta_kubernetes_pod_phase",), "drop")]["regex"] == "Succeeded|Failed"
    assert config["rule_files"] == ["rules/gradflow-alerts.yml"]


# --- Alertmanager -------------------------------------------------------------------------------------

def test_amtool_checks_the_alertmanager_config() -> None:
    amtool = require_binary("amtool", "prometheus-alertmanager")
    result = _run(amtool, "check-config", str(DEPLOY / "alertmanager/alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("labels", "receiver"), [
    (["alertname=GradientExploding", "severity=critical"], "gradflow-page"),
    (["alertname=NonFiniteValues", "severity=critical"], "gradflow-page"),
    (["alertname=GradientVanishing", "severity=warning"], "gradflow-default"),
    (["alertname=GradflowAgentDown", "severity=warning"], "gradflow-default"),
    (["alertname=GradientUnstable", "severity=info"], "gradflow-ticket"),
])
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    amtool = require_binary("amtool", "prometheus-alertmanager")
    result = _run(amtool, "config", "routes", "test",
                  f"--config.file={DEPLOY / 'alertmanager/alertmanager.yml'}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


# --- Kubernetes ---------------------------------------------------------------------------------------

def test_training_job_matches_the_kubernetes_schema() -> None:
    from kubernetes_validate.utils import latest_version, validate

    job = _yaml(DEPLOY / "k8s/training-job.yaml")
    validate(job, latest_version(), strict=True)
    broken = _yaml(DEPLOY / "k8s/training-job.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["port"] = 9464  # a typo the schema must catch
    with pytest.raises(Exception, match="port"):
        validate(broken, latest_version(), strict=True)


def _crd_check(path: Path, kind: str) -> dict[str, Any]:
    from cloudcoil.models.prometheus_operator import v1

    data = _yaml(path)
    model = getattr(v1, kind).model_validate(data)
    # The models ignore unknown fields: a lossless round trip proves there were none.
    assert model.model_dump(by_alias=True, exclude_none=True, mode="json") == data
    return data


def test_podmonitor_matches_its_crd_schema_and_the_job() -> None:
    monitor = _crd_check(DEPLOY / "k8s/podmonitor.yaml", "PodMonitor")
    pod = _yaml(DEPLOY / "k8s/training-job.yaml")["spec"]["template"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert ports[endpoint["port"]] == 9464
    # The plain pod-discovery job selects the same pod through its annotation.
    assert pod["metadata"]["annotations"]["gradflow-agent/scrape"] == "true"
    # prometheus-operator names the job <namespace>/<name>: GradflowAgentDown must match it.
    assert re.fullmatch(DEFAULT_JOB_REGEX, f"ml/{monitor['metadata']['name']}")


def test_prometheusrule_matches_its_crd_schema() -> None:
    rule = _crd_check(DEPLOY / "k8s/prometheusrule.yaml", "PrometheusRule")
    assert rule["spec"]["groups"] == _yaml(DEPLOY / "prometheus/rules/gradflow-alerts.yml")["groups"]


def test_crd_schema_check_rejects_bad_values() -> None:
    from cloudcoil.models.prometheus_operator import v1
    from pydantic import ValidationError

    monitor = _yaml(DEPLOY / "k8s/podmonitor.yaml")
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(ValidationError):
        v1.PodMonitor.model_validate(monitor)


# --- Compose, Grafana provisioning, OTel Collector ----------------------------------------------------

def test_compose_file_matches_the_compose_spec() -> None:
    result = _run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                  str(DEPLOY / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_wires_the_stack_together() -> None:
    compose = _yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"trainer", "prometheus", "alertmanager", "grafana", "pushgateway", "otel-collector"} <= set(services)

    def mounts(service: str) -> dict[str, str]:
        out = {}
        for volume in services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            out[target] = source
        return out

    for service in services:  # every bind mount exists in the repository
        for target, source in mounts(service).items():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{service}: {source} -> {target}"
    provider = _yaml(ROOT / "grafana/provisioning/dashboards/gradflow.yaml")["providers"][0]
    grafana = mounts("grafana")
    assert Path(DEPLOY / grafana[provider["options"]["path"]]).resolve() == (ROOT / "grafana/dashboards").resolve()
    assert Path(DEPLOY / grafana["/etc/grafana/provisioning"]).resolve() == (ROOT / "grafana/provisioning").resolve()
    prometheus = _yaml(DEPLOY / "prometheus/prometheus.yml")
    targets = {t for job in prometheus["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for service, port in (("trainer", 9464), ("pushgateway", 9091), ("otel-collector", 8889)):
        assert f"{service}:{port}" in targets
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert (DEPLOY / services["trainer"]["build"]["dockerfile"].removeprefix("deploy/")).is_file()


def test_grafana_datasource_provisioning() -> None:
    datasources = _yaml(ROOT / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert [(d["type"], d["url"], d["isDefault"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090", True)]


def test_otel_collector_feeds_prometheus() -> None:
    collector = _yaml(DEPLOY / "otel/collector.yaml")
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert collector["exporters"]["prometheus"]["endpoint"].endswith(":8889")
    pipeline = collector["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"] and "prometheus" in pipeline["exporters"]
    for section in ("receivers", "processors", "exporters"):
        assert set(pipeline.get(section, [])) <= set(collector[section])
