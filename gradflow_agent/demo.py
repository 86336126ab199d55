"""`gradflow-agent demo`: train a small model on synthetic data with the agent attached.

`--pathology` builds a model with one known fault so that its signal and its alert can be watched:
each fault is made to trip its own detector and no other (the alerting end-to-end test relies on it).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PATHOLOGIES = ("vanishing", "exploding", "dead", "nonfinite", "saturated", "stalled", "unstable")
DEMO_CONFIG = {
    "run": {"name": "demo"},
    "sampling": {"export_every_n_steps": 10, "export_every_seconds": 1.0, "window": 20},
    "stats": {"parameters": {"every_n_steps": 1}},
    "thresholds": {"warmup_steps": 10},
    "log": {"level": "WARNING"},  # run() prints the metrics URL itself, once, on its own line
}


@dataclass
class Workload:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (x, y)
    skip_nonfinite: bool = False  # skip the optimizer step when the loss is not finite (AMP-style)


def _mlp(widths: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _scale_init(model: nn.Module, gain: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, gain / math.sqrt(m.in_features))
                m.bias.zero_()


def build(pathology: str | None, seed: int = 0) -> Workload:
    """The demo model, optimizer and data stream, with the requested fault."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d_in, d_out = 32, 8
    teacher = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)

    def clean(step: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, d_in, generator=g)
        return x, torch.tanh(x @ teacher)

    batch = clean
    skip = False
    if pathology in (None, "none", "stalled", "unstable", "nonfinite"):
        model = _mlp([d_in, 64, 64, 64, d_out], nn.ReLU)
        lr = 1e-12 if pathology == "stalled" else 1e-3
        opt: torch.optim.Optimizer = (torch.optim.SGD(model.parameters(), lr=lr) if pathology == "stalled"
                                      else torch.optim.Adam(model.parameters(), lr=lr))
        if pathology == "unstable":
            def batch(step: int):  # a rare outlier batch: gradient spikes two orders above the rest
                x, y = clean(step)
                return (x, y * 100.0) if step % 20 == 19 else (x, y)
        if pathology == "nonfinite":
            skip = True

            def batch(step: int):  # a corrupt record every 10 steps once training is under way
                x, y = clean(step)
                if step >= 15 and step % 10 == 5:
                    x[0, 3] = float("nan")
                return x, y
    elif pathology == "vanishing":  # deep sigmoid stack with a small initialisation
        model = _mlp([d_in] + [64] * 9 + [d_out], nn.Sigmoid)
        # Each sigmoid layer shrinks the backward signal ~8x: layer 0's pressure ~5e-8 and layer 2's ~4e-7
        # are below the 1e-6 threshold but above its critical band (1e-8), so the alert is a warning
        # (Alertmanager pages only on critical ones); layer 4 (~2.5e-6) joins them after ~10000 steps.
        _scale_init(model, 0.7)
        # A tiny eps keeps Adam's steps lr-sized even for ~1e-9 gradients: vanishing, not also stalled
        # (update ratio ~5e-6, 50 times the stalled threshold). A small lr keeps the fault for the whole
        # run: at lr 1e-3 Adam re-scales the weights within ~200 steps, the gradients recover (pressure
        # ~4e-3, so GradientVanishing never reaches its 10 min `for:`) and the grown weights saturate the
        # sigmoids instead. At 1e-6 the pressures hold over 20000 steps, with no saturated output
        # (tests/test_demo_terminal.py checks 2000).
        opt = torch.optim.Adam(model.parameters(), lr=1e-6, eps=1e-14)
    elif pathology == "exploding":  # too large an initialisation gain; a tiny LR keeps it finite
        model = _mlp([d_in, 64, 64, 64, 64, 64, d_out], nn.ReLU)
        _scale_init(model, 4.0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    elif pathology == "dead":  # most units of the second ReLU are pushed below zero
        model = _mlp([d_in, 64, 64, 64, d_out], nn.ReLU)
        with torch.no_grad():
            model[2].bias[:52] = -20.0
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif pathology == "saturated":  # a shallow tanh layer driven far into its flat tails
        model = nn.Sequential(nn.Linear(d_in, 64), nn.Tanh(), nn.Linear(64, d_out))
        with torch.no_grad():
            model[0].weight.normal_(0.0, 6.0 / math.sqrt(d_in))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    else:
        raise ValueError(f"unknown pathology {pathology!r}; choose one of {', '.join(PATHOLOGIES)}")
    return Workload(model, opt, batch, skip)


def train_step(w: Workload, step: int, agent=None) -> torch.Tensor:
    x, y = w.batch(step)
    loss = nn.functional.mse_loss(w.model(x), y)
    loss.backward()
    if not w.skip_nonfinite or torch.isfinite(loss):
        w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)
    if agent is not None:
        agent.step(loss=loss)
    return loss


