"""Grafana dashboards as code: the checked-in JSON is the SDK's output and keeps the conventions."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.models.dashboard import Dashboard

from gradflow_agent.alerting import cli
from gradflow_agent.alerting.dashboards import DASHBOARDS, build_dashboards, to_json
from gradflow_agent.alerting.rules import ALERTS, build_rule_groups
from gradflow_agent.config import load_config
from gradflow_agent.export.metrics import ALL as EXPORTED
from gradflow_agent.integrations.attention import AttentionPlugin
from gradflow_agent.integrations.moe import MoEPlugin
from tests.support.prometheus import require_binary

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "grafana/dashboards"
VARIABLES = {"datasource", "job", "instance", "run", "rank", "layer"}


def _load(name: str) -> dict[str, Any]:
    return json.loads((DIR / name).read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p["targets"]]


def test_checked_in_json_is_the_sdk_output_for_the_default_config() -> None:
    built = build_dashboards(load_config(ROOT / "config/default.yaml", environ={}))
    assert sorted(built) == sorted(p.name for p in DIR.glob("*.json"))
    for name, model in built.items():
        assert (DIR / name).read_text(encoding="utf-8") == to_json(model), (
            f"grafana/dashboards/{name} is stale: run `gradflow-agent dashboards -o grafana/dashboards`")


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_json_round_trips_through_the_sdk_models(name: str) -> None:
    text = (DIR / name).read_text(encoding="utf-8")
    assert to_json(Dashboard.from_json(json.loads(text))) == text


def test_stable_unique_uids_and_links() -> None:
    uids = {name: _load(name)["uid"] for name in DASHBOARDS}
    assert uids == {"gradflow-overview.json": "gradflow-overview", "gradflow-layers.json": "gradflow-layers",
                    "gradflow-layer.json": "gradflow-layer"}
    for name in DASHBOARDS:
        dashboard = _load(name)
        assert "gradflow" in dashboard["tags"]
        assert any(link["type"] == "dashboards" and link["tags"] == ["gradflow"] for link in dashboard["links"])
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_panel_keeps_the_conventions(name: str) -> None:
    dashboard = _load(name)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == VARIABLES
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for var in VARIABLES - {"datasource"}:
        assert variables[var]["datasource"]["uid"] == "${datasource}"
        assert variables[var]["description"]
    for panel in _panels(dashboard):
        where = f"{name}: {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel.get("description"), where
        assert panel["fieldConfig"]["defaults"].get("unit"), where
        assert panel["targets"], where
        refs = [t["refId"] for t in panel["targets"]]
        assert all(refs) and len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            expr = target["expr"]
            assert '=~"$job"' in expr, f"{where}: no job matcher in {expr}"
            for window in re.findall(r"\b(?:rate|increase|irate)\([^\[]*\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", f"{where}: {expr}"
            for used in re.findall(r"\$\{?(\w+)", expr):
                assert used in variables or used == "__rate_interval", f"{where}: unknown variable ${used}"


def test_the_layers_and_layer_dashboards_show_one_run() -> None:
    for name in ("gradflow-layers.json", "gradflow-layer.json"):
        variables = {v["name"]: v for v in _load(name)["templating"]["list"]}
        assert not variables["run"]["multi"] and not variables["rank"]["multi"], name
    layer = {v["name"]: v for v in _load("gradflow-layer.json")["templating"]["list"]}["layer"]
    assert not layer["multi"]


def test_thresholds_follow_the_config() -> None:
    custom = load_config({"thresholds": {"vanishing": 3e-5, "exploding": 123.0, "unstable_cv": 7.5,
                                         "dead_unit_ratio": 0.65, "saturation_ratio": 0.35,
                                         "stalled_update_ratio": 4e-9}}, {})
    built = json.loads(to_json(build_dashboards(custom)["gradflow-layer.json"]))
    steps = {p["title"]: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
             for p in _panels(built) if "thresholds" in p["fieldConfig"]["defaults"]}
    assert steps["Gradient pressure"] == [None, 3e-5, 123.0]
    assert steps["Gradient turbulence"] == [None, 7.5]
    assert steps["Zero and dead-unit ratios"] == [None, 0.65]
    assert steps["Saturation ratio"] == [None, 0.35]
    assert steps["Update ratio"] == [None, 4e-9]


def test_attention_and_moe_panel_thresholds_follow_the_config() -> None:
    custom = load_config({"thresholds": {"attention_collapse_entropy": 0.2, "attention_collapse_max_prob": 0.9,
                                         "expert_imbalance": 0.4, "dead_expert_ratio": 0.25}}, {})
    for cfg, dead in ((custom, [None, 0.25]), (load_config({}, {}), None)):
        built = json.loads(to_json(build_dashboards(cfg)["gradflow-layers.json"]))
        steps = {p["title"]: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
                 for p in _panels(built) if "thresholds" in p["fieldConfig"]["defaults"]}
        if cfg is custom:
            assert steps["Lowest attention entropy"] == [None, 0.2]
            assert steps["Largest attention max probability"] == [None, 0.9]
            assert steps["Expert load imbalance"] == [None, 0.4]
        assert steps.get("Dead expert ratio") == dead  # no line at the default 0 (any dead expert)


def test_alert_panels_list_exactly_the_shipped_alerts() -> None:
    names = "|".join(a.name for a in ALERTS)
    alert_exprs = [e for e in _exprs(_load("gradflow-overview.json")) if "ALERTS{" in e]
    assert alert_exprs and all(f'alertname=~"{names}"' in e for e in alert_exprs)


def test_queries_read_only_exported_metrics_and_recording_rules() -> None:
    plugins = {m.name for m in (*AttentionPlugin.metrics, *MoEPlugin.metrics)}  # the plug-ins' own gauges
    known = {m.name for m in EXPORTED} | plugins | {r["record"] for g in build_rule_groups() for r in g["rules"]
                                                     if "record" in r}
    for name in DASHBOARDS:
        for expr in _exprs(_load(name)):
            for metric in re.findall(r"\b((?:[a-z_]+:)?gradflow_[a-z_]+(?::[a-z0-9_]+)?)\b", expr):
                assert metric in known, f"{name}: {metric} in {expr}"


def _substituted(expr: str) -> str:
    values = {"job": "gradflow", "instance": "(127.0.0.1:9464|10.0.0.2:9464)", "run": "(demo|demo-2)",
              "rank": "0", "layer": "(encoder.0|head)", "__rate_interval": "1m", "datasource": "prometheus"}
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


def test_every_panel_query_parses(tmp_path: Path) -> None:
    """promtool parses each query (template variables substituted) as a recording rule's expression."""
    rules = [{"record": f"dashboard:query:{i}", "expr": _substituted(expr)}
             for i, expr in enumerate(e for name in sorted(DASHBOARDS) for e in _exprs(_load(name)))]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    promtool = require_binary("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_cli_writes_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("GRADFLOW_")]:
        monkeypatch.delenv(name)
    assert cli.dashboards_main(["-o", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(DASHBOARDS)
    assert cli.dashboards_main(["-o", str(tmp_path), "--check"]) == 0
    assert cli.dashboards_main(["-o", str(DIR), "--check"]) == 0
    config = tmp_path / "c.yaml"
    config.write_text("thresholds:\n  exploding: 55\n", encoding="utf-8")
    assert cli.dashboards_main(["--config", str(config), "-o", str(tmp_path), "--check"]) == 1
