"""`gradflow-agent top`: the pure renderer on synthetic metrics, `--once` against a real training process
(directly, through a real Prometheus, over TLS with basic auth), and the live view in a real terminal
(tmux at 80x24: it shows the exploding layers, `s` changes the sort, `/` filters, `p` pauses, `q` quits).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gradflow_agent.report import top
from gradflow_agent.report.top import History, layer_name, middle, num, parse_metrics, pct, render, sparkline
from tests.support.prometheus import PrometheusServer

ROOT = Path(__file__).resolve().parents[1]
SPARKS = "▁▂▃▄▅▆▇█"


# -- synthetic metrics ------------------------------------------------------------------------------------------

def _metrics(step: int = 300, *, pressure: dict[str, float] | None = None, issues=(), unknown=("head",),
             n_blocks: int = 10) -> str:
    """An agent's /metrics text: a stem, `n_blocks` long-named blocks, a head; `issues` are
    (layer, kind, severity, value); a layer in `unknown` has no health series."""
    names = ["stem"] + [f"encoder.layers.{i}.self_attention.out_proj" for i in range(n_blocks)] + ["head"]
    pressure = pressure or {}
    flagged = {layer: severity for layer, _, severity, _ in issues}
    out = ['# TYPE gradflow_steps_total counter', f'gradflow_steps_total{{rank="0",run="r1"}} {step}',
           'gradflow_loss{rank="0",run="r1"} 0.0123', 'gradflow_grad_norm{rank="0",run="r1"} 1.2e-07',
           f'gradflow_last_snapshot_timestamp_seconds{{rank="0",run="r1"}} {1000.0 + step / 10}',
           'gradflow_agent_errors_total{component="hook",rank="0",run="r1"} 0']
    for i, name in enumerate(names):
        lab = f'layer="{name}",rank="0",run="r1"'
        out.append(f'gradflow_layer_info{{index="{i}",{lab},layer_type="Linear"}} 1')
        out.append(f'gradflow_grad_pressure{{{lab}}} {pressure.get(name, 0.01 * (i + 1))}')
        out.append(f'gradflow_grad_turbulence{{{lab}}} 0.25')
        out.append(f'gradflow_update_ratio{{{lab}}} 0.00123')
        out.append(f'gradflow_activation_zero_ratio{{{lab}}} 0.5')
        if name not in unknown:
            score = {"critical": 50, "warning": 75}.get(flagged.get(name, ""), 100)
            out.append(f'gradflow_layer_health_score{{{lab}}} {score}')
    for layer, kind, severity, value in issues:
        out.append(f'gradflow_issue{{kind="{kind}",layer="{layer}",rank="0",run="r1",severity="{severity}"}} 1')
        out.append(f'gradflow_issue_value{{kind="{kind}",layer="{layer}",rank="0",run="r1"}} {value}')
    return "\n".join(out) + "\n"


def _table_rows(frame: str) -> list[str]:
    lines = frame.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("LAYER"))
    return [line for line in lines[start + 1:] if line and not line.startswith(("  ", "q quit"))]


EXPLODING = [("encoder.layers.7.self_attention.out_proj", "exploding", "critical", 4.41e4)]


def test_frame_fits_80x24_worst_first_and_unknown_is_never_healthy():
    state = parse_metrics(_metrics(pressure={EXPLODING[0][0]: 4.41e4}, issues=EXPLODING, n_blocks=20))
    history = History()
    history.update(state, now=1400)
    frame = render(state, history, 80, 24, url="http://trainer:9464/metrics", now=1032, interactive=True)
    lines = frame.split("\n")
    assert len(lines) == 24 and max(map(len, lines)) <= 80, frame
    assert lines[0].startswith("gradflow top  run r1  rank 0") and "snapshot 2s ago" in lines[0]
    assert lines[1].startswith("step 300  ? steps/s  loss 0.0123  grad norm 1.2e-07  agent errors 0")
    assert lines[2] == "http://trainer:9464/metrics"
    assert "ISSUES 1 (1 critical)" in frame
    rows = _table_rows(frame)
    # worst first: the critical layer, then the one whose health is unknown, then the healthy ones
    assert rows[0].startswith("e.l.7.s.out_proj") and " 50 " in rows[0] and "4.41e+04" in rows[0]
    assert rows[1].startswith("head ") and rows[1].split()[2] == "?"
    assert all(row.split()[2] == "100" for row in rows[2:])
    assert lines[-1].startswith("q quit  s sort  / filter  p pause  sort: health")
    assert "  ... 8 more layers" in frame  # 22 layers do not fit under the header at 24 lines
    for line in lines:  # numbers compact, names cut in the middle: nothing ends in a cut number
        assert "0.0…" not in line


def test_every_layer_without_health_sorts_before_the_healthy_ones_and_shows_a_question_mark():
    state = parse_metrics(_metrics(unknown=("stem", "head"), n_blocks=2))
    frame = render(state, History(), 80, None)
    rows = _table_rows(frame)
    assert [row.split()[0] for row in rows[:2]] == ["stem", "head"]
    assert [row.split()[2] for row in rows] == ["?", "?", "100", "100"]


def test_sparkline_trend_and_issue_since_step():
    history = History(length=12)
    layer = "encoder.layers.3.self_attention.out_proj"
    for k in range(8):
        issues = [(layer, "vanishing", "warning", 10.0 ** (-k - 3))] if k >= 5 else []
        history.update(parse_metrics(_metrics(100 + 10 * k, pressure={layer: 10.0 ** (k - 7)}, issues=issues)),
                       now=2000 + k)
    state = parse_metrics(_metrics(170, pressure={layer: 1.0}, issues=[(layer, "vanishing", "warning", 1e-10)]))
    trend = sparkline(history.trends[layer], 12)
    assert trend.strip() == "▁▂▃▄▅▆▇█" and len(trend) == 12  # log scale, newest on the right
    assert history.rate == pytest.approx(10.0)  # 10 steps per second of snapshot time
    frame = render(state, history, 80, 24, now=1018)
    row = next(r for r in _table_rows(frame) if r.startswith("e.l.3.s.out_proj"))
    assert "▁▂▃▄▅▆▇█" in row
    assert "10 steps/s" in frame
    issue = next(line for line in frame.splitlines() if line.startswith("warning"))
    assert issue.endswith("since step 150"), issue  # first seen at the 6th refresh, step 150
    # one that was already there at the first refresh is "since at most" that step
    first = History()
    first.update(state, now=0)
    assert "since step ≤170" in render(state, first, 80, 24, now=0)
    # resolved, then back: a new incident, a new "since"
    history.update(parse_metrics(_metrics(180)), now=2010)
    history.update(parse_metrics(_metrics(190, issues=[(layer, "vanishing", "warning", 1e-10)])), now=2011)
    assert history.since[(layer, "vanishing")][1] == 190


def test_sort_cycle_and_filter():
    state = parse_metrics(_metrics(pressure={"stem": 1e-9, EXPLODING[0][0]: 4.41e4}, issues=EXPLODING))
    history = History()
    history.update(state, now=0)
    first = {top.SORTS[i][0]: _table_rows(render(state, history, 80, None, sort=i))[0].split()[0]
             for i in range(len(top.SORTS))}
    assert first["health"] == first["pressure high"] == "e.l.7.s.out_proj"
    assert first["pressure low"] == "stem" and first["depth"] == "stem"
    frame = render(state, history, 80, 24, filter="layers.7", interactive=True)
    assert [r.split()[0] for r in _table_rows(frame)] == ["e.l.7.s.out_proj"]
    assert "filter: layers.7" in frame.splitlines()[-1]
    assert "PAUSED" in render(state, history, 80, 24, paused=True).splitlines()[0]


def test_a_failed_refresh_keeps_the_last_frame_and_says_why():
    state = parse_metrics(_metrics(issues=EXPLODING))
    history = History()
    history.update(state, now=0)
    lines = render(state, history, 80, 24, error="cannot read http://h:1/metrics: connection refused").split("\n")
    assert lines[2] == "! cannot read http://h:1/metrics: connection refused (last read below)"
    assert "ISSUES 1 (1 critical)" in lines[4] and len(lines) == 24


def test_formatting_helpers():
    assert [num(x) for x in (1.2345e-7, 0.012345, 44132.96, 0.0, float("nan"), None, float("inf"))] == [
        "1.23e-07", "0.0123", "4.41e+04", "0", "-", "-", "inf"]
    assert [pct(x) for x in (0.5, 0.003, 1.0, 0.0, float("nan"))] == ["50%", "0.3%", "100%", "0%", "-"]
    assert middle("encoder.layers.10.self_attn.out_proj", 16) == "encoder.…ut_proj"
    # block indices survive: the layers of a stack stay apart
    assert layer_name("encoder.layers.10.self_attn.out_proj", 18) == "e.l.10.s.out_proj"
    assert layer_name("encoder.layers.10.self_attn.out_proj", 30) == "encoder.layers.10.s.out_proj"
    assert layer_name("a_very_long_single_component_name", 16) == "a_very_l…nt_name"
    assert len(middle("x" * 100, 16)) == 16 and middle("short", 16) == "short"
    assert sparkline([2.0, 2.0, 2.0], 3) == "▅▅▅"
    assert set(sparkline([1.0, 1.01, 0.99, 1.02], 4)) <= {"▄", "▅"}  # noise stays flat (half a decade at least)
    assert sparkline([float("nan"), 1e-3, 1e3], 4) == "  ▁█"


def test_top_imports_neither_torch_nor_rich():
    code = "import sys, gradflow_agent.report.top\nprint('torch' in sys.modules, 'rich' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_narrow_and_wide_terminals_fit():
    state = parse_metrics(_metrics(issues=EXPLODING))
    history = History()
    history.update(state, now=0)
    for width, height in ((60, 15), (80, 24), (132, 40)):
        lines = render(state, history, width, height, interactive=True, url="https://h:1/metrics").split("\n")
        assert len(lines) == height and max(map(len, lines)) <= width, (width, height)
    assert render(state, history, 80, 24, interactive=True, ascii_only=True).isascii()  # e.g. LANG=C pipes
    wide = render(state, history, 132, 40)
    assert "encoder.layers.7.self_attention.out_proj" in wide and "DEAD" in wide


# -- against a real training process -----------------------------------------------------------------------------

def _read_url(proc: subprocess.Popen[str], timeout: float = 120.0) -> str:
    """The metrics URL the demo prints on its own line (its output is drained on a thread from then on)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line.startswith("http"):
            return line.strip()
    pytest.fail(f"the demo printed no metrics URL within {timeout:.0f} s: {''.join(seen)!r}")


