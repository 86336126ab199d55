"""The deployment files: checked by the projects' own tools and by schemas that work offline.

- Prometheus config: `promtool check config`. Debian's Prometheus is built without Kubernetes service
  discovery, so the `kubernetes_sd_configs` block is swapped for a file_sd one before the check (its
  relabelling is still checked) and asserted on structurally.
- Alertmanager: `amtool check-config` and `amtool config routes test`.
- Kubernetes: the Job against the Kubernetes 1.37 OpenAPI schemas (`kubernetes-validate --strict`), the
  PodMonitor and PrometheusRule against the prometheus-operator CRD schemas (the pydantic models of
  `cloudcoil-models-prometheus-operator`, with a round trip that rejects unknown fields).
- Compose: the compose-spec JSON schema vendored by `check-jsonschema`; every host the configs name is
  one of its services, and each setup (the default direct scrape, the OTLP override) brings the
  trainer's series to Prometheus one way only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradflow_agent.alerting.rules import DEFAULT_JOB_REGEX
from tests.support.prometheus import free_port, require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, cwd=cwd)


# --- Prometheus ---------------------------------------------------------------------------------------

PROMETHEUS_CONFIGS = ("prometheus/prometheus.yml", "otel/prometheus.yml")  # direct scrape; the OTLP path


@pytest.mark.parametrize("path", PROMETHEUS_CONFIGS)
def test_promtool_checks_the_prometheus_config(tmp_path: Path, path: str) -> None:
    promtool = require_binary("promtool", "prometheus")
    config = _yaml(DEPLOY / path)
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["file_sd_configs"] = [{"files": ["pods.json"]}]
    shutil.copytree(DEPLOY / "prometheus/rules", tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = _run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = _yaml(DEPLOY / "prometheus/rules/gradflow-alerts.yml")["groups"]
    assert f"SUCCESS: {sum(len(g['rules']) for g in shipped)} rules found" in result.stdout


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

COMPOSE_FILES = ("compose.yaml", "otel/compose.otel.yaml")


@pytest.mark.parametrize("path", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(path: str) -> None:
    result = _run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                  str(DEPLOY / path))
    assert result.returncode == 0, result.stdout + result.stderr


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes (short syntax)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _merged(*paths: str) -> dict[str, Any]:
    """Compose files merged as `docker compose -f a -f b` does, for what these tests read: mappings merge
    (environment), sequences replace (command), except volumes, which merge by their target."""
    def merge(base: Any, over: Any, key: str = "") -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {k: merge(base[k], v, k) if k in base else v for k, v in {**base, **over}.items()}
        if key == "volumes" and isinstance(base, list) and isinstance(over, list):
            by_target = {v.split(":")[1]: v for v in base}
            by_target.update({v.split(":")[1]: v for v in over})
            return list(by_target.values())
        return over

    out: dict[str, Any] = {}
    for path in paths:
        out = merge(out, _yaml(DEPLOY / path))
    return out


def _prometheus_config_of(compose: dict[str, Any]) -> dict[str, Any]:
    """The Prometheus configuration a compose setup runs: --config.file, through the bind mounts."""
    prometheus = compose["services"]["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    target = flag.split("=", 1)[1]
    for mount, source in sorted(_mounts(prometheus).items(), key=lambda kv: -len(kv[0])):
        if target == mount or target.startswith(mount.rstrip("/") + "/"):
            return _yaml(DEPLOY / (source + target[len(mount):]))
    raise AssertionError(f"{target} is not mounted into the prometheus service")


def _targets(prometheus: dict[str, Any]) -> dict[str, str]:
    """host:port -> job of every static scrape target."""
    return {t: job["job_name"] for job in prometheus["scrape_configs"] for sc in job.get("static_configs", [])
            for t in sc["targets"]}


def test_compose_wires_the_stack_together() -> None:
    compose = _yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"trainer", "prometheus", "alertmanager", "alert-receiver", "grafana", "pushgateway"} <= set(services)
    for path in COMPOSE_FILES:  # every bind mount exists in the repository
        for service, spec in _yaml(DEPLOY / path)["services"].items():
            for target, source in _mounts(spec).items():
                if source.startswith("."):
                    assert (DEPLOY / source).exists(), f"{path}: {service}: {source} -> {target}"
    provider = _yaml(ROOT / "grafana/provisioning/dashboards/gradflow.yaml")["providers"][0]
    grafana = _mounts(services["grafana"])
    assert Path(DEPLOY / grafana[provider["options"]["path"]]).resolve() == (ROOT / "grafana/dashboards").resolve()
    assert Path(DEPLOY / grafana["/etc/grafana/provisioning"]).resolve() == (ROOT / "grafana/provisioning").resolve()
    for setup in (("compose.yaml",), COMPOSE_FILES):
        merged = _merged(*setup)
        prometheus = _prometheus_config_of(merged)
        for target in _targets(prometheus):  # every scrape target is a service of that setup
            assert target.split(":")[0] in merged["services"], (setup, target)
        assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert {"trainer:9464", "pushgateway:9091"} <= set(_targets(_prometheus_config_of(compose)))
    assert (DEPLOY / services["trainer"]["build"]["dockerfile"].removeprefix("deploy/")).is_file()


def _series_paths(compose: dict[str, Any]) -> list[str]:
    """The ways the trainer's series reach the setup's Prometheus: its own scrape, OTLP through a scraped
    collector, a push to a scraped Pushgateway."""
    env = {k.lower(): str(v) for k, v in compose["services"]["trainer"].get("environment", {}).items()}
    scraped = {t.split(":")[0] for t in _targets(_prometheus_config_of(compose))}
    paths = []
    if "trainer" in scraped:
        paths.append("scrape")
    if env.get("gradflow_exporters_otel_enabled", "").lower() == "true":
        collector = urllib.parse.urlsplit(env.get("otel_exporter_otlp_endpoint", "")).hostname
        if collector in scraped:
            paths.append(f"otlp via {collector}")
    pushgateway = urllib.parse.urlsplit(env.get("gradflow_exporters_prometheus_pushgateway_url", "")).hostname
    if pushgateway and pushgateway in scraped:
        paths.append(f"push via {pushgateway}")
    return paths


@pytest.mark.parametrize(("setup", "path"), [(("compose.yaml",), "scrape"),
                                             (COMPOSE_FILES, "otlp via otel-collector")])
def test_each_series_reaches_prometheus_one_way(setup: tuple[str, ...], path: str) -> None:
    """Two paths would store every series twice (one per job) and fire every alert twice."""
    compose = _merged(*setup)
    assert _series_paths(compose) == [path]
    if path == "scrape":  # the collector is an alternative: neither run nor scraped by default
        assert "otel-collector" not in compose["services"]
        assert not any(t.startswith("otel-collector:") for t in _targets(_prometheus_config_of(compose)))


def _receiver_urls() -> list[urllib.parse.SplitResult]:
    config = _yaml(DEPLOY / "alertmanager/alertmanager.yml")
    return [urllib.parse.urlsplit(hook["url"]) for receiver in config["receivers"]
            for hook in receiver.get("webhook_configs", [])]


def test_alert_receivers_are_compose_services() -> None:
    services = _yaml(DEPLOY / "compose.yaml")["services"]
    urls = _receiver_urls()
    assert urls
    for url in urls:
        assert url.hostname in services, f"{url.geturl()}: {url.hostname} is not a compose service"
        service = services[url.hostname]
        command = [str(a) for a in service["command"]]
        assert command[command.index("--port") + 1] == str(url.port), url.geturl()
        assert str(url.port) in [str(p) for p in service.get("expose", [])]
        assert (DEPLOY / _mounts(service)[command[1]]).is_file()  # the script it runs is in the repository


def test_alert_receiver_prints_each_notification() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(DEPLOY / "alertmanager/receiver.py"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening" in (proc.stdout.readline() if proc.stdout else "")
        payload = {"version": "4", "status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": "GradientExploding", "severity": "critical",
                                            "run": "demo-exploding", "rank": "0", "layer": "4"},
             "annotations": {"summary": "Exploding gradients"}}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/gradflow/page", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    assert resp.status == 200
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        line = proc.stdout.readline().strip() if proc.stdout else ""
        assert line == ("[page] firing GradientExploding severity=critical run=demo-exploding rank=0 layer=4: "
                        "Exploding gradients")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_grafana_datasource_provisioning() -> None:
    datasources = _yaml(ROOT / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert [(d["type"], d["url"], d["isDefault"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090", True)]


def test_otel_collector_feeds_prometheus() -> None:
    collector = _yaml(DEPLOY / "otel/collector.yaml")
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert collector["exporters"]["prometheus"]["endpoint"].endswith(":8889")
    otel = _merged(*COMPOSE_FILES)  # the OTLP path scrapes the collector's exporter, and only that for agents
    targets = _targets(_prometheus_config_of(otel))
    assert targets.get("otel-collector:8889") == "otel-collector" and "trainer:9464" not in targets
    assert otel["services"]["trainer"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")
    pipeline = collector["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"] and "prometheus" in pipeline["exporters"]
    for section in ("receivers", "processors", "exporters"):
        assert set(pipeline.get(section, [])) <= set(collector[section])
