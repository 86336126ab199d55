"""Smoke tests of examples/01..05: each runs (fast, on the CPU) and shows what it promises."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(name: str, tmp_path: Path, *args: str) -> None:
    main = runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]
    assert main(["--out", str(tmp_path), *args]) == 0


def test_01_simple_mlp(tmp_path, capsys):
    run("01_simple_mlp", tmp_path, "--steps", "3")
    healthy = json.loads((tmp_path / "relu.json").read_text())
    sick = json.loads((tmp_path / "sigmoid-small-init.json").read_text())
    assert healthy["issues"] == [] and healthy["overall_status"] == "HEALTHY"
    # the gradient shrinks 4 decades through 4 layers: DECAY, and the first layer is unhealthy. (It is no longer
    # also VANISHING: that came from seed 004's absolute 0.01, which flags healthy transformers; its 2.6 decades
    # below the model's median are within the relative criterion's 3.)
    assert "decay" in {i["issue_type"] for i in sick["issues"]}
    assert sick["health"]["0"]["status"] != "HEALTHY"
    assert (tmp_path / "relu.html").read_text().startswith("<!DOCTYPE html>")
    assert "worst:" in capsys.readouterr().out


def test_02_nlp_embedding(tmp_path, capsys):
    run("02_nlp_embedding", tmp_path, "--steps", "2")
    out = capsys.readouterr().out
    assert "Embedding" in out and "depth profile" in out and "embedding vs dense" in out
    assert (tmp_path / "nlp.html").exists()


def test_03_rnn_sequence(tmp_path, capsys):
    run("03_rnn_sequence", tmp_path, "--steps", "1", "--length", "24")
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in out.splitlines() if line[:4] in ("vani", "orth", "LSTM", "GRU ")}
    assert "short_memory" in rows["vanilla RNN"] and "SUBCRITICAL" in rows["vanilla RNN"]
    assert "gate forget" in out and "custom cell (GRUCell" in out
    assert len(list(tmp_path.glob("*.html"))) == 5


def test_04_memory_agent(tmp_path, capsys):
    run("04_memory_agent", tmp_path, "--steps", "2")
    out = capsys.readouterr().out
    assert "resolved: ['exploding']" in out and "still open: ['bottleneck']" in out
    assert "naive: policy entropy" in out and "collapse risk HIGH" in out and "fixed: policy entropy" in out


def test_05_transformer(tmp_path, capsys):
    run("05_transformer", tmp_path, "--steps", "1", "--layers", "3")
    out = capsys.readouterr().out
    sections = out.split("== ")
    assert "issues: none" in sections[1] and "pre-norm" in sections[1]
    assert "post-norm" in sections[2]
    assert "residual_decay" in sections[3] and "rank-collapse risk HIGH" in sections[3]
    assert len(list(tmp_path.glob("transformer_*.html"))) == 3
