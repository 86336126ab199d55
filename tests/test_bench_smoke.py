"""The bench scripts run end to end (their figures are for people, not for asserts: machines here are
noisy). What is checked is that they measure what they say: a ratio per workload, the budget's settled
cadence, and a scraper that really fetched /metrics while the agent trained."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_overhead_bench_measures_a_ratio_with_a_scraper_running():
    out = _run("bench/overhead.py", "--workloads", "tiny", "--configs", "default", "--rounds", "2",
               "--settle", "64", "--scrape", "20", "--table")
    assert "/metrics scraped 20/s" in out
    row = re.search(r"^tiny\s+default\s+([\d.]+)\s+([\d.]+)x\s+[\d.]+-[\d.]+\s+(\d+)/(\d+)$", out, re.M)
    assert row, out
    assert float(row.group(1)) > 0 and float(row.group(2)) > 0
    assert "| tiny | default |" in out  # the README table


def test_step_parts_bench_takes_the_agent_apart():
    out = _run("bench/step_parts.py", "--rounds", "1", "--steps", "40")
    lines = [line for line in out.splitlines() if "us/step" in line]
    assert len(lines) == 6 and lines[0].startswith("the whole agent"), out


def test_hot_path_bench_times_both_gradient_paths_and_the_snapshot():
    out = _run("bench/hot_path.py", "--steps", "20", "--interval", "20", "--rounds", "1")
    assert re.search(r"^tiny \(8 tensors\)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+numpy$", out, re.M), out
    assert re.search(r"^deep \(1002 tensors\)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+torch$", out, re.M), out
    assert re.search(r"^snapshot after 20 steps: [\d.]+ ms, of which the loss fold [\d.]+ ms$", out, re.M), out
