"""`gradflow-agent demo` in an 80-column terminal: every line fits, no number is cut to `0.0…`, the metrics
URL is printed once on its own line, the progress line has an ETA, a first line appears before torch is
imported, non-positive `--steps` is one error line (exit 2); and the vanishing demo stays vanishing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTING = "gradflow-agent demo: starting (importing torch)..."
URL = re.compile(r"https?://[^\s]+/metrics")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADFLOW_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _demo(*args: str, columns: int = 80, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradflow_agent", "demo", "--port", "0", "--step-delay", "0", *args],
                          cwd=ROOT, env=_env(COLUMNS=str(columns)), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _check_80_columns(text: str) -> None:
    lines = text.splitlines()
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, "\n".join(too_long)
    assert "…" not in text, text  # nothing truncated: no `0.0…`, no `lay…`
    urls = URL.findall(text)
    assert len(urls) == 1, urls  # once (the agent's own INFO line is silenced)
    assert urls[0] in lines, "the URL is not on a line of its own"


@pytest.mark.parametrize("pathology", ["exploding", "vanishing", "nonfinite"])
def test_demo_output_fits_80_columns(pathology: str) -> None:
    done = _demo("--steps", "40", "--pathology", pathology)
    assert done.returncode == 0, done.stderr
    _check_80_columns(done.stdout + done.stderr)
    lines = done.stdout.splitlines()
    assert lines[0] == STARTING
    progress = next(line for line in lines if line.startswith("40/40 "))
    assert " eta " in progress and f"issues: {pathology}" in progress
    start = next(i for i, line in enumerate(lines) if "layer health at step" in line) + 1
    header = lines[start].split()
    assert header == ["layer", "type", "pressure", "turb", "zero%", "sat%", "dead%", "update"] + (
        ["NaN"] if pathology == "nonfinite" else []) + ["health"]
    rows = [line.split() for line in lines[start + 2:] if line.strip()]
    rows = rows[:next(i for i, row in enumerate(rows) if row[0] == "detected")]
    assert len(rows) >= 7
    for row in rows:  # every number whole (it parses), in 3 significant digits
        assert len(row) == len(header), row
        for cell in row[2:]:
            assert cell == "-" or float(cell) == float(f"{float(cell):.3g}"), row


def test_demo_in_a_real_80_column_terminal(tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux not found: the terminal test needs it (apt-get install tmux)", pytrace=False)
    sock = f"gradflow-demo-{os.getpid()}"
    status = tmp_path / "status"
    command = (f"{sys.executable} -m gradflow_agent demo --pathology exploding --steps 400 --port 0 "
               f"--step-delay 0.01; echo $? > {status}; sleep 60")

    def pane() -> str:  # -J: a line the terminal wrapped comes back whole, so its real length shows
        return subprocess.run([tmux, "-L", sock, "capture-pane", "-p", "-J", "-t", "demo"], capture_output=True,
                              text=True, timeout=30).stdout

    started = subprocess.run([tmux, "-L", sock, "-u", "new-session", "-d", "-s", "demo", "-x", "80", "-y", "60",
                              command], env=_env(LANG="C.UTF-8", TERM="xterm-256color"), cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 120
        saw_eta = False
        while not (status.exists() and status.read_text().strip()):
            screen = pane()
            saw_eta = saw_eta or bool(re.search(r"\d+/400 .* eta \d+:\d\d:\d\d", screen))
            assert time.monotonic() < deadline, "the demo did not finish:\n" + screen
            time.sleep(0.2)
        screen = pane()
        assert status.read_text().strip() == "0", screen
        assert saw_eta or " eta " in screen, screen
        assert screen.splitlines()[0] == STARTING
        _check_80_columns(screen)
        assert "critical  exploding" in screen
    finally:
        subprocess.run([tmux, "-L", sock, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_non_positive_steps_is_one_error_line(steps: str) -> None:
    done = subprocess.run([sys.executable, "-m", "gradflow_agent", "demo", "--steps", steps, "--port", "0"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""  # nothing trained, torch not even imported
    assert done.stderr.splitlines() == [
        f"gradflow-agent demo: error: --steps must be a positive number of steps, not {steps}"]


def test_the_vanishing_demo_stays_vanishing_for_a_long_run() -> None:
    """`make demo` runs 3000 steps: at lr 1e-3 the vanishing stack used to heal after ~200 steps (and
    saturate instead), so GradientVanishing never reached its `for:`. 2000 steps, no sleeping."""
    import torch

    import gradflow_agent
    from gradflow_agent import demo
    from gradflow_agent.config import load_default, merge

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: one thread is as fast, and immune to a busy machine
    cfg = merge(load_default(), {"exporters": {"prometheus": {"enabled": False}},
                                 "sampling": {"export_every_n_steps": 100, "window": 20},
                                 "stats": {"parameters": {"every_n_steps": 10}}}, "test")
    w = demo.build("vanishing")
    agent = gradflow_agent.attach(w.model, cfg, optimizer=w.optimizer)
    seen: list[tuple[int, set[str], set[str], set[str]]] = []
    try:
        for step in range(2000):
            demo.train_step(w, step, agent)
            if step % 250 == 249:
                snap = agent.latest
                seen.append((snap.step, {i.kind for i in snap.issues},
                             {i.layer for i in snap.issues if i.kind == "vanishing"},
                             {i.severity for i in snap.issues}))
        issues = agent.issues()
    finally:
        agent.detach()
        torch.set_num_threads(threads)
    for step, kinds, layers, severities in seen:  # vanishing all along, on the first layers, nothing else
        assert kinds == {"vanishing"} and {"0", "2"} <= layers, (step, kinds, layers)
        assert severities == {"warning"}, (step, severities)  # a warning: Alertmanager pages on critical only
    assert {i.kind for i in issues} == {"vanishing"}, [str(i) for i in issues]
    assert {"0", "2"} <= {i.layer for i in issues}
    assert not any(i.kind == "saturated" for i in issues)
