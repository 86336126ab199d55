"""HTMLReportGenerator: a FlowReport as one self-contained HTML page (and as notebook output).

No external resource of any kind: inline CSS, charts drawn as inline SVG, and a tiny script that makes
every `table.sortable` sortable by clicking (or Enter/Space on) a header.

Charts are laid out by the browser, not scaled: a chart is a fixed-width axis SVG (tick labels sized to
their text) next to a plot SVG that is 100% of the width left, whose data sit in a nested SVG stretched
to it (`preserveAspectRatio="none"`, non-scaling strokes) and whose x tick labels are placed in percent.
So text is 11 px at any width, a chart fills its card at 1280 px and on a phone, and no label is clipped.
Time axes count optimizer steps (each snapshot's `step`), never snapshots.

Everything the page shows is also available as a fragment scoped under `.gf` (`report_fragment`,
`snapshot_html`, `issues_html`): what Jupyter displays for a FlowReport, a Snapshot and the agent's issues.
Every name and message is HTML-escaped: layer names may contain `<`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .console import fmt

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
SEVERITY_COLOUR = {"critical": "#b91c1c", "high": "#dc2626", "medium": "#d97706", "low": "#0891b2",
                   "warning": "#d97706", "info": "#0891b2"}
SEVERITY_RANK = {"critical": 3, "high": 2, "warning": 2, "medium": 1, "low": 0, "info": 0}
STATUS_COLOUR = {"HEALTHY": "#16a34a", "WARNING": "#d97706", "CRITICAL": "#b91c1c"}
#: viridis at 9 evenly spaced points: perceptually uniform, readable in grey and by colour-blind readers.
VIRIDIS = ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725")
NO_DATA = "#e5e7eb"
#: Per-layer statistics drawn as layer x step heatmaps when the report's history holds them
#: (`history["layer_stats"][stat]`: one list over layers per record, see `layer_stats`): (title, log scale).
HEATMAP_STATS = {
    "activation_zero_ratio": ("Activation zero ratio", False),
    "activation_dead_unit_ratio": ("Dead-unit ratio", False),
    "update_ratio": ("Update ratio ‖Δw‖/‖w‖", True),
    "activation_saturation_ratio": ("Saturation ratio", False),
}
MAX_COLUMNS = 300  # heatmap columns; longer runs are binned (mean of consecutive records)
CHAR_PX = 6.6  # width of one 11 px character, generous, for sizing axis columns

CSS = """
.gf{--fg:#1f2937;--muted:#6b7280;--card:#fff;--line:#e5e7eb;color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1200px;margin:0 auto;padding:16px}
.gf *{box-sizing:border-box}
.gf h1{font-size:1.5rem;margin:.2rem 0}.gf h2{font-size:1.2rem;margin:1.6rem 0 .6rem}
.gf h3{font-size:1rem;margin:1rem 0 .4rem}
.gf .meta{color:var(--muted);font-size:.85rem;overflow-wrap:anywhere}
.gf .cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:10px;margin:12px 0}
.gf .card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.gf .card .v{font-size:1.5rem;font-weight:600}.gf .card .k{color:var(--muted);font-size:.8rem}
.gf .scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;background:var(--card);border:1px solid var(--line);
border-radius:8px;max-width:100%}
.gf table{border-collapse:collapse;width:100%;font-size:.85rem}
.gf th,.gf td{padding:5px 7px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap;
vertical-align:top}
.gf th{position:sticky;top:0;background:#f3f4f6;cursor:pointer;user-select:none}
.gf th[aria-sort=ascending]::after{content:" \\25B2"}.gf th[aria-sort=descending]::after{content:" \\25BC"}
.gf td.t,.gf th.t{text-align:left}.gf td.msg{white-space:normal;min-width:240px;text-align:left}
.gf tr.sev-critical td{background:#fee2e2}.gf tr.sev-high td{background:#fef2f2}
.gf tr.sev-medium td,.gf tr.sev-warning td{background:#fffbeb}.gf tr.sev-low td,.gf tr.sev-info td{background:#ecfeff}
.gf .badge{display:inline-block;padding:1px 7px;border-radius:10px;color:#fff;font-size:.75rem;font-weight:600}
.gf figure.chart{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 12px 6px;
margin:10px 0;min-width:0}
.gf figcaption{font-weight:600;font-size:.9rem;margin-bottom:2px}
.gf .legend{display:flex;flex-wrap:wrap;gap:2px 14px;font-size:.8rem;color:#374151;margin:2px 0 4px}
.gf .legend i{display:inline-block;width:14px;height:3px;margin-right:5px;vertical-align:middle}
.gf .legend i.dash{background:none;border-top:2px dashed}
.gf .plot{display:flex;align-items:flex-start;width:100%}
.gf .plot svg{display:block;flex:none}.gf .plot svg.area{flex:1 1 0;min-width:0;width:100%}
.gf svg text{font:11px system-ui,sans-serif;fill:#374151}
.gf .xlabel{text-align:center;font-size:.8rem;color:#374151;margin-top:-2px}
.gf svg.cbar{display:block;width:100%;max-width:420px;margin:4px 0 0 auto}
.gf .note{color:var(--muted);font-size:.8rem;margin:4px 0}
.gf details{background:var(--card);border:1px solid var(--line);border-radius:8px;margin:6px 0;padding:6px 10px}
.gf summary{cursor:pointer;font-weight:600;overflow-wrap:anywhere}
.gf dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0}
.gf dl.kv dt{color:var(--muted)}.gf dl.kv dd{margin:0;overflow-wrap:anywhere}
.gf .ok{color:#16a34a;font-weight:600}
.gf-nb{padding:4px 0;max-width:100%}
@media (max-width:640px){.gf{padding:8px;font-size:14px}.gf th,.gf td{padding:4px 5px}.gf .card .v{font-size:1.2rem}
.gf td.msg{min-width:200px}.gf .cards{grid-template-columns:repeat(auto-fit,minmax(96px,1fr));gap:6px}}
"""
PAGE_CSS = "body{margin:0;background:#f9fafb}"

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
    if(table.getAttribute('data-sortable')==='ready'||!table.tHead){return;}
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
    """HTML-escaped text (quotes too: the result may sit in an attribute)."""
    return html.escape(str(x), quote=True)


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        f = _num(v)
        if f is not None:
            out.append(f)
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pct(v: Any) -> str:
    f = _num(v)
    return "-" if f is None else f"{100 * f:.0f}%"


def _first_step(issue: Any) -> int | None:
    """The step an issue started at: `Issue.first_step` (agent) or `details["first_step"]` (a report)."""
    v = getattr(issue, "first_step", None)
    if v is None:
        v = (getattr(issue, "details", None) or {}).get("first_step")
    f = _num(v)
    return None if f is None else int(f)


def _severity(issue: Any) -> str:
    sev = issue.severity
    return str(getattr(sev, "value", sev))


def _kind(issue: Any) -> str:
    t = getattr(issue, "issue_type", None)
    return str(getattr(t, "value", t) if t is not None else issue.kind)


# -- axes -------------------------------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """At most about n ticks at 1/2/5 x 10^k inside [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        out.append(round(first + k * step, 12))
        k += 1
    return out


def tick_label(v: float) -> str:
    """Short tick text: integers whole, else 3 significant digits, exponents for very large/small values."""
    if v == 0:
        return "0"
    a = abs(v)
    if float(v).is_integer() and a < 1e6:
        return str(int(v))
    if a >= 1e5 or a < 1e-3:
        mant, exp = f"{v:.1e}".split("e")
        return f"{mant.removesuffix('.0')}e{int(exp)}"
    return f"{v:.3g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log10 axis (lo, hi in decades): whole decades, at most 6; 1/2/5 when under two decades."""
    decades = [float(d) for d in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    if len(decades) >= 2:
        stride = max(1, math.ceil(len(decades) / 6))
        return decades[::stride]
    out = []
    for d in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in (1, 2, 5):
            t = d + math.log10(m)
            if lo - 1e-9 <= t <= hi + 1e-9:
                out.append(t)
    return out if len(out) >= 2 else [lo, hi]


def _x_ticks(x0: float, x1: float, integer: bool, start: float | None = None) -> list[float]:
    """Nice ticks that always include both ends of the data (the last step is always labelled); a nice
    tick too close to an end to be told apart from it is dropped."""
    start = x0 if start is None else start
    if x1 <= start:
        return [x1]
    if integer and x1 - start <= 12:  # a few layers or steps: label every one
        return [float(v) for v in range(math.ceil(start), math.floor(x1) + 1)]
    ticks = [t for t in nice_ticks(start, x1, 5) if (not integer or float(t).is_integer())]
    span = x1 - x0
    ticks = [t for t in ticks if (t - start) > 0.08 * span and (x1 - t) > 0.08 * span]
    return [start, *ticks, x1]


def _ylabel_width(labels: Sequence[str], title: str) -> int:
    return int(8 + CHAR_PX * max((len(s) for s in labels), default=1) + (18 if title else 0))


def _x_tick_svg(x: float, frac: float, y: float, label: str) -> str:
    """An x tick label at `frac` of the plot width; the ends are anchored inwards so that they stay inside."""
    anchor = "start" if frac < 0.04 else ("end" if frac > 0.96 else "middle")
    return (f'<line class="xt" x1="{100 * frac:.3f}%" x2="{100 * frac:.3f}%" y1="{y - 14:.0f}" y2="{y - 10:.0f}" '
            f'stroke="#9ca3af"/><text class="tick xtick" x="{100 * frac:.3f}%" y="{y:.0f}" '
            f'text-anchor="{anchor}">{esc(label)}</text>')


def _figure(kind: str, title: str, body: str, attrs: str = "") -> str:
    return (f'<figure class="chart" data-chart="{kind}"{attrs} role="img" aria-label="{esc(title)}">'
            f"<figcaption>{esc(title)}</figcaption>{body}</figure>")


def _no_data(title: str) -> str:
    return f'<figure class="chart" data-chart="empty"><figcaption>{esc(title)}</figcaption>' \
           f'<p class="note">no data</p></figure>'


# -- SVG charts -----------------------------------------------------------------------------------------------
def svg_line_chart(x: Sequence[Any], ys: Mapping[str, Sequence[Any]], *, title: str = "", xlabel: str = "",
                   ylabel: str = "", log: bool = False, labels: Sequence[str] | None = None, height: int = 220,
                   refs: Sequence[tuple[float, str, str]] = (), percent: bool = False, **_: Any) -> str:
    """Lines of every y series over x, full width; log=True: a log10 axis of the positive values.

    labels: names of the x positions (shown in each point's tooltip); refs: (y value, label, colour)
    drawn as dashed lines; percent: y values are ratios shown as percentages.
    """
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
        return _no_data(title)
    ref_t = [(tr(v), lab, c) for v, lab, c in refs]
    ref_t = [(v, lab, c) for v, lab, c in ref_t if v is not None]
    y0, y1 = min(ally), max(ally)
    # a threshold is drawn when it is near the data (within a decade on a log axis), else it only squashes it
    near = 1.0 if log else 0.5 * max(abs(y1 - y0), abs(y1) * 0.1, 1e-12)
    ref_t = [(v, lab, c) for v, lab, c in ref_t if y0 - near <= v <= y1 + near]
    for v, _lab, _c in ref_t:
        y0, y1 = min(y0, v), max(y1, v)
    x0, x1 = min(allx), max(allx)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if percent:
        y0, y1 = min(0.0, y0), max(1.0, y1)
    if y1 == y0:
        pad = abs(y0) * 0.1 or (0.5 if log else 1.0)
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - (0 if percent and y0 == 0 else pad), y1 + (0 if percent and y1 == 1 else pad)
    if log:
        yt = _log_ticks(y0, y1)
        ylabels = [tick_label(10 ** t) for t in yt]
    else:
        yt = [t for t in nice_ticks(y0, y1, 4) if y0 <= t <= y1]
        ylabels = [f"{100 * t:.0f}%" if percent else tick_label(t) for t in yt]
    top, bottom = 8, 24
    ph = height - top - bottom
    yw = _ylabel_width(ylabels, ylabel)

    def fy(v: float) -> float:  # 0 (top) .. 1000 (bottom) in the data SVG
        return 1000 * (1 - (v - y0) / (y1 - y0))

    def py(v: float) -> float:  # pixels in the axis SVGs
        return top + fy(v) / 1000 * ph

    axis = [f'<svg class="yaxis" width="{yw}" height="{height}" aria-hidden="true">']
    area = [f'<svg class="area" width="100%" height="{height}" data-x-min="{x0:g}" data-x-max="{x1:g}" '
            f'aria-hidden="true">']
    for t, lab in zip(yt, ylabels):
        yy = py(t)
        axis.append(f'<text class="tick ytick" x="{yw - 5}" y="{yy + 4:.1f}" text-anchor="end">{esc(lab)}</text>')
        area.append(f'<line x1="0" x2="100%" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eef0f3"/>')
    if ylabel:
        mid = top + ph / 2
        text = (ylabel + (" (log)" if log else ""))[: max(4, int(ph / CHAR_PX))]
        axis.append(f'<text class="ytitle" x="12" y="{mid:.0f}" transform="rotate(-90 12 {mid:.0f})" '
                    f'text-anchor="middle">{esc(text)}</text>')
    area.append(f'<line x1="0" x2="0" y1="{top}" y2="{top + ph}" stroke="#9ca3af"/>'
                f'<line x1="0" x2="100%" y1="{top + ph}" y2="{top + ph}" stroke="#9ca3af"/>')
    integer_x = all(float(v).is_integer() for v in allx)
    for t in _x_ticks(x0, x1, integer_x):
        area.append(_x_tick_svg(0, (t - x0) / (x1 - x0), height - 6, tick_label(t)))

    def fx(v: float) -> float:
        return 1000 * (v - x0) / (x1 - x0)

    data = [f'<svg x="0" y="{top}" width="100%" height="{ph}" viewBox="0 0 1000 1000" preserveAspectRatio="none" '
            f'overflow="visible">']
    legend = []
    for v, lab, colour in ref_t:
        data.append(f'<line x1="0" x2="1000" y1="{fy(v):.1f}" y2="{fy(v):.1f}" stroke="{colour}" '
                    f'stroke-dasharray="5 4" vector-effect="non-scaling-stroke"/>')
        legend.append(f'<span><i class="dash" style="border-color:{colour}"></i>{esc(lab)}</span>')
    for k, (name, vals) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [(fx(xv), fy(yv), xv, yv) for xv, yv in zip(xs, vals) if xv is not None and yv is not None]
        if len(pts) > 1:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b, _, _ in pts)
            data.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{d}" '
                        f'vector-effect="non-scaling-stroke" stroke-linejoin="round"/>')
        if len(pts) <= 80:
            for a, b, xv, yv in pts:
                where = labels[int(xv)] if labels is not None and float(xv).is_integer() and \
                    0 <= int(xv) < len(labels) else tick_label(xv)
                shown = fmt(10 ** yv) if log else (f"{100 * yv:.1f}%" if percent else fmt(yv))
                data.append(f'<path d="M{a:.1f} {b:.1f}h0" stroke="{colour}" stroke-width="5" '
                            f'stroke-linecap="round" vector-effect="non-scaling-stroke">'
                            f"<title>{esc(name)} at {esc(where)}: {esc(shown)}</title></path>")
        legend.insert(k, f'<span><i style="background:{colour}"></i>{esc(name)}</span>')
    data.append("</svg>")
    area.extend(data)
    axis.append("</svg>")
    area.append("</svg>")
    body = (f'<div class="legend">{"".join(legend)}</div>' if len(legend) > 1 or ref_t else "") + \
        f'<div class="plot">{"".join(axis)}{"".join(area)}</div>' + \
        (f'<div class="xlabel">{esc(xlabel)}</div>' if xlabel else "")
    return _figure("line", title, body, f' data-x-max="{x1:g}"')


def _colour(frac: float) -> str:
    """viridis at frac in [0, 1], linearly interpolated between its 9 stops."""
    frac = min(1.0, max(0.0, frac)) * (len(VIRIDIS) - 1)
    k = min(len(VIRIDIS) - 2, int(frac))
    t = frac - k
    a, b = VIRIDIS[k], VIRIDIS[k + 1]
    rgb = [round(int(a[i:i + 2], 16) * (1 - t) + int(b[i:i + 2], 16) * t) for i in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _bin(steps: list[float], matrix: list[list[float | None]], max_cols: int) -> tuple[list[float], list[list[Any]]]:
    """Merge records of the same step (the last wins), then bin into at most max_cols columns (mean)."""
    keep: dict[float, int] = {}
    for j, s in enumerate(steps):
        keep[s] = j
    order = sorted(keep)
    cols = [keep[s] for s in order]
    steps = order
    matrix = [[row[j] for j in cols] for row in matrix]
    if len(steps) <= max_cols:
        return steps, matrix
    g = math.ceil(len(steps) / max_cols)
    groups = [range(a, min(a + g, len(steps))) for a in range(0, len(steps), g)]
    out_steps = [steps[gr[-1]] for gr in groups]
    out = []
    for row in matrix:
        vals = []
        for gr in groups:
            f = [row[j] for j in gr if row[j] is not None]
            vals.append(sum(f) / len(f) if f else None)
        out.append(vals)
    return out_steps, out


def svg_heatmap(rows: Sequence[str], steps: Sequence[Any], values: Sequence[Sequence[Any]], *, title: str,
                log: bool = False, percent: bool = False, xlabel: str = "step", row_px: int = 16,
                note: str = "") -> str:
    """A layer x step heatmap: one row per layer (forward order), one column per recorded step, colour =
    value (log10 when log=True) on viridis with a colour legend; grey cells have no data."""
    def tr(v: Any) -> float | None:
        f = _num(v)
        if f is None or (log and f <= 0):
            return None
        return math.log10(f) if log else f

    xs = [_num(s) for s in steps]
    ok = [j for j, s in enumerate(xs) if s is not None]
    matrix = [[tr(row[j]) if j < len(row) else None for j in ok] for row in values]
    step_list, matrix = _bin([xs[j] for j in ok], matrix, MAX_COLUMNS)  # type: ignore[misc]
    flat = [v for row in matrix for v in row if v is not None]
    if not rows or not step_list or not flat:
        return _no_data(title)
    lo, hi = min(flat), max(flat)
    if percent:
        lo, hi = 0.0, max(1e-9, hi if hi > 1 else 1.0)
    if hi == lo:
        lo, hi = lo - (0.5 if log else max(abs(lo) * 0.1, 1e-9)), hi + (0.5 if log else max(abs(hi) * 0.1, 1e-9))
    n = len(step_list)
    widths = [step_list[j] - step_list[j - 1] for j in range(1, n)]
    first_w = widths[0] if widths else 1.0
    x0, x1 = step_list[0] - first_w, step_list[-1]
    names = [str(r) for r in rows]
    shown = [s if len(s) <= 26 else s[:12] + "…" + s[-12:] for s in names]
    yw = min(190, _ylabel_width(shown, ""))
    top, bottom = 2, 24
    ph = row_px * len(rows)
    height = top + ph + bottom
    axis = [f'<svg class="yaxis" width="{yw}" height="{height}" aria-hidden="true">']
    for r, (name, s) in enumerate(zip(names, shown)):
        axis.append(f'<text class="tick rowlabel" x="{yw - 5}" y="{top + r * row_px + row_px * 0.72:.1f}" '
                    f'text-anchor="end"><title>{esc(name)}</title>{esc(s)}</text>')
    axis.append("</svg>")
    cells = [f'<svg x="0" y="{top}" width="100%" height="{ph}" viewBox="{x0:g} 0 {x1 - x0:g} {len(rows)}" '
             f'preserveAspectRatio="none" shape-rendering="crispEdges">']
    for r, (name, row) in enumerate(zip(names, matrix)):
        cells.append(f'<g class="hrow" data-layer="{esc(name)}">')
        for j, v in enumerate(row):
            left = step_list[j] - (widths[j - 1] if j else first_w)
            w = step_list[j] - left
            colour = NO_DATA if v is None else _colour((v - lo) / (hi - lo))
            val = "no data" if v is None else (fmt(10 ** v) if log else (f"{100 * v:.1f}%" if percent else fmt(v)))
            cells.append(f'<rect x="{left:g}" y="{r}" width="{w:g}" height="1" fill="{colour}">'
                         f"<title>{esc(name)} at step {tick_label(step_list[j])}: {esc(val)}</title></rect>")
        cells.append("</g>")
    cells.append("</svg>")
    area = [f'<svg class="area" width="100%" height="{height}" data-x-min="{x0:g}" data-x-max="{x1:g}" '
            f'aria-hidden="true">', *cells]
    integer_x = all(float(s).is_integer() for s in step_list)
    for t in _x_ticks(x0, x1, integer_x, start=step_list[0]):
        area.append(_x_tick_svg(0, (t - x0) / (x1 - x0), height - 6, tick_label(t)))
    area.append("</svg>")
    # colour legend: the gradient, with ticks at decades (log) or 0/25/50/75/100 % (ratios)
    if log:
        ct = _log_ticks(lo, hi)
        clabels = [tick_label(10 ** t) for t in ct]
    else:
        ct = [t for t in nice_ticks(lo, hi, 4) if lo <= t <= hi]
        clabels = [f"{100 * t:.0f}%" if percent else tick_label(t) for t in ct]
    gid = f"g{abs(hash((title, tuple(names)))) % 10**8}"
    stops = "".join(f'<stop offset="{k / (len(VIRIDIS) - 1):.3f}" stop-color="{c}"/>' for k, c in enumerate(VIRIDIS))
    legend = [f'<svg class="cbar" height="36" aria-hidden="true"><defs><linearGradient id="{gid}">{stops}'
              f'</linearGradient></defs><rect x="0" y="2" width="100%" height="10" fill="url(#{gid})"/>']
    for t, lab in zip(ct, clabels):
        legend.append(_x_tick_svg(0, (t - lo) / (hi - lo), 30, lab))
    legend.append("</svg>")
    scale = "log scale" if log else "linear scale"
    foot = (f'<div class="note">{esc(scale)}; grey: no data'
            + (f"; {esc(note)}" if note else "") + "</div>")
    body = (f'<div class="plot">{"".join(axis)}{"".join(area)}</div><div class="xlabel">{esc(xlabel)}</div>'
            + "".join(legend) + foot)
    return _figure("heatmap", title, body, f' data-rows="{len(rows)}" data-x-max="{x1:g}"')


def svg_sparkline(values: Sequence[Any], width: int = 110, height: int = 24, log: bool = True) -> str:
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
def cell(v: Any, cls: str = "", text: str | None = None) -> str:
    """A table cell whose sort key is its number (data-v), so that sorting is numeric, not textual."""
    f = _num(v)
    data = f' data-v="{f!r}"' if f is not None else ' data-v=""'
    c = f' class="{cls}"' if cls else ("" if f is not None else ' class="t"')
    return f"<td{c}{data}>{esc(fmt(v) if text is None else text)}</td>"


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == "-" or (isinstance(v, float) and not math.isfinite(v))


def html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, table_id: str = "",
               row_classes: Sequence[str] | None = None) -> str:
    """A sortable table; a column with no value in any row is left out and named below the table."""
    keep = [k for k in range(len(columns)) if k == 0 or any(k < len(r) and not _empty(r[k]) for r in rows)]
    dropped = [str(columns[k]) for k in range(len(columns)) if k not in keep]
    tid = f' id="{esc(table_id)}"' if table_id else ""
    head = "".join(f'<th scope="col"{" class=t" if k == 0 else ""}>{esc(columns[k])}</th>' for k in keep)
    body = []
    for j, row in enumerate(rows):
        rc = f' class="{row_classes[j]}"' if row_classes and row_classes[j] else ""
        body.append(f"<tr{rc}>" + "".join(cell(row[k] if k < len(row) else None) for k in keep) + "</tr>")
    note = f'<p class="note">No data in any row: {esc(", ".join(dropped))}.</p>' if dropped else ""
    return (f'<div class="scroll"><table class="sortable"{tid}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{note}')


#: Layers-table columns: (header, FlowMetrics attribute or special key, percent, why it can be empty).
LAYER_COLUMNS: tuple[tuple[str, str, bool, str], ...] = (
    ("#", "depth", False, ""),
    ("pressure", "mean_pressure", False, "layers without parameters have no gradient"),
    ("max", "max_pressure", False, ""),
    ("turbulence", "turbulence", False, "needs 3 or more gradient readings"),
    ("velocity", "velocity", False, ""),
    ("zero grad", "grad_zero_ratio", True, ""),
    ("zero act", "activation_zero_ratio", True, "activation statistics are off"),
    ("dead units", "dead_unit_ratio", True, "activation statistics are off"),
    ("saturation", "saturation_ratio", True, "no bounded activation (sigmoid/tanh) in the model"),
    ("update ratio", "update_ratio", False, "parameter statistics are off, or no optimizer was given"),
    ("eff. rank in", "effective_rank_in", False, "computed by GradientFlowAnalyzer's vector analysis only"),
    ("eff. rank out", "effective_rank_out", False, "computed by GradientFlowAnalyzer's vector analysis only"),
    ("gain", "gradient_gain", False, "computed by GradientFlowAnalyzer's vector analysis only"),
)


def layer_stats(stats: Mapping[str, Any], keys: Iterable[str] = tuple(HEATMAP_STATS)) -> dict[str, list[list[Any]]]:
    """`history["layer_stats"]` for a report: per statistic, one list over layers per record (NaN -> None).

    `stats` is `analyze.history.History.stats` (arrays (records, layers)); the report draws each as a
    layer x step heatmap next to the gradient-pressure one.
    """
    out: dict[str, list[list[Any]]] = {}
    for k in keys:
        if k in stats:
            out[k] = [[_num(v) for v in row] for row in stats[k]]
    return out


class HTMLReportGenerator:
    """Renders a FlowReport; `generate(report)` returns the page, `fragment(report)` the notebook view."""

    def generate(self, report: Any) -> str:
        """The whole page: self-contained, no network."""
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{esc(report.title)}</title><style>{PAGE_CSS}{CSS}</style></head><body>"
                f'<main class="gf">{self._body(report)}</main><script>{SCRIPT}</script></body></html>\n')

    def fragment(self, report: Any) -> str:
        """The report as one `<div>` whose CSS is scoped to it (Jupyter output: the notebook's own styles
        are left alone)."""
        return f'<div class="gf gf-nb"><style>{CSS}</style>{self._body(report)}<script>{SCRIPT}</script></div>'

    def _body(self, report: Any) -> str:
        s = report.summary()
        return "".join([self._header(report, s), self._issues(report), self._over_time(report),
                        self._depth(report), self._layers(report), self._layer_details(report),
                        self._sections(report)])

    @staticmethod
    def _header(report: Any, s: dict[str, Any]) -> str:
        colour = STATUS_COLOUR.get(s["overall_status"], "#374151")
        meta = report.meta
        info = " · ".join(esc(f"{k}: {meta[k]}") for k in ("analyzer", "model", "steps", "records", "device",
                                                             "created") if meta.get(k) not in (None, ""))
        score = s["overall_score"]
        cards = [("overall health", f'<span style="color:{colour}">'
                                    f'{esc(f"{score:.0f}" if _num(score) is not None else "-")}</span>'),
                 ("status", f'<span style="color:{colour}">{esc(s["overall_status"])}</span>'),
                 ("layers", esc(s["layers"])), ("issues", esc(s["issues"]))]
        cards += [(f"{k} issues", f'<span style="color:{SEVERITY_COLOUR[k]}">{esc(v)}</span>')
                  for k, v in s["issues_by_severity"].items()]
        card_html = "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{esc(k)}</div></div>'
                            for k, v in cards)
        return (f'<header><h1 id="title">{esc(report.title)}</h1><div class="meta">{info}</div></header>'
                f'<section id="summary"><div class="cards">{card_html}</div></section>')

    @staticmethod
    def _issues(report: Any) -> str:
        return f'<section id="issues"><h2>Issues ({len(report.issues)})</h2>' \
               f'{issues_table(report.issues, "issues-table")}</section>'

    @staticmethod
    def _steps(report: Any, n: int) -> tuple[list[Any], str]:
        """The x values of n per-record values: the records' optimizer steps when the report has them."""
        steps = list(report.history.get("steps") or [])
        if len(steps) == n and n:
            return steps, "step"
        return list(range(n)), "snapshot"

    def _over_time(self, report: Any) -> str:
        h = report.history
        out = ['<section id="over-time"><h2>Over time</h2>']
        steps = list(h.get("steps") or [])
        if len(steps) > 1:
            out.append(svg_line_chart(steps, {"loss": h.get("loss", [])}, title="Loss", xlabel="step",
                                      ylabel="loss"))
            out.append(svg_line_chart(steps, {"global gradient norm": h.get("grad_norm", [])},
                                      title="Global gradient norm", xlabel="step", ylabel="norm", log=True))
        ordered = sorted((m for m in report.layers if m.depth >= 0), key=lambda m: m.depth) or list(report.layers)
        with_p = [m for m in ordered if _finite(m.pressure_history)]
        if with_p:
            x, xlabel = self._steps(report, len(with_p[0].pressure_history))
            skipped = len(ordered) - len(with_p)
            out.append(svg_heatmap([m.layer for m in with_p], x, [m.pressure_history for m in with_p],
                                   title="Gradient pressure ‖∇w‖ per layer and step", log=True, xlabel=xlabel,
                                   note=f"{skipped} layers without parameters (no gradient) not shown"
                                   if skipped else ""))
        index = {m.layer: k for k, m in enumerate(report.layers)}
        for key, (title, log) in HEATMAP_STATS.items():
            rows = (h.get("layer_stats") or {}).get(key)
            if not rows:
                continue
            per_layer = {m.layer: [r[index[m.layer]] if index[m.layer] < len(r) else None for r in rows]
                         for m in ordered}
            shown = [m for m in ordered if _finite(per_layer[m.layer])]
            if not shown:
                continue
            x, xlabel = self._steps(report, len(rows))
            out.append(svg_heatmap([m.layer for m in shown], x, [per_layer[m.layer] for m in shown],
                                   title=f"{title} per layer and step", log=log, percent=not log, xlabel=xlabel,
                                   note=f"{len(ordered) - len(shown)} layers without this statistic not shown"
                                   if len(shown) < len(ordered) else ""))
        if len(out) == 1:
            return ""
        out.append("</section>")
        return "".join(out)

    @staticmethod
    def _depth(report: Any) -> str:
        """Statistics against the layer index (forward order): where in depth gradients fade or units die."""
        ordered = sorted((m for m in report.layers if m.depth >= 0), key=lambda m: m.depth)
        if not ordered:
            return ""
        x = [m.depth for m in ordered]
        names = {m.depth: m.layer for m in ordered}
        labels = [names.get(k, "") for k in range(max(x) + 1)]
        th = report.meta.get("thresholds", {})
        refs = [(float(th[k]), k, c) for k, c in (("vanishing", "#0891b2"), ("exploding", "#b91c1c"))
                if _num(th.get(k)) is not None]
        out = ['<section id="depth-profile"><h2>Depth profile</h2>',
               svg_line_chart(x, {"mean pressure": [m.mean_pressure for m in ordered],
                                  "max pressure": [m.max_pressure for m in ordered]},
                              title="Gradient pressure by layer", xlabel="layer index (forward order; names in the "
                              "Layers table)", ylabel="pressure", log=True, labels=labels, refs=refs)]
        act = {"zero act": [m.activation_zero_ratio for m in ordered],
               "dead units": [m.dead_unit_ratio for m in ordered],
               "saturation": [m.saturation_ratio for m in ordered]}
        act = {k: v for k, v in act.items() if _finite(v)}
        if act:
            out.append(svg_line_chart(x, act, title="Activation ratios by layer", xlabel="layer index",
                                      ylabel="ratio", percent=True, labels=labels))
        upd = [m.update_ratio for m in ordered]
        if _finite(upd):
            out.append(svg_line_chart(x, {"update ratio": upd}, title="Update ratio by layer", xlabel="layer index",
                                      ylabel="‖Δw‖/‖w‖", log=True, labels=labels))
        health = [report.health[m.layer].score if m.layer in report.health else None for m in ordered]
        if _finite(health):
            out.append(svg_line_chart(x, {"health": health}, title="Health score by layer", xlabel="layer index",
                                      ylabel="score", labels=labels,
                                      refs=[(75.0, "75: warning below", "#d97706"),
                                            (50.0, "50: critical below", "#b91c1c")]))
        out.append("</section>")
        return "".join(out)

    @staticmethod
    def _layers(report: Any) -> str:
        worst: dict[str, str] = {}
        for i in report.issues:
            sev = _severity(i)
            if i.layer not in worst or SEVERITY_RANK.get(sev, 0) > SEVERITY_RANK.get(worst[i.layer], 0):
                worst[i.layer] = sev
        cols = [c for c in LAYER_COLUMNS if any(_num(getattr(m, c[1], None)) is not None for m in report.layers)]
        why: dict[str, list[str]] = {}
        for c in LAYER_COLUMNS:
            if c not in cols:
                why.setdefault(c[3] or "not measured in this run", []).append(c[0])
        trend = any(len(_finite(m.pressure_history)) > 1 for m in report.layers)
        body = []
        for m in report.layers:
            h = report.health.get(m.layer)
            status = h.status.value if h else "-"
            cls = f' class="sev-{worst[m.layer]}"' if m.layer in worst else ""
            cells = [f'<td class="t" data-v="">{esc(m.layer)}</td>',
                     f'<td class="t" data-v="">{esc(m.layer_type)}</td>']
            for _head, attr, pct, _why in cols:
                v = getattr(m, attr, None)
                cells.append(cell(v, text=_pct(v) if pct else None))
            n_issues = len(h.issues) if h else 0
            cells += [cell(n_issues), cell(h.score if h else None, text=fmt(round(h.score)) if h and
                                           _num(h.score) is not None else "-")]
            colour = STATUS_COLOUR.get(status, "#6b7280")
            cells.append(f'<td class="t" data-v=""><span class="badge" style="background:{colour}">'
                         f"{esc(status)}</span></td>")
            if trend:
                cells.append(f'<td class="t" data-v="">{svg_sparkline(m.pressure_history)}</td>')
            body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
        heads = ["layer", "type", *(c[0] for c in cols), "issues", "health", "status"] + (["pressure trend"]
                                                                                          if trend else [])
        head = "".join(f'<th scope="col"{" class=t" if c in ("layer", "type", "status", "pressure trend") else ""}>'
                       f"{esc(c)}</th>" for c in heads)
        note = "".join(f'<p class="note">Not shown, no data for any layer: {esc(", ".join(names))} ({esc(reason)}).'
                       f"</p>" for reason, names in why.items())
        return (f'<section id="layers"><h2>Layers ({len(report.layers)})</h2><div class="scroll">'
                f'<table class="sortable" id="layers-table"><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div>{note}</section>')

    def _layer_details(self, report: Any, limit: int = 60) -> str:
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
                x, xlabel = self._steps(report, len(m.pressure_history))
                body.append(svg_line_chart(x, {"pressure": m.pressure_history},
                                           title=f"{m.layer}: gradient pressure", xlabel=xlabel,
                                           ylabel="pressure", log=True, height=180))
            if h and h.issues:
                body.append("<ul>" + "".join(f"<li><b>{esc(_kind(i))}</b> ({esc(_severity(i))}"
                                             + (f", since step {_first_step(i)}" if _first_step(i) is not None
                                                else "") + f"): {esc(i.message)}</li>" for i in h.issues) + "</ul>")
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


# -- issues (a report's FlowIssues or the agent's Issues) and notebook views -----------------------------------------
def issues_table(issues: Sequence[Any], table_id: str = "") -> str:
    """Issues, most severe first as given, with the step each started at; columns without data are left out."""
    if not issues:
        return '<p class="ok">No issues found.</p>'
    firsts = [_first_step(i) for i in issues]
    has_first = any(f is not None for f in firsts)
    has_threshold = any(_num(i.threshold) not in (None, 0.0) for i in issues)
    has_rec = any(getattr(i, "recommendation", "") for i in issues)
    head = ["severity", "type", "layer"] + (["since step"] if has_first else []) + ["step", "value"] + \
        (["threshold"] if has_threshold else []) + ["message"] + (["recommendation"] if has_rec else [])
    body = []
    for i, first in zip(issues, firsts):
        sev = _severity(i)
        badge = f'<span class="badge" style="background:{SEVERITY_COLOUR.get(sev, "#6b7280")}">{esc(sev)}</span>'
        row = [f'<td class="t" data-v="{SEVERITY_RANK.get(sev, 0)}">{badge}</td>',
               f'<td class="t" data-v="">{esc(_kind(i))}</td>', f'<td class="t" data-v="">{esc(i.layer)}</td>']
        if has_first:
            row.append(cell(first))
        row += [cell(getattr(i, "step", None)), cell(i.value)]
        if has_threshold:
            row.append(cell(i.threshold))
        row.append(f'<td class="msg" data-v="">{esc(i.message)}</td>')
        if has_rec:
            row.append(f'<td class="msg" data-v="">{esc(getattr(i, "recommendation", ""))}</td>')
        body.append(f'<tr class="sev-{esc(sev)}">' + "".join(row) + "</tr>")
    th = "".join(f'<th scope="col" class="t">{esc(c)}</th>' for c in head)
    tid = f' id="{esc(table_id)}"' if table_id else ""
    return (f'<div class="scroll"><table class="sortable"{tid}><thead><tr>{th}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _notebook(inner: str) -> str:
    return f'<div class="gf gf-nb"><style>{CSS}</style>{inner}<script>{SCRIPT}</script></div>'


def report_fragment(report: Any) -> str:
    """FlowReport._repr_html_: the report, scoped to one <div> (Jupyter)."""
    return HTMLReportGenerator().fragment(report)


def issues_html(issues: Sequence[Any], title: str = "") -> str:
    """The agent's issues (an IssueList, or one Issue) as a notebook table."""
    heading = f"<h3>{esc(title or f'Issues ({len(issues)})')}</h3>"
    return _notebook(heading + issues_table(list(issues)))


def snapshot_html(snap: Any) -> str:
    """Snapshot._repr_html_: the headline numbers, the issues and one row per layer (columns with data only)."""
    def stat(key: str) -> list[Any]:
        v = snap.stats.get(key)
        return [None] * len(snap.layers) if v is None else [_num(x) for x in v]

    cols = [("pressure", "grad_pressure", False), ("turbulence", "grad_turbulence", False),
            ("zero act", "activation_zero_ratio", True), ("dead units", "activation_dead_unit_ratio", True),
            ("saturation", "activation_saturation_ratio", True), ("update ratio", "update_ratio", False)]
    data = {key: stat(key) for _h, key, _p in cols}
    cols = [c for c in cols if any(v is not None for v in data[c[1]])]
    health = [None] * len(snap.layers) if snap.health is None else [_num(x) for x in snap.health]
    bad = [sum(_num(v[k]) or 0.0 for v in snap.nonfinite.values()) for k in range(len(snap.layers))]
    worst: dict[str, str] = {}
    for i in snap.issues:
        if i.layer not in worst or SEVERITY_RANK.get(i.severity, 0) > SEVERITY_RANK.get(worst[i.layer], 0):
            worst[i.layer] = i.severity
    rows = []
    for k, name in enumerate(snap.layers):
        cls = f' class="sev-{esc(worst[name])}"' if name in worst else ""
        cells = [f'<td class="t" data-v="">{esc(name)}</td>',
                 f'<td class="t" data-v="">{esc(snap.layer_types[k] if k < len(snap.layer_types) else "")}</td>']
        cells += [cell(data[key][k], text=_pct(data[key][k]) if pct else None) for _h, key, pct in cols]
        if any(b for b in bad):
            cells.append(cell(bad[k]))
        if any(h is not None for h in health):
            cells.append(cell(health[k], text=fmt(round(health[k])) if health[k] is not None else "-"))
        rows.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    heads = ["layer", "type", *(c[0] for c in cols)] + (["non-finite"] if any(b for b in bad) else []) + \
        (["health"] if any(h is not None for h in health) else [])
    head = "".join(f'<th scope="col"{" class=t" if c in ("layer", "type") else ""}>{esc(c)}</th>' for c in heads)
    info = [f"step {snap.step}", f"{snap.interval_steps} steps in this interval", f"loss {fmt(snap.loss)}",
            f"gradient norm {fmt(snap.grad_norm)}", f"{len(snap.layers)} layers"]
    if snap.degraded:
        info.append("degraded: " + ", ".join(snap.degraded))
    issues = issues_table(list(snap.issues)) if snap.issues else '<p class="ok">No issues.</p>'
    return _notebook(f"<h3>Snapshot at step {esc(snap.step)}</h3><div class=\"meta\">{esc(' · '.join(info))}</div>"
                     f"{issues}<div class=\"scroll\"><table class=\"sortable\"><thead><tr>{head}</tr></thead>"
                     f"<tbody>{''.join(rows)}</tbody></table></div>")
