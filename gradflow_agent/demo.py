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
        _scale_init(model, 0.5)
        # a tiny eps keeps Adam's steps lr-sized even for ~1e-9 gradients: vanishing, not also stalled
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-14)
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


def run(pathology: str | None = None, steps: int = 400, port: int = 9464, addr: str = "127.0.0.1",
        config: str | None = None, step_delay: float = 0.01, linger: float = 0.0, quiet: bool = False) -> list:
    """Train with the agent attached, show progress and a health table, return the detected issues."""
    import yaml
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import attach
    from .config import load_default, merge
    from .report.live import health_table, issues_table

    console = Console(quiet=quiet, width=None if Console().is_terminal else 130)
    cfg = merge(load_default(), DEMO_CONFIG, "demo defaults")
    if config:
        with open(config, encoding="utf-8") as fh:
            cfg = merge(cfg, yaml.safe_load(fh) or {}, config)
    cfg["exporters"]["prometheus"].update(port=port, addr=addr)
    if pathology:
        cfg["run"]["name"] = f"demo-{pathology}"
    w = build(pathology)
    agent = attach(w.model, cfg, optimizer=w.optimizer)
    console.print(f"[bold]gradflow-agent demo[/] ({pathology or 'healthy'}): metrics at "
                  f"[cyan]{agent.prometheus_url}[/]")
    try:
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=console, transient=False) as progress:
            task = progress.add_task("training", total=steps, status="")
            for step in range(steps):
                loss = train_step(w, step, agent)
                if step % 10 == 0:
                    snap = agent.latest
                    flagged = sorted({i.kind for i in snap.issues}) if snap else []
                    progress.update(task, status=f"loss {loss.item():.4g}  issues: {', '.join(flagged) or '-'}")
                progress.advance(task)
                if step_delay:
                    time.sleep(step_delay)
        issues = agent.issues()
        console.print(health_table(agent.latest))
        console.print(issues_table(issues))
        if linger > 0:
            console.print(f"serving metrics for {linger:g} s more (Ctrl-C to stop)")
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(linger)
        return issues
    finally:
        agent.detach()
