"""HTMLReportGenerator: a FlowReport as one self-contained HTML page.

No external resource of any kind: inline CSS, charts drawn as inline SVG, and a tiny script that makes
every `table.sortable` sortable by clicking (or Enter/Space on) a header. Readable on a phone: a fluid
layout, tables scroll sideways inside their own box, charts scale with the viewport. Issues are colour
coded by severity, and the rows of layers with issues are highlighted.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from .console import fmt

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
SEVERITY_COLOUR = {"critical": "#b91c1c", "high": "#dc2626", "medium": "#d97706", "low": "#0891b2"}
STATUS_COLOUR = {"HEALTHY": "#16a34a", "WARNING": "#d97706", "CRITICAL": "#b91c1c"}

CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--bg:#f9fafb;--card:#fff;--line:#e5e7eb}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1200px;margin:0 auto;padding:16px}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.2rem;margin:1.6rem 0 .6rem}h3{font-size:1rem;margin:1rem 0 .4rem}
.meta{color:var(--muted);font-size:.85rem}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:10px;margin:12px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card .v{font-size:1.5rem;font-weight:600}.card .k{color:var(--muted);font-size:.8rem}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;background:var(--card);border:1px solid var(--line);
border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:.85rem}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap;vertical-align:top}
th{position:sticky;top:0;background:#f3f4f6;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.t,th.t{text-align:left}td.msg{white-space:normal;min-width:260px;text-align:left}
tr.sev-critical td{background:#fee2e2}tr.sev-high td{background:#fef2f2}tr.sev-medium td{background:#fffbeb}
tr.sev-low td{background:#ecfeff}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;color:#fff;font-size:.75rem;font-weight:600}
.chart{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px;margin:8px 0}
svg{max-width:100%;height:auto;display:block}
svg text{font:11px system-ui,sans-serif;fill:#374151}
details{background:var(--card);border:1px solid var(--line);border-radius:8px;margin:6px 0;padding:6px 10px}
summary{cursor:pointer;font-weight:600}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0}dl.kv dt{color:var(--muted)}
dl.kv dd{margin:0}
.ok{color:#16a34a;font-weight:600}
@media (max-width:640px){main{padding:8px}body{font-size:14px}th,td{padding:4px 6px}.card .v{font-size:1.2rem}}
"""

