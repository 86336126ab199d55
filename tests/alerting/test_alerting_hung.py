"""TrainingHung in a real Prometheus: a process that stops stepping while it still serves its metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from gradflow_agent.alerting.rules import build_rule_groups, render_prometheus
from tests.support.prometheus import PrometheusServer, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_training_hung_fires_when_steps_stop_but_the_target_stays_up(tmp_path):
    rules = yaml.safe_load(render_prometheus(build_rule_groups(hung_after="8s")))
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        if rule.get("alert") == "TrainingHung":
            rule["for"] = "0s"
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump(rules), encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADFLOW_")}
    env.update(OMP_NUM_THREADS="1", GRADFLOW_SAMPLING_EXPORT_EVERY_SECONDS="0.5")
    # ~12 s of training (stepping), then it lingers: up, serving, no step
    proc = subprocess.Popen([sys.executable, "-m", "gradflow_agent", "demo", "--steps", "200", "--step-delay",
                             "0.06", "--port", str(port), "--addr", "127.0.0.1", "--linger", "90", "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    config = {"scrape_configs": [{"job_name": "gradflow", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}
    try:
        with PrometheusServer(config, rule_files=[rule_file]) as prom:
            prom.wait_until(lambda: prom.query("gradflow_steps_total > 0"), timeout=60, what="the run to step")
            prom.wait_until(lambda: prom.query("changes(gradflow_steps_total[8s]) > 0"), timeout=20,
                            what="steps within the window")
            assert not prom.query('ALERTS{alertname="TrainingHung"}'), "fired while the run was stepping"
            prom.wait_until(lambda: prom.query('ALERTS{alertname="TrainingHung", alertstate="firing"}'),
                            timeout=60, what="TrainingHung after the run stopped stepping")
            assert proc.poll() is None, "the process is still up: hung, not down"
            assert prom.query("up == 1")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