@pytest.fixture(scope="module")
def trainer():
    """A real `gradflow-agent demo --pathology exploding` process serving /metrics until the tests end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADFLOW_")}
    env.update(OMP_NUM_THREADS="1", GRADFLOW_SAMPLING_EXPORT_EVERY_SECONDS="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "gradflow_agent", "demo", "--pathology", "exploding",
                             "--steps", "100000", "--port", "0", "--quiet", "--step-delay", "0.01"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = _read_url(proc)
        deadline = time.monotonic() + 60
        while "ISSUES 6 (6 critical)" not in _once(url).stdout:  # past the warm-up, the issues published
            assert time.monotonic() < deadline, "the exploding demo flagged no layer within 60 s"
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # the demo detaches on Ctrl-C
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _once(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradflow_agent", "top", *args, "--once"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_once_against_a_real_training_process(trainer):
    done = _once(trainer)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.rstrip("\n").split("\n")
    assert max(map(len, lines)) <= 80, done.stdout
    assert lines[0].startswith("gradflow top  run demo-exploding  rank 0")
    assert lines[2] == trainer
    assert "ISSUES 6 (6 critical)" in done.stdout
    rows = _table_rows(done.stdout)
    assert rows[0].split()[:3] == ["0", "Linear", "50"], done.stdout  # the exploding layers first
    assert {r.split()[0] for r in rows if r.split()[2] == "50"} == {"0", "2", "4", "6", "8", "10"}
    assert all(r.split()[2] == "100" for r in rows[6:])


def test_once_exits_2_with_one_line_when_the_url_cannot_be_read(tmp_path):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    done = _once(url)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"gradflow-agent top: cannot read {url}: connection refused"]
    assert _once(f"127.0.0.1:{port}").stderr.strip().endswith(f"{url}: connection refused")  # host:port is enough
    assert _once().returncode == 2  # neither a URL nor --prometheus


def test_once_through_a_real_prometheus(trainer):
    target = trainer.split("//", 1)[1].split("/", 1)[0]
    config = {"scrape_configs": [{"job_name": "gradflow", "static_configs": [{"targets": [target]}]}]}
    with PrometheusServer(config) as prom:
        prom.wait_until(lambda: prom.query('gradflow_issue{kind="exploding"}'), timeout=30,
                        what="the exploding issue in Prometheus")
        done = _once("--prometheus", prom.url, "--run", "demo-exploding")
        assert done.returncode == 0, done.stderr
        assert "run demo-exploding" in done.stdout and "ISSUES 6 (6 critical)" in done.stdout
        assert _table_rows(done.stdout)[0].split()[:3] == ["0", "Linear", "50"]
        alone = _once("--prometheus", prom.url)  # the only run: no --run needed
        assert alone.returncode == 0 and "run demo-exploding" in alone.stdout, alone.stderr
        missing = _once("--prometheus", prom.url, "--run", "nope")
        assert missing.returncode == 2 and "no gradflow_* series for run 'nope'" in missing.stderr


def _pki(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(key, cn, issuer_key, issuer=None, ca=False, sans=()):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(ca_key, "top test CA", ca_key, ca=True)
    server = cert(server_key, "trainer", ca_key, ca, sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (root / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (root / "server.key").write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    return root / "ca.pem", root / "server.pem", root / "server.key"


def test_once_over_tls_with_basic_auth(tmp_path, capsys):
    import bcrypt
    import torch
    from torch import nn

    import gradflow_agent

    ca, cert, key = _pki(tmp_path)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  oncall: '{hashed}'\n", encoding="utf-8")
    (tmp_path / "pw").write_text("s3cret\n", encoding="utf-8")
    (tmp_path / "bad").write_text("wrong\n", encoding="utf-8")
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    agent = gradflow_agent.attach(model, {"run": {"name": "secure"}, "exporters": {"prometheus": {
        "port": 0, "addr": "127.0.0.1", "web_config_file": str(web)}}})
    try:
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            agent.step()
        agent.snapshot()
        url = agent.prometheus_url
        assert url.startswith("https://")
        auth = ["--user", "oncall", "--password-file", str(tmp_path / "pw")]
        assert top.main([url, "--once", *auth, "--cacert", str(ca)]) == 0
        out = capsys.readouterr().out
        assert "run secure" in out and "step 3" in out
        assert top.main([url, "--once", *auth, "--insecure"]) == 0
        capsys.readouterr()
        assert top.main([url, "--once", "--user", "oncall", "--password-file", str(tmp_path / "bad"),
                         "--cacert", str(ca)]) == 2
        assert capsys.readouterr().err.strip() == f"gradflow-agent top: cannot read {url}: HTTP 401 Unauthorized"
        assert top.main([url, "--once", *auth]) == 2  # the server's CA is not a system one
        err = capsys.readouterr().err
        assert err.startswith(f"gradflow-agent top: cannot read {url}: TLS: ") and "CERTIFICATE_VERIFY" in err
    finally:
        agent.detach()


# -- in a real terminal ----------------------------------------------------------------------------------------

def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.fail("tmux not found: the terminal test needs it (apt-get install tmux)", pytrace=False)
    return path


def test_live_view_in_a_real_80x24_terminal(trainer, tmp_path):
    tmux = _tmux()
    sock = f"gradflow-top-{os.getpid()}"
    status = tmp_path / "status"
    command = (f"{sys.executable} -m gradflow_agent top {trainer} --interval 0.5; "
               f"echo $? > {status}")

    def tm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tmux, "-L", sock, *args], capture_output=True, text=True, timeout=30)

    def screen() -> list[str]:
        return tm("capture-pane", "-p", "-t", "top").stdout.split("\n")

    def wait_for(probe, what: str, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = screen()
            if probe(lines):
                return lines
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; the screen:\n" + "\n".join(lines), pytrace=False)
            time.sleep(0.2)

    def first_row(lines: list[str]) -> str:
        start = next(i for i, line in enumerate(lines) if line.startswith("LAYER"))
        return lines[start + 1].split()[0]

    env = {**os.environ, "LANG": "C.UTF-8", "TERM": "xterm-256color"}
    started = subprocess.run([tmux, "-L", sock, "-u", "new-session", "-d", "-s", "top", "-x", "80", "-y", "24",
                              command], env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert started.returncode == 0, started.stderr
    try:
        lines = wait_for(lambda ls: any(line.startswith("critical exploding") for line in ls)
                         and any(line.startswith("LAYER") for line in ls), "the exploding issues")
        assert len(lines) >= 24 and max(map(len, lines)) <= 80
        assert lines[0].startswith("gradflow top  run demo-exploding")
        assert "sort: health" in lines[23] and first_row(lines) == "0"
        wait_for(lambda ls: any(c in "".join(ls) for c in SPARKS[:-1]), "a pressure trend")
        tm("send-keys", "-t", "top", "s")
        lines = wait_for(lambda ls: "sort: pressure high" in ls[23], "the next sort")
        assert first_row(lines) in {"8", "10"}, "\n".join(lines)  # the largest gradient norm first
        tm("send-keys", "-t", "top", "/", "1", "0", "Enter")
        lines = wait_for(lambda ls: "filter: 10" in ls[23], "the filter")
        start = next(i for i, line in enumerate(lines) if line.startswith("LAYER"))
        assert [line.split()[0] for line in lines[start + 1:23] if line.strip()] == ["10"]
        tm("send-keys", "-t", "top", "p")
        wait_for(lambda ls: "PAUSED" in ls[0], "the pause")
        tm("send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 15
        while not status.exists() or not status.read_text().strip():
            assert time.monotonic() < deadline, "top did not quit on q:\n" + "\n".join(screen())
            time.sleep(0.2)
        assert status.read_text().strip() == "0"
    finally:
        tm("kill-server")