SCRIPT = """
(function(){
  function key(td){var v=td.getAttribute('data-v');if(v!==null&&v!==''){return parseFloat(v);}
    return td.textContent.trim().toLowerCase();}
  function num(x){return typeof x==='number'&&!isNaN(x);}
  function sortBy(table,col,th){
    var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
    var dir=th.getAttribute('aria-sort')==='ascending'?-1:1;
    rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
      if(num(x)&&num(y)){return (x-y)*dir;} if(num(x)){return -1;} if(num(y)){return 1;}
      return (x<y?-1:(x>y?1:0))*dir;});
    rows.forEach(function(r){body.appendChild(r);});
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',dir===1?'ascending':'descending');
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'),function(table){
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
      th.tabIndex=0;
      th.addEventListener('click',function(){sortBy(table,i,th);});
      th.addEventListener('keydown',function(e){
        if(e.key==='Enter'||e.key===' '){e.preventDefault();sortBy(table,i,th);}});
    });
    table.setAttribute('data-sortable','ready');
  });
  document.documentElement.setAttribute('data-report-ready','1');
})();
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _finite(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _ticks(lo: float, hi: float, n: int = 4, integer: bool = False) -> list[float]:
    if hi <= lo:
        return [lo]
    if integer:
        step = max(1, math.ceil((hi - lo) / n))
        return [float(v) for v in range(math.ceil(lo), math.floor(hi) + 1, step)]
    return [lo + (hi - lo) * k / n for k in range(n + 1)]


# -- SVG charts -----------------------------------------------------------------------------------------------
def svg_line_chart(x: Sequence[Any], ys: dict[str, Sequence[Any]], *, title: str = "", xlabel: str = "",
                   ylabel: str = "", log: bool = False, labels: Sequence[str] | None = None, width: int = 640,
                   height: int = 220) -> str:
    """Lines (with point markers) of every y series over x; log=True plots log10 of positive values."""
    def tr(v: Any) -> float | None:
        f = _num(v)
        if f is None:
            return None
        if log:
            return math.log10(f) if f > 0 else None
        return f

    xs = [_num(v) for v in x]
    series = {k: [tr(v) for v in vals] for k, vals in ys.items()}
    allx = [v for v in xs if v is not None]
    ally = [v for vals in series.values() for v in vals if v is not None]
    if not allx or not ally:
        return f'<div class="chart"><p class="meta">{esc(title)}: no data</p></div>'
    x0, x1 = min(allx), max(allx)
    y0, y1 = min(ally), max(ally)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 56, 12, 24, 36
    pw, ph = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<text x="{left}" y="14" font-weight="600">{esc(title)}</text>']
    for t in _ticks(y0, y1):
        yy = py(t)
        label = fmt(10 ** t) if log else fmt(t)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end">{esc(label)}</text>')
    integer_x = all(float(v).is_integer() for v in allx)
    for t in _ticks(x0, x1, integer=integer_x):
        xx = px(t)
        label = fmt(t)
        if labels is not None and abs(t - round(t)) < 1e-9 and 0 <= int(round(t)) < len(labels):
            label = str(labels[int(round(t))])[:14]
        parts.append(f'<text x="{xx:.1f}" y="{height - bottom + 14}" text-anchor="middle">{esc(label)}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#9ca3af"/>'
                 f'<line x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}" stroke="#9ca3af"/>')
    if xlabel:
        parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 4}" text-anchor="middle">{esc(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="12" y="{top + ph / 2:.0f}" transform="rotate(-90 12 {top + ph / 2:.0f})" '
                     f'text-anchor="middle">{esc(ylabel + (" (log)" if log else ""))}</text>')
    for k, (name, vals) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [(px(xv), py(yv)) for xv, yv in zip(xs, vals) if xv is not None and yv is not None]
        if len(pts) > 1:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{d}"/>')
        if len(pts) <= 60:
            parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.4" fill="{colour}"/>' for a, b in pts)
        lx = left + 8 + k * 150
        if lx < width - 60:
            parts.append(f'<rect x="{lx}" y="{top + 2}" width="10" height="3" fill="{colour}"/>'
                         f'<text x="{lx + 14}" y="{top + 7}">{esc(name[:22])}</text>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + "</div>"


def svg_bar_chart(labels: Sequence[str], values: Sequence[Any], *, title: str = "",
                  colours: Sequence[str] | None = None,
                  log: bool = False, refs: Sequence[tuple[float, str, str]] = (), width: int = 640,
                  row: int = 18, vmax: float | None = None) -> str:
    """Horizontal bars, one per label; log=True draws log10 of positive values; refs: (value, label, colour)."""
    vals = []
    for v in values:
        f = _num(v)
        vals.append(None if f is None or (log and f <= 0) else (math.log10(f) if log else f))
    finite = [v for v in vals if v is not None] + [math.log10(r[0]) if log else r[0] for r in refs
                                                   if (r[0] > 0 or not log)]
    if not finite:
        return f'<div class="chart"><p class="meta">{esc(title)}: no data</p></div>'
    lo = min(0.0, min(finite)) if not log else min(finite) - 0.5
    hi = vmax if vmax is not None else max(finite)
    if log:
        hi += 0.5
    if hi <= lo:
        hi = lo + 1
    left, right, top = 150, 60, 24
    height = top + row * len(labels) + 26
    pw = width - left - right

    def px(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<text x="4" y="14" font-weight="600">{esc(title)}</text>']
    for k, (label, v) in enumerate(zip(labels, vals)):
        y = top + k * row
        parts.append(f'<text x="{left - 6}" y="{y + row * 0.7:.1f}" text-anchor="end">{esc(str(label)[:22])}</text>')
        if v is None:
            parts.append(f'<text x="{left + 4}" y="{y + row * 0.7:.1f}" fill="#9ca3af">-</text>')
            continue
        colour = colours[k] if colours else PALETTE[0]
        x0 = px(max(lo, 0.0) if not log else lo)
        w = max(1.0, px(v) - x0)
        shown = fmt(10 ** v) if log else fmt(v)
        parts.append(f'<rect x="{x0:.1f}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{colour}" rx="2"/>'
                     f'<text x="{x0 + w + 4:.1f}" y="{y + row * 0.7:.1f}">{esc(shown)}</text>')
    for value, label, colour in refs:
        if log and value <= 0:
            continue
        xx = px(math.log10(value) if log else value)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top - 4}" y2="{height - 22}" stroke="{colour}" '
                     f'stroke-dasharray="4 3"/><text x="{xx:.1f}" y="{height - 8}" text-anchor="middle" '
                     f'fill="{colour}">{esc(label)}</text>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + "</div>"


def svg_sparkline(values: Sequence[Any], width: int = 120, height: int = 26, log: bool = True) -> str:
    """A tiny inline trend line (log10 of positive values by default)."""
    pts = []
    for k, v in enumerate(values):
        f = _num(v)
        if f is None or (log and f <= 0):
            continue
        pts.append((k, math.log10(f) if log else f))
    if len(pts) < 2:
        return ""
    x1 = max(p[0] for p in pts) or 1
    lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
    span = (hi - lo) or 1.0
    d = " ".join(f"{2 + p[0] / x1 * (width - 4):.1f},{height - 3 - (p[1] - lo) / span * (height - 6):.1f}"
                 for p in pts)
    return (f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" aria-hidden="true">'
            f'<polyline fill="none" stroke="#2563eb" stroke-width="1.4" points="{d}"/></svg>')


# -- tables -------------------------------------------------------------------------------------------------
def cell(v: Any, cls: str = "") -> str:
    f = _num(v) if not isinstance(v, bool) else None
    data = f' data-v="{f!r}"' if f is not None else ' data-v=""'
    c = f' class="{cls}"' if cls else ("" if f is not None else ' class="t"')
    return f"<td{c}{data}>{esc(fmt(v))}</td>"


def html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, table_id: str = "",
               row_classes: Sequence[str] | None = None) -> str:
    tid = f' id="{esc(table_id)}"' if table_id else ""
    head = "".join(f'<th scope="col"{" class=t" if k == 0 else ""}>{esc(c)}</th>' for k, c in enumerate(columns))
    body = []
    for k, row in enumerate(rows):
        rc = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        body.append(f"<tr{rc}>" + "".join(cell(v) for v in row) + "</tr>")
    return (f'<div class="scroll"><table class="sortable"{tid}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


class HTMLReportGenerator:
    """Renders a FlowReport; `generate(report)` returns the page."""

    def generate(self, report: Any) -> str:
        s = report.summary()
        parts = [self._header(report, s), self._charts(report), self._issues(report), self._layers(report),
                 self._layer_details(report), self._sections(report)]
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{esc(report.title)}</title><style>{CSS}</style></head><body><main>"
                + "".join(parts) + f"</main><script>{SCRIPT}</script></body></html>\n")

    @staticmethod
    def _header(report: Any, s: dict[str, Any]) -> str:
        colour = STATUS_COLOUR.get(s["overall_status"], "#374151")
        meta = report.meta
        info = " · ".join(esc(f"{k}: {meta[k]}") for k in ("analyzer", "model", "steps", "device", "created")
                          if meta.get(k) not in (None, ""))
        cards = [("overall health", f'<span style="color:{colour}">{s["overall_score"]:.0f}</span>'),
                 ("status", f'<span style="color:{colour}">{esc(s["overall_status"])}</span>'),
                 ("layers", str(s["layers"])), ("issues", str(s["issues"]))]
        cards += [(f"{k} issues", f'<span style="color:{SEVERITY_COLOUR[k]}">{v}</span>')
                  for k, v in s["issues_by_severity"].items()]
        card_html = "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{esc(k)}</div></div>'
                            for k, v in cards)
        return (f'<header><h1 id="title">{esc(report.title)}</h1><div class="meta">{info}</div></header>'
                f'<section id="summary"><div class="cards">{card_html}</div></section>')

    @staticmethod
    def _charts(report: Any) -> str:
        layers = [m for m in report.layers if m.depth >= 0] or list(report.layers)
        layers = sorted(layers, key=lambda m: m.depth)[:80]
        names = [m.layer for m in layers]
        health = [report.health[m.layer].score if m.layer in report.health else None for m in layers]
        colours = [STATUS_COLOUR.get(report.health[m.layer].status.value, "#6b7280") if m.layer in report.health
                   else "#6b7280" for m in layers]
        th = report.meta.get("thresholds", {})
        refs = []
        if _num(th.get("vanishing")):
            refs.append((float(th["vanishing"]), "vanishing", "#0891b2"))
        if _num(th.get("exploding")):
            refs.append((float(th["exploding"]), "exploding", "#b91c1c"))
        out = ['<section id="charts"><h2>Gradient flow</h2>',
               svg_bar_chart(names, health, title="Health score per layer (forward order)", colours=colours, vmax=100,
                             refs=[(75.0, "75", "#16a34a"), (50.0, "50", "#b91c1c")]),
               svg_bar_chart(names, [m.mean_pressure for m in layers], title="Gradient pressure per layer (log scale)",
                             log=True, refs=refs)]
        h = report.history
        if h.get("steps") and len(h["steps"]) > 1:
            out.append(svg_line_chart(h["steps"], {"loss": h.get("loss", [])}, title="Loss per step",
                                      xlabel="step", ylabel="loss"))
            out.append(svg_line_chart(h["steps"], {"global gradient norm": h.get("grad_norm", [])},
                                      title="Global gradient norm per step", xlabel="step", ylabel="norm", log=True))
        out.append("</section>")
        return "".join(out)

    @staticmethod
    def _issues(report: Any) -> str:
        if not report.issues:
            return '<section id="issues"><h2>Issues</h2><p class="ok">No issues found.</p></section>'
        rows, classes = [], []
        for i in report.issues:
            rows.append([i.severity.value, i.issue_type.value, i.layer, i.value, i.threshold, i.message,
                         i.recommendation])
            classes.append(f"sev-{i.severity.value}")
        head = ["severity", "type", "layer", "value", "threshold", "message", "recommendation"]
        body = []
        rank = {"critical": 3, "high": 2, "medium": 1, "low": 0}
        for row, cls in zip(rows, classes):
            sev = row[0]
            badge = f'<span class="badge" style="background:{SEVERITY_COLOUR[sev]}">{esc(sev)}</span>'
            body.append(f'<tr class="{cls}"><td class="t" data-v="{rank[sev]}">{badge}</td>'
                        f'<td class="t" data-v="">{esc(row[1])}</td><td class="t" data-v="">{esc(row[2])}</td>'
                        f"{cell(row[3])}{cell(row[4])}<td class=\"msg\" data-v=\"\">{esc(row[5])}</td>"
                        f'<td class="msg" data-v="">{esc(row[6])}</td></tr>')
        th = "".join(f'<th scope="col" class="t">{esc(c)}</th>' for c in head)
        return (f'<section id="issues"><h2>Issues ({len(rows)})</h2><div class="scroll">'
                f'<table class="sortable" id="issues-table"><thead><tr>{th}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div></section>')

    @staticmethod
    def _layers(report: Any) -> str:
        worst: dict[str, str] = {}
        rank = {"critical": 3, "high": 2, "medium": 1, "low": 0}
        for i in report.issues:
            if i.layer not in worst or rank[i.severity.value] > rank[worst[i.layer]]:
                worst[i.layer] = i.severity.value
        cols = ["layer", "type", "depth", "pressure", "max", "turbulence", "velocity", "zero grad", "zero act",
                "dead units", "saturation", "eff. rank in", "eff. rank out", "gain", "issues", "health", "status",
                "pressure trend"]
        body = []
        for m in report.layers:
            h = report.health.get(m.layer)
            status = h.status.value if h else "-"
            cls = f' class="sev-{worst[m.layer]}"' if m.layer in worst else ""
            n_issues = len(h.issues) if h else 0
            cells = [f'<td class="t" data-v="">{esc(m.layer)}</td>',
                     f'<td class="t" data-v="">{esc(m.layer_type)}</td>']
            cells += [cell(v) for v in (m.depth, m.mean_pressure, m.max_pressure, m.turbulence, m.velocity,
                                        m.grad_zero_ratio, m.activation_zero_ratio, m.dead_unit_ratio,
                                        m.saturation_ratio, m.effective_rank_in, m.effective_rank_out,
                                        m.gradient_gain, n_issues, h.score if h else None)]
            colour = STATUS_COLOUR.get(status, "#6b7280")
            cells.append(f'<td class="t" data-v=""><span class="badge" style="background:{colour}">'
                         f"{esc(status)}</span></td>")
            cells.append(f'<td class="t" data-v="">{svg_sparkline(m.pressure_history)}</td>')
            body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
        head = "".join(f'<th scope="col"{" class=t" if c in ("layer", "type", "status", "pressure trend") else ""}>'
                       f"{esc(c)}</th>" for c in cols)
        return (f'<section id="layers"><h2>Layers ({len(report.layers)})</h2><div class="scroll">'
                f'<table class="sortable" id="layers-table"><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div></section>')

    @staticmethod
    def _layer_details(report: Any, limit: int = 60) -> str:
        """Per-layer pressure charts and advice; layers with issues first and open."""
        flagged = {i.layer for i in report.issues}
        ordered = sorted(report.layers, key=lambda m: (m.layer not in flagged, m.depth))
        chosen = [m for m in ordered if _finite(m.pressure_history) or m.layer in flagged][:limit]
        if not chosen:
            return ""
        out = ['<section id="layer-details"><h2>Per-layer detail</h2>']
        for m in chosen:
            h = report.health.get(m.layer)
            opened = " open" if m.layer in flagged else ""
            head = f"{m.layer} ({m.layer_type})" + (f" — health {h.score:.0f} {h.status.value}" if h else "")
            body = []
            if _finite(m.pressure_history):
                body.append(svg_line_chart(list(range(len(m.pressure_history))), {"pressure": m.pressure_history},
                                           title=f"{m.layer}: gradient pressure per step", xlabel="step",
                                           ylabel="pressure", log=True, height=180))
            if h and h.issues:
                body.append("<ul>" + "".join(f"<li><b>{esc(i.issue_type.value)}</b> ({esc(i.severity.value)}): "
                                             f"{esc(i.message)}</li>" for i in h.issues) + "</ul>")
            if h and h.recommendations:
                body.append("<p><b>What to do</b></p><ul>" + "".join(f"<li>{esc(r)}</li>" for r in h.recommendations)
                            + "</ul>")
            if h and h.components:
                body.append('<dl class="kv">' + "".join(f"<dt>penalty: {esc(k)}</dt><dd>{esc(fmt(v))}</dd>"
                                                         for k, v in h.components.items()) + "</dl>")
            out.append(f"<details{opened}><summary>{esc(head)}</summary>{''.join(body)}</details>")
        out.append("</section>")
        return "".join(out)

    @staticmethod
    def _sections(report: Any) -> str:
        out = []
        for key, sec in report.sections.items():
            parts = [f'<section id="section-{esc(key)}"><h2>{esc(sec.get("title", key))}</h2>']
            if sec.get("notes"):
                parts.append(f'<p class="meta">{esc(sec["notes"])}</p>')
            if sec.get("summary"):
                parts.append('<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>"
                                                         for k, v in sec["summary"].items()) + "</dl>")
            for s in sec.get("series", []):
                parts.append(svg_line_chart(s["x"], s["y"], title=s.get("title", ""), xlabel=s.get("xlabel", ""),
                                            ylabel=s.get("ylabel", ""), log=bool(s.get("log")),
                                            labels=s.get("labels")))
            for k, t in enumerate(sec.get("tables", [])):
                parts.append(f"<h3>{esc(t['title'])}</h3>")
                parts.append(html_table(t["columns"], t["rows"], table_id=f"{key}-table-{k}"))
            parts.append("</section>")
            out.append("".join(parts))
        return "".join(out)
