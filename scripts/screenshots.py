#!/usr/bin/env python3
"""Every picture in docs/images/, made from a real run: `python scripts/screenshots.py [OUT_DIR]`.

- report-1280.png, report-375.png: the HTML report of a recorded 300-step demo run (the `dead` pathology),
  at 1280 CSS px and at 375 px with phone emulation (headless windows cannot be narrower than 500 px, so
  the phone view uses the DevTools protocol's device-metrics override, not --window-size).
- top.png, demo.png: `gradflow-agent top` and `gradflow-agent demo` in an 80x24 / 100x40 tmux pane,
  captured with `tmux capture-pane -e -p`, the ANSI text rendered to HTML (`ansi_to_html`) and shot with
  the same browser.

The browser is driven over `--remote-debugging-pipe` (Chrome DevTools protocol on fds 3/4) by the small
`Browser` below: standard library only, no websocket or driver package. tests/test_report_layout.py uses it
for its layout assertions. Needs chromium (Debian: apt-get install -y chromium) and, for the terminal
pictures, tmux.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
INSTALL = "apt-get install -y chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-extensions", "--mute-audio"]


def find_chromium() -> str | None:
    """The browser binary: $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium over the DevTools pipe: open a page at a given viewport, evaluate, screenshot."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0) -> None:
        binary = binary or find_chromium()
        if not binary:
            raise RuntimeError(f"headless Chromium not found: {INSTALL}")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="gf-chromium-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands; chromium reads fd 3
        self._out_r, out_w = os.pipe()  # chromium writes fd 4; we read

        def fds() -> None:  # in the child, before exec: the protocol's fixed descriptors
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe",
                                      "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, pass_fds=(3, 4), preexec_fn=fds)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    # -- protocol ---------------------------------------------------------------------------------------------
    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if ready:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                    raise RuntimeError(f"chromium closed the DevTools pipe: {err}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True) -> dict[str, Any]:
        """One command; its result (events that arrive meanwhile are kept in `events`)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for k, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(k)
            self.events.append(self._read(deadline))

    # -- pages ------------------------------------------------------------------------------------------------
    def open(self, url: str, width: int, height: int = 900, mobile: bool = False) -> None:
        """Load url in a fresh tab whose layout viewport is width x height CSS px (mobile: phone emulation)."""
        if self.session:
            self.send("Target.closeTarget", {"targetId": self._target}, session=False)
        self._target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": self._target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": mobile})
        self.events.clear()
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value (JSON-able), in the open page."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"script error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def console_errors(self) -> list[str]:
        """Uncaught exceptions and console output seen so far (a clean report has none)."""
        return [json.dumps(e.get("params", {}))[:300] for e in self.events
                if e.get("method") in ("Runtime.exceptionThrown", "Runtime.consoleAPICalled")]

    def screenshot(self, path: Path, max_height: int | None = None) -> Path:
        """PNG of the whole page (at most max_height CSS px of it) at the viewport's width."""
        m = self.send("Page.getLayoutMetrics")
        size = m.get("cssContentSize") or m["contentSize"]
        width = self.evaluate("document.documentElement.clientWidth")
        height = size["height"] if max_height is None else min(size["height"], max_height)
        r = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                 "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                                          "scale": 1}})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a browser that already went away is fine
            self.send("Browser.close", session=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._out_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a recorded run -------------------------------------------------------------------------------------------------
def record_demo_run(path: Path, pathology: str = "dead", steps: int = 300) -> Path:
    """A JSONL flight record of the demo model trained `steps` steps with the agent attached."""
    import torch

    import gradflow_agent
    from gradflow_agent import demo

    torch.set_num_threads(1)
    path = Path(path)
    path.unlink(missing_ok=True)
    w = demo.build(pathology)
    cfg = {"exporters": {"prometheus": {"enabled": False}, "jsonl": {"enabled": True, "path": str(path)}},
           "sampling": {"export_every_n_steps": 10, "window": 20}, "thresholds": {"warmup_steps": 10},
           "stats": {"parameters": {"every_n_steps": 1}}}
    agent = gradflow_agent.attach(w.model, cfg, optimizer=w.optimizer)
    for step in range(steps):
        demo.train_step(w, step, agent)
    agent.detach()
    return path


def demo_report(record: Path) -> Any:
    """The FlowReport of a recording, with the per-layer statistics over time its heatmaps draw."""
    from gradflow_agent.analyze.history import History
    from gradflow_agent.export.jsonl import read_snapshots
    from gradflow_agent.report.flow_report import FlowReport
    from gradflow_agent.report.html import layer_stats

    records = read_snapshots(record)
    report = FlowReport.from_records(records, title=f"gradflow report: {Path(record).name}")
    report.history.setdefault("layer_stats", layer_stats(History.from_records(records).stats))
    return report


# -- terminal pictures ------------------------------------------------------------------------------------------------
_BASIC = ("#000000", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5")
_BRIGHT = ("#666666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#ffffff")
FG, BG = "#d4d4d4", "#1e1e1e"


def _xterm256(n: int) -> str:
    if n < 8:
        return _BASIC[n]
    if n < 16:
        return _BRIGHT[n - 8]
    if n < 232:
        n -= 16
        steps = (0, 95, 135, 175, 215, 255)
        return f"#{steps[n // 36]:02x}{steps[(n // 6) % 6]:02x}{steps[n % 6]:02x}"
    g = 8 + 10 * (n - 232)
    return f"#{g:02x}{g:02x}{g:02x}"


def ansi_to_html(text: str, title: str = "terminal") -> str:
    """A page showing ANSI-coloured terminal text (SGR colours, bold, dim, reverse) as a terminal would."""
    out: list[str] = []
    state = {"fg": None, "bg": None, "bold": False, "dim": False, "rev": False, "ul": False}

    def span(s: str) -> str:
        fg, bg = state["fg"], state["bg"]
        if state["rev"]:
            fg, bg = bg or BG, fg or FG
        style = []
        if fg:
            style.append(f"color:{fg}")
        if bg:
            style.append(f"background:{bg}")
        if state["bold"]:
            style.append("font-weight:700")
        if state["dim"]:
            style.append("opacity:.65")
        if state["ul"]:
            style.append("text-decoration:underline")
        s = html.escape(s)
        return f'<span style="{";".join(style)}">{s}</span>' if style else s

    for k, part in enumerate(re.split(r"\x1b\[([0-9;:]*)m", text)):
        if k % 2 == 0:
            out.append(span(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]", "", part)))
            continue
        codes = [int(c) if c.isdigit() else 0 for c in part.replace(":", ";").split(";")] if part else [0]
        i = 0
        while i < len(codes):
            c = codes[i]
            if c == 0:
                state.update(fg=None, bg=None, bold=False, dim=False, rev=False, ul=False)
            elif c == 1:
                state["bold"] = True
            elif c == 2:
                state["dim"] = True
            elif c == 4:
                state["ul"] = True
            elif c == 7:
                state["rev"] = True
            elif c == 22:
                state.update(bold=False, dim=False)
            elif c == 24:
                state["ul"] = False
            elif c == 27:
                state["rev"] = False
            elif 30 <= c <= 37:
                state["fg"] = _BASIC[c - 30]
            elif 90 <= c <= 97:
                state["fg"] = _BRIGHT[c - 90]
            elif 40 <= c <= 47:
                state["bg"] = _BASIC[c - 40]
            elif 100 <= c <= 107:
                state["bg"] = _BRIGHT[c - 100]
            elif c == 39:
                state["fg"] = None
            elif c == 49:
                state["bg"] = None
            elif c in (38, 48) and i + 1 < len(codes):
                key = "fg" if c == 38 else "bg"
                if codes[i + 1] == 5 and i + 2 < len(codes):
                    state[key] = _xterm256(codes[i + 2])
                    i += 2
                elif codes[i + 1] == 2 and i + 4 < len(codes):
                    r, g, b = codes[i + 2:i + 5]
                    state[key] = f"#{r:02x}{g:02x}{b:02x}"
                    i += 4
            i += 1
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            f"body{{margin:0;background:{BG}}}pre{{margin:0;padding:12px 14px;color:{FG};background:{BG};"
            "font:14px/1.25 'DejaVu Sans Mono',monospace;display:inline-block}</style></head><body><pre>"
            + "".join(out) + "</pre></body></html>")


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def capture_terminals(work: Path, port: int = 9477) -> dict[str, str]:
    """ANSI captures of `gradflow-agent demo --pathology dead` (100x40) and `gradflow-agent top` (80x24)."""
    if not shutil.which("tmux"):
        raise RuntimeError("tmux not found: apt-get install -y tmux")
    sock = str(work / "tmux.sock")
    env = f"cd {REPO} && export OMP_NUM_THREADS=1 PYTHONPATH={REPO} TERM=xterm-256color COLORTERM=truecolor; "
    exe = f"{sys.executable} -m gradflow_agent"
    demo = (f"{env}{exe} demo --pathology dead --steps 900 --step-delay 0.02 --port {port} --linger 40; "
            "sleep 60")
    top = f"{env}sleep 4; {exe} top http://127.0.0.1:{port}/metrics --interval 1; sleep 60"
    try:
        _tmux("-S", sock, "new-session", "-d", "-s", "demo", "-x", "100", "-y", "40", demo)
        _tmux("-S", sock, "new-session", "-d", "-s", "top", "-x", "80", "-y", "24", top)
        time.sleep(16)
        out = {"top": _tmux("-S", sock, "capture-pane", "-e", "-p", "-t", "top")}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the demo's tables appear when training ends
            text = _tmux("-S", sock, "capture-pane", "-e", "-p", "-t", "demo")
            if "serving metrics for" in text:
                break
            time.sleep(1)
        out["demo"] = text
        return out
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else REPO / "docs" / "images"
    only = set(args[1:])  # optional: "report" and/or "terminal"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gf-shots-") as tmp, Browser() as browser:
        work = Path(tmp)
        made = []
        if not only or "report" in only:
            page = work / "report.html"
            demo_report(record_demo_run(work / "run.jsonl")).save_html(page)
            browser.open(page.as_uri(), 1280, 900)
            made.append(browser.screenshot(out / "report-1280.png", max_height=3600))
            browser.open(page.as_uri(), 375, 800, mobile=True)
            made.append(browser.screenshot(out / "report-375.png", max_height=3600))
        if not only or "terminal" in only:
            for name, text in capture_terminals(work).items():
                page = work / f"{name}.html"
                page.write_text(ansi_to_html(text.rstrip("\n") + "\n", name), encoding="utf-8")
                browser.open(page.as_uri(), 1000 if name == "demo" else 760, 300)
                w = browser.evaluate("Math.ceil(document.querySelector('pre').getBoundingClientRect().width)")
                browser.open(page.as_uri(), int(w), 300)
                made.append(browser.screenshot(out / f"{name}.png"))
    for p in made:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