def _status(loss: float, kinds: list[str], room: int) -> str:
    """The progress line's tail in `room` characters: the loss, then as many issue kinds as fit."""
    text = f"loss {loss:.3g}  issues: {', '.join(kinds) or '-'}"
    for n in range(len(kinds) - 1, 0, -1):
        if len(text) <= room:
            break
        text = f"loss {loss:.3g}  issues: {', '.join(kinds[:n])} +{len(kinds) - n}"
    return text


def run(pathology: str | None = None, steps: int = 400, port: int = 9464, addr: str = "127.0.0.1",
        config: str | None = None, step_delay: float = 0.01, linger: float = 0.0, quiet: bool = False) -> list:
    """Train with the agent attached, show progress and a health table, return the detected issues.

    Everything fits the console's width (80 columns included): the metrics URL is printed once, on its
    own line, so that a terminal never breaks it; the agent's own INFO line saying the same is silenced.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, not {steps}")
    import yaml
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from . import attach
    from .config import load_default, merge
    from .report.live import health_table, issues_table

    console = Console(quiet=quiet)  # the terminal's width, else $COLUMNS, else 80
    cfg = merge(load_default(), DEMO_CONFIG, "demo defaults")
    if config:
        with open(config, encoding="utf-8") as fh:
            cfg = merge(cfg, yaml.safe_load(fh) or {}, config)
    cfg["exporters"]["prometheus"].update(port=port, addr=addr)
    if pathology:
        cfg["run"]["name"] = f"demo-{pathology}"
    w = build(pathology)
    agent = attach(w.model, cfg, optimizer=w.optimizer)
    where = " (all interfaces)" if addr in ("0.0.0.0", "::", "") else ""
    # Plain prints, also with --quiet: whoever started the demo needs the URL (a script, a container log).
    print(f"gradflow-agent demo ({pathology or 'healthy'}): {steps} steps, metrics{where} at", flush=True)
    print(agent.prometheus_url, flush=True)
    if not quiet:
        print("live view from another terminal: gradflow-agent top <that URL>", flush=True)
    try:
        width = console.width
        bar = 10 if width < 100 else 30
        count = len(f"{steps}/{steps}")
        # step count, bar, elapsed, "eta" and its time, one space between each: what is left is the status
        room = max(width - (count + 1 + bar + 1 + 7 + 1 + 3 + 1 + 7 + 1) - 1, 20)
        with Progress(MofNCompleteColumn(), BarColumn(bar_width=bar), TimeElapsedColumn(), TextColumn("eta"),
                      TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console,
                      transient=False) as progress:
            task = progress.add_task("training", total=steps, status="")
            for step in range(steps):
                loss = train_step(w, step, agent)
                if step % 10 == 0:
                    snap = agent.latest
                    flagged = sorted({i.kind for i in snap.issues}) if snap else []
                    progress.update(task, status=_status(loss.item(), flagged, room))
                progress.advance(task)
                if step_delay:
                    time.sleep(step_delay)
        issues = agent.issues()
        console.print(health_table(agent.latest, width=width))
        console.print(issues_table(issues, width=width))
        if linger > 0:
            console.print(f"serving metrics for {linger:g} s more (Ctrl-C to stop)")
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(linger)
        return issues
    finally:
        agent.detach()
