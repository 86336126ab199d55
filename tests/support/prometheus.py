"""A real Prometheus for tests: start the Debian binary on a free 127.0.0.1 port, query it, stop it.

    from tests.support.prometheus import PrometheusServer, free_port

    port = free_port()
    config = {"scrape_configs": [{"job_name": "gradflow",
                                  "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}
    with PrometheusServer(config, rule_files=["deploy/prometheus/rules/gradflow-alerts.yml"]) as prom:
        prom.wait_for_targets(1)                 # every target `up`, within a budget
        prom.query('gradflow_steps_total')       # -> list of {"metric": {...}, "value": [t, "v"]}
        prom.wait_until(lambda: prom.alerts(state="firing"), timeout=20, what="an alert")

Scrape and evaluation intervals default to 1 s. Start one server per test session (the first scrape of
a new target lands ~5 s after start); a missing binary is a test failure that says what to install,
never a skip.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

T = TypeVar("T")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it, so it is an unusual one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive TCP ports free on 127.0.0.1 now, below the kernel's ephemeral
    range (32768+): ports the OS hands out to other sockets meanwhile (gloo's connections between the
    ranks, clients) never land on them, as they can on `free_port() + 1`."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found in 20000-32000")


def require_binary(name: str, package: str) -> str:
    """The path of `name`, or a test failure naming the Debian package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH: install it with `apt-get install -y {package}`", pytrace=False)
    return path


class PrometheusServer:
    """One Prometheus process with a given config (text or dict) and rule files, on 127.0.0.1.

    `rule_files` are copied into the server's temporary directory and listed in `rule_files:`; the
    config's `global` scrape/evaluation intervals default to `interval`.
    """

    def __init__(self, config: str | Mapping[str, Any], rule_files: Iterable[str | Path] = (), *,
                 interval: str = "1s", port: int | None = None, extra_args: Iterable[str] = ()) -> None:
        self._binary = require_binary("prometheus", "prometheus")
        cfg = yaml.safe_load(config) if isinstance(config, str) else dict(config)
        cfg = dict(cfg or {})
        glob = dict(cfg.get("global") or {})
        glob.setdefault("scrape_interval", interval)
        glob.setdefault("evaluation_interval", interval)
        cfg["global"] = glob
        self.dir = Path(tempfile.mkdtemp(prefix="gradflow-prometheus-"))
        names = []
        for i, rule_file in enumerate(rule_files):
            dest = self.dir / f"rules-{i}-{Path(rule_file).name}"
            shutil.copyfile(rule_file, dest)
            names.append(str(dest))
        if names:
            cfg["rule_files"] = list(cfg.get("rule_files") or []) + names
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "prometheus.log"
        self._extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> PrometheusServer:
        """Start the binary and wait until it answers /-/ready."""
        args = [self._binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                "--log.level=info", *self._extra_args]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child process owns it until stop()
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"prometheus exited with code {self._proc.returncode} at start")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self._fail(f"prometheus not ready after {timeout:.0f} s")
        return self  # unreachable

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and delete its data."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _fail(self, message: str) -> None:
        pytest.fail(f"{message}\n--- prometheus log ({self.log_path}) ---\n{self.log_tail()}", pytrace=False)

    # -- HTTP API ----------------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path> and return its `data`; a Prometheus error raises `PrometheusError`."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the result list (`[{"metric": {...}, "value": [t, "v"]}, ...]`)."""
        data = self.api("query", query=expr, time=at)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"metric": {},
                                                                                   "value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """Range query: `[{"metric": {...}, "values": [[t, "v"], ...]}, ...]`."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (labels, health, lastError)."""
        return self.api("targets", state="active")["activeTargets"]

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        """Alerts Prometheus holds now (pending and firing), optionally only one `state`."""
        alerts = self.api("alerts")["alerts"]
        return [a for a in alerts if state is None or a["state"] == state]

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups, with each rule's health and last error."""
        return self.api("rules")["groups"]

    # -- waiting -----------------------------------------------------------------------------------
    def wait_until(self, probe: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
        """Poll `probe` until it returns something truthy; fail (with the log) after `timeout` s."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = probe()
            except PrometheusError as exc:
                last = exc
            else:
                if last:
                    return last
            if time.monotonic() >= deadline:
                self._fail(f"timed out after {timeout:.0f} s waiting for {what}; last result: {last!r}")
            time.sleep(interval)

    def wait_for_targets(self, count: int, timeout: float = 20.0,
                         select: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Wait until at least `count` targets (those `select` accepts) are `up`; return those."""
        deadline = time.monotonic() + timeout
        while True:
            targets = [t for t in self.targets() if select is None or select(t)]
            up = [t for t in targets if t["health"] == "up"]
            if len(up) >= count:
                return up
            if time.monotonic() >= deadline:
                states = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
                self._fail(f"{len(up)} of {count} target(s) up after {timeout:.0f} s: {states}")
            time.sleep(0.25)


class PrometheusError(RuntimeError):
    """The Prometheus HTTP API answered with an error (bad query, timeout)."""


@contextlib.contextmanager
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """A real Pushgateway on a free port (persisting to a file in tmp_path); yields its base URL."""
    binary = require_binary("prometheus-pushgateway", "prometheus-pushgateway")
    port = free_port()
    gw = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                           f"--persistence.file={tmp_path / 'pushgateway.db'}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        gw.terminate()
        gw.wait(10)


SHIPPED_RULES = Path(__file__).resolve().parents[2] / "deploy/prometheus/rules/gradflow-alerts.yml"


def rules_without_delay(tmp: Path, only: Iterable[str] | None = None,
                        keep: Iterable[str] = ("TrainingHung", "GradflowAgentDown"),
                        durations: Mapping[str, str] | None = None) -> Path:
    """The shipped rule file with `for:` -> 0s (for the alerts in `only`, or all but `keep`; `durations`:
    other values by alert name): tests see an alert fire at once; the shipped durations are pinned by the
    promtool unit tests."""
    data = yaml.safe_load(SHIPPED_RULES.read_text(encoding="utf-8"))
    chosen, kept, durations = (set(only) if only is not None else None), set(keep), dict(durations or {})
    for group in data["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert")
            if name in durations:
                rule["for"] = durations[name]
            elif name and (name in chosen if chosen is not None else name not in kept):
                rule["for"] = "0s"
    path = tmp / "gradflow-alerts.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
