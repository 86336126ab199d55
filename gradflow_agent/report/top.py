"""`gradflow-agent top URL`: a live terminal view of one training job, read from its /metrics.

The person on call often has a shell on the training host and no Grafana: this shows what the alerts
fire on (the agent's own `gradflow_issue` verdicts), the worst layers first and the trend of their
gradient pressure, in 80x24. It reads the agent's endpoint directly (`top URL`), or the same series
through a Prometheus server's HTTP API (`top --prometheus URL --run NAME`).

Standard library only (curses, urllib) plus prometheus_client's text parser, a core dependency: no torch
and no rich, so it runs anywhere the agent's wheel is installed. The frame is a pure function of the
parsed samples, the history of earlier refreshes and the terminal size (`render`), so it is unit-tested
without a terminal; `--once` prints one 80-column frame to stdout.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

SPARKS = "▁▂▃▄▅▆▇█"
ASCII_SPARKS = "_.-:=+*#"
ELLIPSIS = "…"
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
#: (label shown in the footer, Layer attribute, descending); `s` cycles through them.
SORTS: tuple[tuple[str, str, bool], ...] = (
    ("health", "health", False),
    ("pressure high", "pressure", True),
    ("pressure low", "pressure", False),
    ("turbulence", "turbulence", True),
    ("update ratio", "update", False),
    ("zero", "zero", True),
    ("saturation", "sat", True),
    ("depth", "index", False),
)
#: Where an unknown health score sorts: after every layer with an issue, before the healthy ones, so that
#: a layer without data is neither hidden among the healthy nor shown as one.
UNKNOWN_HEALTH_RANK = 99.5
NAN = float("nan")


class ReadError(Exception):
    """The source could not be read or holds no gradflow series; the message is one line, with the URL."""


# -- parsed state -----------------------------------------------------------------------------------------------

@dataclass
class Layer:
    name: str
    index: int = 10**9  # depth order (gradflow_layer_info{index}); unknown: last
    type: str = ""
    health: float = NAN  # NaN: unknown (no gradflow_layer_health_score series), never healthy
    pressure: float = NAN
    turbulence: float = NAN
    update: float = NAN
    zero: float = NAN  # activation zero ratio
    sat: float = NAN  # activation saturation ratio
    dead: float = NAN
    nonfinite: float = 0.0


@dataclass
class IssueRow:
    layer: str
    kind: str
    severity: str
    value: float = NAN


@dataclass
class State:
    """One read of the source: the run-wide numbers, every layer and the current issues."""

    run: str = ""
    rank: str = ""
    ranks: tuple[str, ...] = ()  # every rank the source had (Prometheus: several)
    steps: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    errors: float | None = None
    errors_by_component: dict[str, float] = field(default_factory=dict)
    disabled: tuple[str, ...] = ()
    snapshot_time: float | None = None
    layers: dict[str, Layer] = field(default_factory=dict)
    issues: list[IssueRow] = field(default_factory=list)


_LAYER_SERIES = {
    "gradflow_layer_health_score": "health", "gradflow_grad_pressure": "pressure",
    "gradflow_grad_turbulence": "turbulence", "gradflow_update_ratio": "update",
    "gradflow_activation_zero_ratio": "zero", "gradflow_activation_saturation_ratio": "sat",
    "gradflow_activation_dead_unit_ratio": "dead",
}
_RUN_SERIES = {"gradflow_steps_total": "steps", "gradflow_loss": "loss", "gradflow_grad_norm": "grad_norm",
               "gradflow_last_snapshot_timestamp_seconds": "snapshot_time"}

Sample = tuple[str, Mapping[str, str], float]


def _rank_order(rank: str) -> tuple[bool, int, str]:
    """Numeric ranks in numeric order (2 before 10), then anything else."""
    return (not rank.isdigit(), int(rank) if rank.isdigit() else 0, rank)


def parse_samples(samples: Iterable[Sample], run: str | None = None, rank: str | None = None) -> State:
    """A State from (name, labels, value) samples; only `run` / `rank` when given, else the first run and
    the lowest rank found (one agent's endpoint has exactly one of each)."""
    samples = [s for s in samples if s[0].startswith("gradflow_")]
    runs = sorted({s[1].get("run", "") for s in samples})
    if run is None:
        run = runs[0] if runs else ""
    samples = [s for s in samples if s[1].get("run", "") == run]
    ranks = sorted({s[1].get("rank", "") for s in samples}, key=_rank_order)
    if rank is None:
        rank = ranks[0] if ranks else ""
    state = State(run=run, rank=rank, ranks=tuple(ranks))
    disabled = []
    issue_values: dict[tuple[str, str], float] = {}

    def layer(name: str) -> Layer:
        return state.layers.setdefault(name, Layer(name))

    for name, labels, value in samples:
        if labels.get("rank", "") != rank:
            continue
        if name in _RUN_SERIES:
            setattr(state, _RUN_SERIES[name], value)
        elif name == "gradflow_agent_errors_total":
            state.errors_by_component[labels.get("component", "")] = value
        elif name == "gradflow_agent_component_disabled" and value > 0:
            disabled.append(labels.get("component", ""))
        elif "layer" not in labels:
            continue
        elif name in _LAYER_SERIES:
            setattr(layer(labels["layer"]), _LAYER_SERIES[name], value)
        elif name == "gradflow_layer_info":
            row = layer(labels["layer"])
            row.type = labels.get("layer_type", "")
            with contextlib.suppress(ValueError):
                row.index = int(labels.get("index", ""))
        elif name == "gradflow_nonfinite_total":
            layer(labels["layer"]).nonfinite += value
        elif name == "gradflow_issue" and value > 0:
            layer(labels["layer"])
            state.issues.append(IssueRow(labels["layer"], labels.get("kind", "?"), labels.get("severity", "?")))
        elif name == "gradflow_issue_value":
            issue_values[(labels["layer"], labels.get("kind", "?"))] = value
    for issue in state.issues:
        issue.value = issue_values.get((issue.layer, issue.kind), NAN)
    if state.errors_by_component:
        state.errors = sum(state.errors_by_component.values())
    state.disabled = tuple(sorted(disabled))
    order = {name: i for i, name in enumerate(state.layers)}  # first appearance, for layers without an index
    state.issues.sort(key=lambda i: (SEVERITY_ORDER.get(i.severity, 3), state.layers[i.layer].index,
                                     order[i.layer], i.kind))
    return state


def parse_metrics(text: str, run: str | None = None, rank: str | None = None) -> State:
    """A State from the Prometheus text exposition format (what /metrics serves)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [(s.name, s.labels, float(s.value)) for family in text_string_to_metric_families(text)
               for s in family.samples]
    return parse_samples(samples, run, rank)


# -- history: what one read cannot know --------------------------------------------------------------------------

class History:
    """Across refreshes: each layer's pressure trend, the first refresh and step each issue was seen at,
    and steps per second. A refresh that saw no new step adds nothing to the trends (a run that lingers
    after training keeps its last trend instead of flattening it)."""

    def __init__(self, length: int = 24) -> None:
        self.length = length
        self.refreshes = 0
        self.trends: dict[str, deque[float]] = {}
        self.since: dict[tuple[str, str], tuple[int, float | None]] = {}  # (layer, kind) -> (refresh, step)
        self.rate: float | None = None
        self._last: tuple[float, float] | None = None  # (steps, time) of the latest new step

    def update(self, state: State, now: float | None = None) -> None:
        self.refreshes += 1
        now = time.time() if now is None else now
        steps = state.steps
        new_step = steps is not None and (self._last is None or steps != self._last[0])
        if new_step:
            assert steps is not None
            at = state.snapshot_time if state.snapshot_time is not None else now
            if self._last is not None and at > self._last[1] and steps > self._last[0]:
                self.rate = (steps - self._last[0]) / (at - self._last[1])
            self._last = (steps, at)
            for name, row in state.layers.items():
                self.trends.setdefault(name, deque(maxlen=self.length)).append(row.pressure)
        current = {(i.layer, i.kind) for i in state.issues}
        for key in list(self.since):
            if key not in current:  # resolved: a later return is a new incident
                del self.since[key]
        for key in current:
            self.since.setdefault(key, (self.refreshes, steps))


# -- formatting --------------------------------------------------------------------------------------------------

def num(x: float | None) -> str:
    """3 significant digits, compact (`1.2e-07`, `0.0123`, `4.41e+04`); '-' for no data."""
    if x is None or math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.3g}"


def pct(x: float | None) -> str:
    """A ratio as a percentage in at most 4 characters; '-' for no data."""
    if x is None or math.isnan(x):
        return "-"
    v = 100.0 * x
    if v == 0:
        return "0%"
    return f"{v:.1f}%" if v < 9.95 else f"{v:.0f}%"


def middle(text: str, width: int) -> str:
    """`text` in at most `width` characters, shortened in the middle: the first and last characters stay
    (qualified layer names differ at both ends)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = width // 2
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def layer_name(name: str, width: int) -> str:
    """A qualified layer name in `width` characters. Its middle components are abbreviated first, longest
    first, the block indices kept (`encoder.layers.7.self_attn.out_proj` -> `e.l.7.s.out_proj`: the ten
    blocks of a stack stay apart), then it is cut in the middle."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    while len(".".join(parts)) > width:
        candidates = [i for i in range(len(parts) - 1) if len(parts[i]) > 1 and not parts[i].isdigit()]
        if not candidates:
            break
        longest = max(candidates, key=lambda i: (len(parts[i]), -i))
        parts[longest] = parts[longest][0]
    return middle(".".join(parts), width)


def sparkline(values: Iterable[float], width: int, chars: str = SPARKS) -> str:
    """The last `width` values on a log scale (at least half a decade tall, so noise stays flat), newest
    on the right; ' ' for no data."""
    vals = list(values)[-width:] if width > 0 else []
    logs = [math.log10(v) for v in vals if v is not None and math.isfinite(v) and v > 0]
    out = []
    if logs:
        lo, hi = min(logs), max(logs)
        span = max(hi - lo, 0.5)
        lo = (lo + hi - span) / 2
        for v in vals:
            if v is None or not math.isfinite(v):
                out.append(" ")
            elif v <= 0:
                out.append(chars[0])
            else:
                level = int((math.log10(v) - lo) / span * (len(chars) - 1) + 0.5 + 1e-9)
                out.append(chars[min(max(level, 0), len(chars) - 1)])
    else:
        out = [" " if v is None or not math.isfinite(v) else chars[0] for v in vals]
    return "".join(out).rjust(width)


def _health_text(x: float) -> str:
    return "?" if math.isnan(x) else f"{x:.0f}"


def _style(row: Layer) -> str:
    if math.isnan(row.health):
        return "unknown"
    return "critical" if row.health <= 50 else "warning" if row.health < 100 else ""


# -- the frame ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    title: str
    width: int
    cell: Callable[[Layer], str] | None  # None: the trend, drawn from the history
    right: bool = True
    min_total: int = 0  # shown only when the terminal is at least this wide


def _columns(trend: int) -> list[Column]:
    return [
        Column("TYPE", 7, lambda r: middle(r.type, 7), right=False),
        Column("HLTH", 4, lambda r: _health_text(r.health)),
        Column("PRESSURE", 8, lambda r: num(r.pressure)),
        Column("TREND", trend, None, right=False),
        Column("TURB", 7, lambda r: num(r.turbulence)),
        Column("UPDATE", 8, lambda r: num(r.update)),
        Column("ZERO", 4, lambda r: pct(r.zero)),
        Column("SAT", 4, lambda r: pct(r.sat)),
        Column("DEAD", 4, lambda r: pct(r.dead), min_total=100),
        Column("NaN", 7, lambda r: num(r.nonfinite) if r.nonfinite else "0", min_total=110),
    ]


def _sort_key(row: Layer, attr: str, descending: bool) -> tuple:
    value = getattr(row, attr)
    if attr == "health":
        return (UNKNOWN_HEALTH_RANK if math.isnan(value) else value, row.index, row.name)
    if isinstance(value, float) and math.isnan(value):
        return (1, 0.0, row.index, row.name)  # no data: last, whatever the direction
    return (0, -value if descending else value, row.index, row.name)


def _fit(parts: list[str], width: int) -> str:
    """Join header parts with two spaces, dropping trailing ones that do not fit."""
    out = ""
    for part in filter(None, parts):
        candidate = f"{out}  {part}" if out else part
        if len(candidate) > width:
            break
        out = candidate
    return out


def _ago(seconds: float) -> str:
    if seconds < 0:
        seconds = 0
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def render_lines(state: State | None, history: History, width: int = 80, height: int | None = 24, *,
                 sort: int = 0, filter: str = "", paused: bool = False, url: str = "", error: str | None = None,
                 now: float | None = None, interactive: bool = False, prompt: str | None = None,
                 ascii_only: bool = False) -> list[tuple[str, str]]:
    """The frame as (text, style) lines: every text at most `width` characters, at most `height` lines
    (None: as many as needed). Styles: '', 'title', 'head', 'critical', 'warning', 'info', 'unknown', 'error',
    'dim'."""
    width = max(width, 20)
    chars = ASCII_SPARKS if ascii_only else SPARKS
    lines: list[tuple[str, str]] = []
    now = time.time() if now is None else now

    def add(text: str, style: str = "") -> None:
        if ascii_only:  # a terminal or pipe that cannot encode them
            text = text.replace(ELLIPSIS, "~").replace("≤", "<=")
        lines.append((text[:width], style))

    s = state or State()
    rank = s.rank + (f" of {len(s.ranks)}" if len(s.ranks) > 1 else "")
    age = f"snapshot {_ago(now - s.snapshot_time)} ago" if s.snapshot_time else ""
    run = middle(s.run or "?", max(8, width // 2))
    add(_fit(["gradflow top", f"run {run}", f"rank {rank or '?'}", "PAUSED" if paused else "", age], width),
        "title")
    rate = f"{history.rate:.3g} steps/s" if history.rate is not None else "? steps/s"
    steps = f"step {s.steps:.0f}" if s.steps is not None else "step ?"
    errors = "?" if s.errors is None else f"{s.errors:.0f}"
    if s.errors and s.errors_by_component:
        worst = max(s.errors_by_component, key=lambda k: s.errors_by_component[k])
        errors += f" ({worst})"
    add(_fit([steps, rate, f"loss {num(s.loss)}", f"grad norm {num(s.grad_norm)}", f"agent errors {errors}"],
             width), "error" if s.errors else "")
    if error:
        text = f"! {error}"
        if state is not None and len(text) + 18 <= width:
            text += " (last read below)"
        add(middle(text, width), "error")
    elif url:
        add(middle(url, width), "dim")
    if s.disabled:
        add(middle("disabled: " + ", ".join(s.disabled), width), "warning")
    needle = filter.lower()
    issues = [i for i in s.issues if needle in i.layer.lower()]
    layers = [r for r in s.layers.values() if needle in r.name.lower()]
    label, attr, descending = SORTS[sort % len(SORTS)]
    layers.sort(key=lambda r: _sort_key(r, attr, descending))

    footer: list[tuple[str, str]] = []
    if interactive:
        keys = "q quit  s sort  / filter  p pause"
        info = f"sort: {label}" + (f"  filter: {filter}" if filter else "")
        if prompt is not None:
            footer.append((f"/ filter layers: {prompt}_"[:width], "head"))
        else:
            footer.append((_fit([keys, info], width), "dim"))
    elif filter or sort:
        footer.append((_fit([f"sort: {label}", f"filter: {filter}" if filter else ""], width), "dim"))

    # The height left for the two lists (below a blank line and a title line each).
    budget = None if height is None else max(height - len(lines) - len(footer) - 4, 2)
    add("")
    issue_rows = len(issues)
    if budget is not None:
        issue_rows = min(issue_rows, max(1, budget // 3))
    counts: dict[str, int] = {}
    for i in issues:
        counts[i.severity] = counts.get(i.severity, 0) + 1
    summary = ", ".join(f"{n} {sev}" for sev, n in sorted(counts.items(), key=lambda kv: SEVERITY_ORDER.get(kv[0], 3)))
    add(f"ISSUES {len(issues)}" + (f" ({summary})" if summary else ": none") +
        (f"  matching '{filter}'" if filter else ""), "head")
    sev_w, kind_w, value_w = 8, 10, 8
    since_w = 17
    name_w = max(8, width - sev_w - kind_w - value_w - since_w - 4)
    shown = issues if len(issues) <= issue_rows else issues[:max(issue_rows - 1, 0)]
    for i in shown:
        first = history.since.get((i.layer, i.kind))
        if first is None or first[1] is None:
            since = ""
        elif first[0] <= 1:
            since = f"since step ≤{first[1]:.0f}"
        else:
            since = f"since step {first[1]:.0f}"
        add(f"{i.severity[:sev_w]:<{sev_w}} {middle(i.kind, kind_w):<{kind_w}} {layer_name(i.layer, name_w):<{name_w}} "
            f"{num(i.value):>{value_w}} {since}".rstrip(), i.severity if i.severity in SEVERITY_ORDER else "")
    if len(shown) < len(issues):
        add(f"  ... and {len(issues) - len(shown)} more issues", "dim")
    add("")

    # Layer table: the columns that fit, the name gets the rest (at least 8, at most its longest name).
    trend_w = max(6, min(history.length, 12 + max(0, width - 80) // 2))
    cols = [c for c in _columns(trend_w) if width >= c.min_total]
    longest = max([len(r.name) for r in layers] + [5])
    while True:
        fixed = sum(c.width + 1 for c in cols)
        name_w = width - fixed
        if name_w >= min(longest, 8) or len(cols) <= 3:
            break
        drop = next((c for c in reversed(cols) if c.title not in ("HLTH", "PRESSURE")), None)
        if drop is None:
            break
        cols.remove(drop)
    name_w = max(min(name_w, max(longest, 16)), 5)
    head = f"{'LAYER':<{name_w}}" + "".join(
        " " + (f"{c.title:>{c.width}}" if c.right else f"{c.title:<{c.width}}") for c in cols)
    add(head, "head")
    layer_rows = len(layers)
    if budget is not None:
        layer_rows = max(budget - len(shown) - (len(shown) < len(issues)), 1)
    table = layers if len(layers) <= layer_rows else layers[:max(layer_rows - 1, 0)]
    for row in table:
        cells = []
        for c in cols:
            if c.cell is None:
                cells.append(sparkline(history.trends.get(row.name, ()), c.width, chars))
                continue
            text = c.cell(row)
            cells.append(f"{text:>{c.width}}" if c.right else f"{text:<{c.width}}")
        add(f"{layer_name(row.name, name_w):<{name_w}} " + " ".join(cells), _style(row))
    if len(table) < len(layers):
        more = f"  ... {len(layers) - len(table)} more layers"
        add(more + ("  (/ to filter)" if interactive else ""), "dim")
    if not layers:
        add("  no layer matches" if filter else "  no layers yet", "dim")
    if height is not None:
        lines = lines[:max(height - len(footer), 0)]
        lines += [("", "")] * (height - len(footer) - len(lines))
    return lines + footer


def render(state: State | None, history: History, width: int = 80, height: int | None = 24, **view) -> str:
    """The frame as text (see `render_lines`); what `--once` prints and what the tests read."""
    return "\n".join(text.rstrip() for text, _ in render_lines(state, history, width, height, **view))


# -- reading a source --------------------------------------------------------------------------------------------

def metrics_url(url: str) -> str:
    """`host:9464` -> `http://host:9464/metrics`; a URL with a path is kept."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
        if isinstance(exc, str):
            return exc
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "timeout":
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {getattr(exc, 'reason', None) or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class Source:
    """Where the samples come from: an agent's /metrics, or a Prometheus server's `/api/v1/query`."""

    def __init__(self, url: str | None = None, *, prometheus: str | None = None, run: str | None = None,
                 rank: str | None = None, user: str | None = None, password: str | None = None,
                 cacert: str | None = None, cert: str | None = None, key: str | None = None, insecure: bool = False,
                 timeout: float = 5.0) -> None:
        self.prometheus = prometheus.rstrip("/") if prometheus else None
        self.url = self.prometheus if self.prometheus else metrics_url(url or "")
        self.run, self.rank, self.timeout = run, rank, timeout
        self.headers = {"Accept": "text/plain;version=0.0.4;q=1, */*;q=0.1",
                        "User-Agent": "gradflow-agent-top"}
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self.context: ssl.SSLContext | None = None
        if self.url.startswith("https:"):
            self.context = ssl.create_default_context(cafile=cacert)
            if insecure:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE
            if cert:
                self.context.load_cert_chain(cert, key)

    @property
    def label(self) -> str:
        """What the header shows: the URL, and for Prometheus the run."""
        return f"{self.url} run={self.run}" if self.prometheus and self.run else self.url

    def _get(self, url: str) -> str:
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as resp:
                return resp.read().decode("utf-8", errors="replace")
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise ReadError(f"cannot read {url}: {_reason(exc)}") from exc

    def _query(self, promql: str) -> list[dict]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = self._get(url)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ReadError(f"cannot read {url}: not a Prometheus API answer") from exc
        if data.get("status") != "success":
            raise ReadError(f"cannot read {url}: {data.get('error', 'query failed')}")
        return data.get("data", {}).get("result", [])

    def read(self) -> State:
        """One State; ReadError (one line naming the URL) when the source cannot be read."""
        if self.prometheus:
            return self._read_prometheus()
        text = self._get(self.url)
        try:
            state = parse_metrics(text, self.run, self.rank)
        except (ValueError, TypeError, IndexError) as exc:
            raise ReadError(f"cannot read {self.url}: not Prometheus metrics ({exc})") from exc
        if state.steps is None and not state.layers:
            raise ReadError(f"cannot read {self.url}: no gradflow_* series (is a gradflow agent serving there?)")
        return state

    def _read_prometheus(self) -> State:
        if not self.run:
            runs = sorted({r["metric"].get("run", "") for r in self._query("gradflow_steps_total")})
            if len(runs) != 1:
                found = ", ".join(runs[:8]) + (" ..." if len(runs) > 8 else "") if runs else "none"
                raise ReadError(f"{self.prometheus}: name the run with --run (runs: {found})")
            self.run = runs[0]
        matcher = f'run="{_promql_escape(self.run)}"'
        if self.rank is not None:
            matcher += f',rank="{_promql_escape(self.rank)}"'
        result = self._query(f'{{__name__=~"gradflow_.+",{matcher}}}')
        samples: list[Sample] = []
        for series in result:
            labels = dict(series.get("metric", {}))
            name = labels.pop("__name__", "")
            try:
                samples.append((name, labels, float(series["value"][1])))
            except (KeyError, IndexError, TypeError, ValueError):
                continue
        state = parse_samples(samples, self.run, self.rank)
        if state.steps is None and not state.layers:
            raise ReadError(f"{self.prometheus}: no gradflow_* series for run {self.run!r}")
        return state


def _promql_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


# -- the terminal ------------------------------------------------------------------------------------------------

def _can_encode(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def _live(source: Source, interval: float, history: History) -> int:
    """The curses loop: read every `interval` seconds (unless paused), redraw in place, handle keys."""
    import locale
    import os

    os.environ.setdefault("ESCDELAY", "25")  # Esc (cancel a filter) answers at once, not after 1 s
    import curses

    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_ALL, "")
    ascii_only = not _can_encode(SPARKS + ELLIPSIS + "≤")

    def loop(scr) -> int:
        with contextlib.suppress(curses.error):
            curses.curs_set(0)
        styles = {"": curses.A_NORMAL, "title": curses.A_BOLD, "head": curses.A_REVERSE, "dim": curses.A_DIM,
                  "critical": curses.A_BOLD, "warning": curses.A_NORMAL, "info": curses.A_NORMAL,
                  "unknown": curses.A_DIM, "error": curses.A_BOLD}
        if curses.has_colors():
            with contextlib.suppress(curses.error):
                curses.start_color()
                curses.use_default_colors()
                for n, (name, colour) in enumerate((("critical", curses.COLOR_RED), ("warning", curses.COLOR_YELLOW),
                                                    ("info", curses.COLOR_CYAN), ("unknown", curses.COLOR_MAGENTA),
                                                    ("error", curses.COLOR_RED)), start=1):
                    curses.init_pair(n, colour, -1)
                    styles[name] |= curses.color_pair(n)
        scr.timeout(100)
        state: State | None = None
        error: str | None = None
        sort, flt, paused = 0, "", False
        prompt: str | None = None
        next_read = 0.0
        dirty = True
        while True:
            if not paused and time.monotonic() >= next_read:
                try:
                    state = source.read()
                    history.update(state)
                    error = None
                except ReadError as exc:
                    error = str(exc)
                next_read = time.monotonic() + interval
                dirty = True
            if dirty:
                height, width = scr.getmaxyx()
                frame = render_lines(state, history, width, height, sort=sort, filter=flt, paused=paused,
                                     url=source.label, error=error, interactive=True, prompt=prompt,
                                     ascii_only=ascii_only)
                scr.erase()
                for y, (text, style) in enumerate(frame[:height]):
                    with contextlib.suppress(curses.error):  # the bottom-right cell cannot be written
                        scr.addnstr(y, 0, text, width - (1 if y == height - 1 else 0), styles.get(style, 0))
                scr.refresh()
                dirty = False
            ch = scr.getch()
            if ch == -1:
                continue
            dirty = True
            if ch == curses.KEY_RESIZE:
                continue
            if prompt is not None:  # typing a filter: it applies as it is typed
                if ch in (10, 13, curses.KEY_ENTER):
                    prompt = None
                elif ch == 27:
                    prompt, flt = None, ""
                elif ch in (curses.KEY_BACKSPACE, 127, 8):
                    prompt = prompt[:-1]
                    flt = prompt
                elif 32 <= ch < 127:
                    prompt += chr(ch)
                    flt = prompt
                continue
            key = chr(ch) if 0 <= ch < 256 else ""
            if key in ("q", "Q"):
                return 0
            if key == "s":
                sort = (sort + 1) % len(SORTS)
            elif key == "S":
                sort = (sort - 1) % len(SORTS)
            elif key == "/":
                prompt = flt
            elif key == "p":
                paused = not paused
                next_read = 0.0
            elif key == "r":
                next_read = 0.0

    try:
        return curses.wrapper(loop)
    except KeyboardInterrupt:
        return 0


# -- command line ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradflow-agent top",
        description="A live terminal view of a training job: its issues, worst layers first, and the trend "
                    "of each layer's gradient pressure. Keys: q quit, s sort, / filter, p pause.")
    parser.add_argument("url", nargs="?", help="the agent's metrics URL (host:port is enough), "
                                               "e.g. http://trainer:9464/metrics")
    parser.add_argument("--prometheus", metavar="URL", help="read through this Prometheus server's HTTP API instead")
    parser.add_argument("--run", help="the run label to show (with --prometheus; default: the only run)")
    parser.add_argument("--rank", help="the rank label to show (default: the lowest)")
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period (default 2)")
    parser.add_argument("--once", action="store_true", help="print one 80-column frame to stdout and exit")
    parser.add_argument("--history", type=int, default=24, metavar="N", help="refreshes kept for the trends")
    parser.add_argument("--user", help="basic-auth user name")
    parser.add_argument("--password-file", metavar="FILE", help="file holding the basic-auth password")
    parser.add_argument("--cacert", metavar="FILE", help="CA certificate(s) that signed the server's (PEM)")
    parser.add_argument("--cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key", metavar="FILE", help="its private key (PEM)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per read (default 5)")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`gradflow-agent top`: 0 on `q` or after `--once`; 2 with one line when the source cannot be read."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"gradflow-agent top: {message}", file=sys.stderr)
        return 2

    if (args.url is None) == (args.prometheus is None):
        return fail("give the agent's metrics URL, or --prometheus URL --run NAME")
    if args.interval <= 0 or args.history < 2 or args.timeout <= 0:
        return fail("--interval and --timeout must be positive, --history at least 2")
    password = None
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.read().rstrip("\r\n")
        except OSError as exc:
            return fail(f"cannot read --password-file {args.password_file}: {_reason(exc)}")
        if args.user is None:
            return fail("--password-file needs --user")
    elif args.user is not None:
        return fail("--user needs --password-file (a password on the command line would show in ps)")
    try:
        source = Source(args.url, prometheus=args.prometheus, run=args.run, rank=args.rank, user=args.user,
                        password=password, cacert=args.cacert, cert=args.cert, key=args.key, insecure=args.insecure,
                        timeout=args.timeout)
    except (OSError, ssl.SSLError, ValueError) as exc:
        if args.debug:
            raise
        return fail(f"TLS files: {_reason(exc)}")
    history = History(args.history)
    if args.once:
        try:
            state = source.read()
        except ReadError as exc:
            if args.debug:
                raise
            return fail(str(exc))
        history.update(state)
        ascii_only = not _can_encode(SPARKS + ELLIPSIS + "≤")
        print(render(state, history, 80, None, url=source.label, ascii_only=ascii_only))
        return 0
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return fail("the live view needs a terminal; use --once to print one frame")
    return _live(source, args.interval, history)


if __name__ == "__main__":
    raise SystemExit(main())
