"""Alerting and dashboards: Prometheus rules and Grafana dashboards generated from the config.

The in-process detectors and the shipped alert rules read the same `thresholds:` section, so the rule
file and the dashboards are build outputs of `config/default.yaml` (see `gradflow-agent rules`).
"""

from gradflow_agent.alerting.rules import ALERTS, build_rule_groups, render_k8s, render_prometheus

__all__ = ["ALERTS", "build_rule_groups", "render_k8s", "render_prometheus"]
