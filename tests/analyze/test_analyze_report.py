"""FlowReport: JSON/text/console/HTML outputs, the `report` CLI on a recorded run, and the HTML page in a real
headless Chromium (tables, sorting, phone width, no script errors) plus the documented screenshot command."""

from __future__ import annotations

import html
import io
import json
import math
import re
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import gradflow_agent
from gradflow_agent import demo
from gradflow_agent.analyze import FlowReport, GradientFlowAnalyzer, IssueSeverity
from gradflow_agent.analyze import pathologies as P
from gradflow_agent.export.jsonl import read_snapshots
from gradflow_agent.report.cli import main as report_main

REPO = Path(__file__).resolve().parents[2]
X, Y = P.classification_data()
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report() -> FlowReport:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    a = GradientFlowAnalyzer(P.hourglass(), enable_vector_analysis=True, enable_jacobian=True)
    a.analyze(lambda: X, lambda out: F.cross_entropy(out, Y), steps=4)
    torch.set_num_threads(n)
    return a.report


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("headless Chromium is needed to test the HTML report: apt-get install -y chromium")
    return path


def run_chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), *FLAGS, f"--user-data-dir={tmp_path / ('profile-' + uuid.uuid4().hex)}",
           "--enable-logging=stderr", "--v=0", *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_json_round_trip_and_queries(report, tmp_path):
    path = report.save_json(tmp_path / "r.json")
    back = FlowReport.load_json(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.summary() == report.summary()
    assert [i.issue_type for i in back.issues] == [i.issue_type for i in report.issues]
    assert back.get_layer("4").effective_rank_out == pytest.approx(report.get_layer("4").effective_rank_out)
    by = report.get_issues_by_severity()
    assert list(by) == ["critical", "high", "medium", "low"]
    assert sum(len(v) for v in by.values()) == len(report.issues)
    assert report.get_issues_by_severity(IssueSeverity.MEDIUM) == by["medium"]
    assert "bottleneck" in {i.kind for i in report.issues}
    with pytest.raises(ValueError):
        FlowReport.from_dict({"schema": "something else"})


def test_text_and_console(report, tmp_path):
    text = report.save_text(tmp_path / "r.txt").read_text()
    assert "bottleneck" in text and "Layers" in text and "Vector analysis" in text and "\x1b[" not in text
    buf = io.StringIO()
    console = Console(file=buf, width=140, force_terminal=True, color_system="truecolor")
    report.print_summary(console=console)
    report.print_issues(console=console)
    report.print_layers(console=console)
    out = buf.getvalue()
    assert "overall health" in out and "bottleneck" in out and "\x1b[" in out  # colour codes


def test_cli_turns_a_recorded_run_into_reports(tmp_path, capsys):
    record = tmp_path / "run.jsonl"
    w = demo.build("dead")
    cfg = {"exporters": {"prometheus": {"enabled": False}, "jsonl": {"enabled": True, "path": str(record)}},
           "sampling": {"export_every_n_steps": 10, "window": 20}, "thresholds": {"warmup_steps": 10},
           "stats": {"parameters": {"every_n_steps": 1}}}
    agent = gradflow_agent.attach(w.model, cfg, optimizer=w.optimizer)
    for step in range(60):
        demo.train_step(w, step, agent)
    agent.detach()
    assert report_main([str(record), "-o", str(tmp_path / "run.html")]) == 0
    assert "html report of" in capsys.readouterr().out
    page = (tmp_path / "run.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="layers-table"' in page
    assert report_main([str(record), "-o", str(tmp_path / "run.json"), "--quiet"]) == 0
    data = json.loads((tmp_path / "run.json").read_text())
    assert ("dead", "3") in {(i["issue_type"], i["layer"]) for i in data["issues"]}  # the demo's dead layer
    assert len(data["history"]["steps"]) == len(read_snapshots(record)) == 8  # attach, 6 intervals of 10, detach
    assert report_main([str(record), "--format", "text", "-o", str(tmp_path / "run.txt"), "--quiet"]) == 0
    assert "dead" in (tmp_path / "run.txt").read_text()
    assert report_main([str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_html_is_self_contained(report, tmp_path):
    page = report.save_html(tmp_path / "r.html").read_text()
    assert "<link" not in page and not re.search(r"\bsrc\s*=", page) and "http://" not in page \
        and "https://" not in page and "@import" not in page
    assert page.count("<svg") >= 4 and 'name="viewport"' in page
    for table_id in ("issues-table", "layers-table"):
        assert f'id="{table_id}"' in page


PROBE = """<script>
(function(){
  var out = {};
  try {
    var t = document.getElementById('layers-table');
    var ths = t.tHead.rows[0].cells, col = -1;
    for (var i = 0; i < ths.length; i++) { if (ths[i].textContent.trim() === 'pressure') { col = i; } }
    var names = function(){ return Array.prototype.map.call(t.tBodies[0].rows, function(r){
      return r.cells[0].textContent; }); };
    ths[col].click(); out.asc = names(); out.asc_state = ths[col].getAttribute('aria-sort');
    ths[col].click(); out.desc = names(); out.desc_state = ths[col].getAttribute('aria-sort');
    out.ready = document.documentElement.getAttribute('data-report-ready');
    out.sortable = document.querySelectorAll('table.sortable[data-sortable=ready]').length;
    out.tables = document.querySelectorAll('table').length;
    out.width = document.documentElement.scrollWidth;
    out.viewport = window.innerWidth;
  } catch (e) { out.error = String(e); }
  document.body.setAttribute('data-probe', JSON.stringify(out));
})();
</script></body>"""


def _probe(report: FlowReport, tmp_path: Path, size: str) -> tuple[dict, subprocess.CompletedProcess]:
    page = report.save_html(tmp_path / "r.html").read_text()
    probe_page = tmp_path / f"probe-{size.replace(',', 'x')}.html"
    probe_page.write_text(page.replace("</body>", PROBE))
    proc = run_chromium(probe_page, tmp_path, f"--window-size={size}", "--dump-dom")
    m = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert m, proc.stderr[-2000:]
    return json.loads(html.unescape(m.group(1))), proc


def test_html_report_in_headless_chromium(report, tmp_path):
    data, proc = _probe(report, tmp_path, "1280,2000")
    assert proc.returncode == 0 and "error" not in data, data
    assert console_lines(proc.stderr) == []  # no script error, no console output at all
    assert data["ready"] == "1"
    n_tables = 2 + sum(len(s.get("tables", [])) for s in report.sections.values())
    assert data["sortable"] == data["tables"] == n_tables
    finite = sorted((m for m in report.layers if math.isfinite(m.mean_pressure)), key=lambda m: m.mean_pressure)
    assert data["asc"][:len(finite)] == [m.layer for m in finite] and data["asc_state"] == "ascending"
    assert data["desc"][:len(finite)] == [m.layer for m in reversed(finite)] and data["desc_state"] == "descending"
    assert set(data["asc"][len(finite):]) == {m.layer for m in report.layers if not math.isfinite(m.mean_pressure)}

    phone, proc = _probe(report, tmp_path, "390,844")  # headless windows are at least 500 px wide
    assert console_lines(proc.stderr) == []
    assert phone["viewport"] <= 500 and phone["width"] <= phone["viewport"] + 1  # tables scroll inside their box


def test_the_browser_check_catches_script_errors(report, tmp_path):
    page = report.save_html(tmp_path / "r.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("<script>", "<script>undefinedReportFunction();</script><script>", 1))
    proc = run_chromium(broken, tmp_path, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console_lines(proc.stderr)), proc.stderr[-2000:]


def test_documented_screenshot_command(report, tmp_path):
    chromium()
    page = report.save_html(tmp_path / "r.html")
    out = tmp_path / "shot.png"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "report_screenshot.sh"), str(page), str(out), "390", "900"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (390, 900)


def test_a_recorded_run_reports_the_issues_the_agent_recorded(tmp_path):
    """The report of a recording shows the agent's own issues (not a recomputation from whole-run
    averages), their worst severity, and an overall status that follows the worst of them."""
    from gradflow_agent.analyze.offline import report_from_records

    record = tmp_path / "run.jsonl"
    w = demo.build("saturated")
    cfg = {"exporters": {"prometheus": {"enabled": False}, "jsonl": {"enabled": True, "path": str(record)}},
           "sampling": {"export_every_n_steps": 10, "window": 20}, "thresholds": {"warmup_steps": 10}}
    agent = gradflow_agent.attach(w.model, cfg, optimizer=w.optimizer)
    for step in range(40):
        demo.train_step(w, step, agent)
    agent.detach()
    records = read_snapshots(record)
    recorded = {(i["kind"], i["layer"], i["severity"]) for r in records for i in r["issues"]}
    assert ("saturated", "1", "warning") in recorded
    # a later record with a critical issue on another layer, as a run that degraded at its end
    last = dict(records[-1])
    last["issues"] = [*last["issues"], {"kind": "exploding", "layer": "2", "severity": "critical", "value": 50.0,
                                       "threshold": 10.0, "step": last["step"], "message": "boom",
                                       "recommendation": "clip"}]
    report = report_from_records([*records, last])
    found = {(i.issue_type.value, i.layer) for i in report.issues}
    assert {("saturated", "1"), ("exploding", "2")} <= found
    assert report.overall_status == "CRITICAL"
    assert report.health["2"].status.value == "CRITICAL" and report.health["1"].status.value == "WARNING"
    saturated = next(i for i in report.issues if i.issue_type.value == "saturated")
    assert saturated.details["first_step"] <= saturated.step
