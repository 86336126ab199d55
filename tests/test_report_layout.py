"""The HTML report as a reader sees it, measured in headless Chromium (DevTools protocol over a pipe, with the
viewport set exactly: 1280 px, and 375 px with phone emulation), the text report at 80 columns, and the
Jupyter views (`_repr_html_`), which must escape what they show.

The report is that of a recorded 300-step demo run (one record every 10 steps): time axes must end at step
300, not at snapshot 31.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gf_screenshots", REPO / "scripts" / "screenshots.py")
shots = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shots)

STEPS = 300
NASTY = "<x-evil>enc&dec</x-evil>"  # a layer name that is also markup


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> Path:
    return shots.record_demo_run(tmp_path_factory.mktemp("run") / "run.jsonl", "dead", STEPS)


@pytest.fixture(scope="module")
def report(record):
    return shots.demo_report(record)


@pytest.fixture(scope="module")
def page(report, tmp_path_factory) -> Path:
    return report.save_html(tmp_path_factory.mktemp("page") / "report.html")


@pytest.fixture(scope="module")
def browser():
    if not shots.find_chromium():
        pytest.fail(f"headless Chromium is needed to test the HTML report's layout: {shots.INSTALL}")
    with shots.Browser() as b:
        yield b


PROBE = r"""(() => {
  const R = e => { const r = e.getBoundingClientRect();
    return {l: r.left, r: r.right, t: r.top, b: r.bottom, w: r.width, h: r.height}; };
  const main = document.querySelector('main.gf') || document.querySelector('main') || document.body;
  const cs = getComputedStyle(main);
  const content = main.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const charts = [...document.querySelectorAll('figure.chart, div.chart')].map(f => {
    const svgs = [...f.querySelectorAll('svg.yaxis, svg.area, svg.cbar')];
    const outside = [], overlaps = [];
    for (const s of svgs) {
      const box = R(s);
      const ticks = [...s.querySelectorAll(':scope > text')].map(t => ({text: t.textContent, ...R(t),
                                                                         cls: t.getAttribute('class') || ''}));
      for (const t of ticks) {
        if (t.l < box.l - 0.5 || t.r > box.r + 0.5 || t.t < box.t - 0.5 || t.b > box.b + 0.5) {
          outside.push(t.text); }
      }
      const xt = ticks.filter(t => t.cls.includes('xtick'));
      for (let i = 1; i < xt.length; i++) {
        if (xt[i].l < xt[i - 1].r + 2) { overlaps.push([xt[i - 1].text, xt[i].text]); } }
      const yt = ticks.filter(t => t.cls.includes('ytick') || t.cls.includes('rowlabel'));
      for (let i = 1; i < yt.length; i++) {
        const a = yt[i - 1], b = yt[i];
        if (Math.min(a.b, b.b) - Math.max(a.t, b.t) > 1) { overlaps.push([a.text, b.text]); } }
    }
    const area = f.querySelector('svg.area');
    const xt = area ? [...area.querySelectorAll(':scope > text.xtick')].map(t => t.textContent) : [];
    const fc = f.querySelector('figcaption');
    const all = [...f.querySelectorAll('svg')].map(R);  // what is drawn, not the card around it
    const width = all.length ? Math.max(...all.map(b => b.r)) - Math.min(...all.map(b => b.l)) : 0;
    const p = f.parentElement, ps = getComputedStyle(p);  // a chart in a <details> fills the details
    const room = Math.min(content, p.clientWidth - parseFloat(ps.paddingLeft) - parseFloat(ps.paddingRight));
    return {kind: f.dataset.chart || 'old', title: fc ? fc.textContent : '', width, room,
            xmax: f.dataset.xMax === undefined ? null : parseFloat(f.dataset.xMax),
            rows: f.dataset.rows === undefined ? null : parseInt(f.dataset.rows),
            hrows: [...f.querySelectorAll('g.hrow')].map(g => g.dataset.layer),
            last_xtick: xt.length ? xt[xt.length - 1] : null, outside, overlaps};
  });
  const tables = [...document.querySelectorAll('table')].map(t => {
    const heads = [...t.tHead.rows[0].cells].map(c => c.textContent.trim());
    const blank = c => ['-', ''].includes(c.textContent.trim()) && !c.querySelector('svg, span');
    const empty = heads.filter((h, i) => t.tBodies[0].rows.length &&
      [...t.tBodies[0].rows].every(r => blank(r.cells[i])));
    const box = t.closest('.scroll');
    return {id: t.id, heads, empty, width: t.scrollWidth, box: box ? box.clientWidth : null,
            cells: [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent.trim()))};
  });
  const vw = document.documentElement.clientWidth, wide = [];
  for (const e of document.body.querySelectorAll('*')) {
    if (e.closest('.scroll') || e.closest('svg.area, svg.yaxis, svg.cbar') && e.tagName !== 'svg') { continue; }
    const r = e.getBoundingClientRect();
    if (r.width && (r.right > vw + 1 || r.left < -1)) { wide.push(e.tagName + '.' + (e.getAttribute('class') || '')); }
  }
  return {content, charts, tables, wide, vw, scroll: document.documentElement.scrollWidth,
          ready: document.documentElement.getAttribute('data-report-ready')};
})()"""


def _probe(browser, page: Path, width: int, mobile: bool = False) -> dict:
    browser.open(page.as_uri(), width, 900, mobile=mobile)
    data = browser.evaluate(PROBE)
    assert browser.console_errors() == []
    assert data["ready"] == "1" and data["vw"] == width
    return data


def _check_charts(data: dict, report) -> None:
    charts = data["charts"]
    assert charts, "no charts"
    for c in charts:
        if c["kind"] == "empty":
            continue
        assert c["width"] >= 0.9 * data["content"] or (c["room"] < data["content"] and c["width"] >= 0.9 * c["room"]), \
            (c["title"], c["width"], c["room"], data["content"])
        assert c["outside"] == [], f"{c['title']}: tick labels outside their SVG: {c['outside']}"
        assert c["overlaps"] == [], f"{c['title']}: overlapping tick labels: {c['overlaps']}"
    heat = {c["title"]: c for c in charts if c["kind"] == "heatmap"}
    pressure = next((c for t, c in heat.items() if t.startswith("Gradient pressure")), None)
    assert pressure is not None, "no layer x step heatmap of gradient pressure"
    with_grad = sorted((m for m in report.layers if any(math.isfinite(v) for v in m.pressure_history)),
                       key=lambda m: m.depth)
    assert pressure["rows"] == len(pressure["hrows"]) == len(with_grad)
    assert pressure["hrows"] == [m.layer for m in with_grad]
    assert any(t.startswith("Activation zero ratio") for t in heat) and any(t.startswith("Update ratio") for t in heat)
    assert any(t.startswith("Dead-unit ratio") for t in heat)
    last = report.history["steps"][-1]
    assert last == STEPS
    timed = [c for c in charts if c["kind"] == "heatmap" or c["title"] in ("Loss", "Global gradient norm")
             or c["title"].endswith(": gradient pressure")]
    assert len(timed) >= 6
    for c in timed:  # real optimizer steps, not snapshot indices
        assert c["xmax"] == last and c["last_xtick"] == str(last), c["title"]
    depth = [c for c in charts if c["title"] in ("Gradient pressure by layer", "Activation ratios by layer",
                                                 "Update ratio by layer", "Health score by layer")]
    assert depth and all(c["xmax"] == max(m.depth for m in report.layers) for c in depth)


def test_report_layout_at_1280(browser, page, report):
    data = _probe(browser, page, 1280)
    _check_charts(data, report)
    assert data["scroll"] <= data["vw"] and data["wide"] == []
    tables = {t["id"]: t for t in data["tables"]}
    layers = tables["layers-table"]
    assert layers["width"] <= layers["box"], "the Layers table does not fit at 1280 px"
    for t in data["tables"]:
        assert t["empty"] == [], f"{t['id']}: columns with no data: {t['empty']}"
    issues = tables["issues-table"]
    assert "since step" in issues["heads"]
    dead = next(r for r in issues["cells"] if r[issues["heads"].index("layer")] == "3")
    first = next(i for i in report.issues if i.layer == "3").details["first_step"]
    assert dead[issues["heads"].index("since step")] == str(first) and first < STEPS


def test_report_layout_on_a_phone(browser, page, report, tmp_path):
    data = _probe(browser, page, 375, mobile=True)
    _check_charts(data, report)
    assert data["scroll"] <= 375, "the page scrolls sideways"
    assert data["wide"] == [], f"wider than the 375 px viewport: {data['wide'][:10]}"
    png = browser.screenshot(tmp_path / "phone.png", max_height=1200).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (375, 1200)


def test_report_without_per_layer_history_says_so(browser, report, tmp_path):
    """A report without `layer_stats` (an analysis, an older recording) still draws the pressure heatmap
    and leaves out the others; every chart keeps its layout."""
    plain = dataclasses.replace(report, history={k: v for k, v in report.history.items() if k != "layer_stats"})
    data = _probe(browser, plain.save_html(tmp_path / "plain.html"), 1280)
    titles = [c["title"] for c in data["charts"] if c["kind"] == "heatmap"]
    assert len(titles) == 1 and titles[0].startswith("Gradient pressure")


def _renamed(report, old: str, new: str):
    layers = [dataclasses.replace(m, layer=new if m.layer == old else m.layer) for m in report.layers]
    health = {(new if k == old else k): dataclasses.replace(h, layer=new if h.layer == old else h.layer)
              if hasattr(h, "layer") else h for k, h in report.health.items()}
    issues = [dataclasses.replace(i, layer=new if i.layer == old else i.layer) for i in report.issues]
    return dataclasses.replace(report, layers=layers, health=health, issues=issues)


def test_text_report_fits_80_columns(report):
    from gradflow_agent.report.console import ConsoleReporter

    long = _renamed(report, "3", "encoder.layers.11.self_attention.output_projection.dense")
    for r in (report, long):
        text = ConsoleReporter.format_report(r)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80, max(lines, key=len)
        assert "since" in text and "Layers" in text and "dead" in text
        for width in (60, 100):
            assert max(len(line) for line in ConsoleReporter.format_report(r, width=width).splitlines()) <= width
    layer_head = next(line for line in ConsoleReporter.format_report(report).splitlines()
                      if line.lstrip().startswith("layer "))
    assert "pressure" in layer_head and "health" in layer_head and "status" in layer_head
    assert "eff. rank" not in layer_head and "gain" not in layer_head  # no data in a recording: left out
    assert report.to_text(80) == ConsoleReporter.format_report(report, width=80)


def _assert_escaped(fragment: str) -> None:
    assert NASTY not in fragment and "<x-evil" not in fragment
    assert "&lt;x-evil&gt;enc&amp;dec&lt;/x-evil&gt;" in fragment
    css = re.search(r"<style>(.*?)</style>", fragment, re.S).group(1)
    selectors = [s.strip() for block in re.findall(r"(?:^|})\s*([^{}@]+)\{", css) for s in block.split(",")]
    assert selectors and all(s.startswith(".gf") for s in selectors), "notebook CSS must stay inside .gf"


def test_repr_html_of_a_report_escapes_layer_names(report, browser, tmp_path):
    nasty = _renamed(report, "3", NASTY)
    fragment = nasty._repr_html_()
    _assert_escaped(fragment)
    assert 'id="layers-table"' in fragment and 'data-chart="heatmap"' in fragment
    host = tmp_path / "notebook.html"  # a notebook-like host page: the fragment inside other content
    host.write_text("<!DOCTYPE html><html><head><meta name=viewport content='width=device-width'></head>"
                    f"<body><p>cell output:</p><main class='gf' style='display:contents'></main>{fragment}</body>"
                    "</html>")
    browser.open(host.as_uri(), 1000, 900)
    assert browser.evaluate("document.querySelectorAll('g.hrow[data-layer=\"' + CSS.escape('" + NASTY
                            + "') + '\"]').length") >= 1
    assert browser.console_errors() == []


def test_repr_html_of_snapshot_issue_and_issue_list():
    import numpy as np
    import torch

    import gradflow_agent
    from gradflow_agent import demo
    from gradflow_agent.detect.issues import Issue, IssueList

    torch.set_num_threads(1)
    w = demo.build("dead")
    agent = gradflow_agent.attach(w.model, {"exporters": {"prometheus": {"enabled": False}},
                                            "sampling": {"export_every_n_steps": 10, "window": 20},
                                            "thresholds": {"warmup_steps": 10}}, optimizer=w.optimizer)
    try:
        for step in range(40):
            demo.train_step(w, step, agent)
        issues = agent.issues()
        snap = agent.snapshot()
    finally:
        agent.detach()
    assert type(issues) is IssueList and isinstance(issues, list) and issues == list(issues)
    assert "dead" in {i.kind for i in issues} and "<table" in issues._repr_html_()
    layers = tuple(NASTY if name == "3" else name for name in snap.layers)
    nasty_issue = dataclasses.replace(next(i for i in issues if i.kind == "dead"), layer=NASTY,
                                      message="ratio < threshold & rising", first_step=20)
    snap = dataclasses.replace(snap, layers=layers, issues=(nasty_issue,))
    for fragment in (snap._repr_html_(), nasty_issue._repr_html_(), IssueList([nasty_issue])._repr_html_()):
        _assert_escaped(fragment)
        assert "ratio &lt; threshold &amp; rising" in fragment and "since step" in fragment
    page = snap._repr_html_()
    assert f"Snapshot at step {snap.step}" in page and page.count("<tr") == len(snap.layers) + 3  # 2 heads, 1 issue
    assert "<table" in IssueList()._repr_html_() or "No issues" in IssueList()._repr_html_()
    plain = Issue("vanishing", "0", "warning", float("nan"), 1e-7, 5, "m", "r")
    assert "since step" not in plain._repr_html_()  # no start step known: no empty column
    assert np.isfinite(snap.grad_norm)
