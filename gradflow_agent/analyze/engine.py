"""The analysis engine: the loop and the extension types (FlowEngine, in core.py, runs them).

The loop attaches the agent, runs forward/backward for N steps and keeps one snapshot per step. The agent
measures (its hooks, device statistics and snapshots); collectors add the few measurements an analyzer needs
on top (gradient directions, attention maps, ...), their hooks registered through hooks.add_module_hook, reduced
on the device and read after the pass. The model is left as it was found: gradients present before the analysis
are restored, and parameters only move when an optimizer is given.

Extensions (vector, Jacobian, recurrent, attention, policy: each in its module) plug into core.FlowEngine; this
module holds the types they share, so every extension module depends on it and on nothing above it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..agent import Agent, attach
from ..hooks import Layer
from ..snapshot import Snapshot
from .base import FlowIssue, FlowThresholds
from .history import History
from .metrics import FlowMetrics
from .probes import LayerFlowProbe, Probes

NO_TARGET = object()  # batch_fn returned no target: loss_fn(output) instead of loss_fn(output, target)


def offline_config(steps: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Agent config for an offline analysis: no exporter, a snapshot per step, every statistic every step."""
    cfg: dict[str, Any] = {
        "exporters": {"prometheus": {"enabled": False}, "otel": {"enabled": False}, "jsonl": {"enabled": False}},
        "sampling": {"every_n_steps": 1, "export_every_n_steps": 1, "export_every_seconds": 1e9,
                     "window": max(2, steps)},
        "stats": {"parameters": {"every_n_steps": 1}, "gradients": {"output_grads": True}},
        "thresholds": {"warmup_steps": 0},
        "log": {"level": "WARNING"},
    }
    return _deep_merge(cfg, overrides or {})


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """model(x), model(*x) for a tuple/list, model(**x) for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


class Collector:
    """An extra measurement taken during the analysis loop (subclass and override what you need)."""

    def attach(self, run: AnalysisRun) -> None:
        """Register probes (run.probes) on run.layers / run.model."""

    def begin_step(self, run: AnalysisRun) -> None:
        """Before the forward pass of step run.step."""

    def after_backward(self, run: AnalysisRun, output: Any, loss: torch.Tensor) -> None:
        """After backward, before the optimizer step and zero_grad: gradients are readable."""

    def finish(self, run: AnalysisRun) -> None:
        """After the last step, before the hooks are removed."""


@dataclass
class AnalysisRun:
    """Everything one analysis loop observed."""

    model: nn.Module
    agent: Agent
    layers: list[Layer]
    probes: Probes
    flow: LayerFlowProbe
    steps: int
    device: torch.device
    step: int = 0
    snapshots: list[Snapshot] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    history: History | None = None
    outputs: list[Any] = field(default_factory=list)  # the last output (detached), for analyzers that read it

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer_of(self, module: nn.Module) -> Layer | None:
        for layer in self.layers:
            if layer.module is module:
                return layer
        return None

    @property
    def errors(self) -> dict[str, int]:
        return dict(self.agent.errors.counts)


def rank_steps(steps: int) -> set[int]:
    """Steps on which effective ranks are measured: first, middle and last (ranks move slowly)."""
    return {0, steps // 2, steps - 1}


def run_analysis(model: nn.Module, batch_fn: Callable[[], tuple[Any, Any]], loss_fn: Callable[..., torch.Tensor],
                 steps: int, *, optimizer: torch.optim.Optimizer | None = None,
                 collectors: Sequence[Collector] = (), measure_rank: bool = True,
                 agent_overrides: dict[str, Any] | None = None) -> AnalysisRun:
    """Run `steps` forward/backward passes with the agent and the collectors attached; return what was seen."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = model_device(model)
    saved_grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    # Without an optimizer the parameters never move: an update ratio of 0 would read as "stalled".
    overrides = _deep_merge({"stats": {"parameters": {"update_ratio": "sampled" if optimizer else "off"}}},
                            agent_overrides or {})
    agent = attach(model, offline_config(steps, overrides), optimizer=optimizer)
    probes = Probes(agent.errors)
    try:
        flow = LayerFlowProbe(agent.layers, probes, measure_rank=measure_rank, device=device)
        run = AnalysisRun(model, agent, agent.layers, probes, flow, steps, device)
        for c in collectors:
            c.attach(run)
        ranked = rank_steps(steps)
        for step in range(steps):
            run.step = step
            flow.begin_step(step in ranked)
            for c in collectors:
                c.begin_step(run)
            inputs, target = batch_fn()
            inputs = to_device(inputs, device)
            output = call_model(model, inputs)
            loss = loss_fn(output) if target is NO_TARGET else loss_fn(output, to_device(target, device))
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TypeError("loss_fn must return a scalar tensor")
            loss.backward()
            flow.end_step()
            for c in collectors:
                c.after_backward(run, output, loss)
            if optimizer is not None:
                optimizer.step()  # the agent reads the gradients in its step pre-hook
            agent.step(loss=loss.detach())
            run.snapshots.append(agent.latest)
            flow.add_output_norms(agent.latest)  # ||dL/d out||: the agent's own output-gradient statistic
            run.losses.append(float(loss.detach()))
            run.outputs = [_detach(output)]
            for p in model.parameters():
                p.grad = None
        for c in collectors:
            c.finish(run)
        run.history = History.from_snapshots(run.snapshots)
        return run
    finally:
        probes.remove()
        agent.detach()
        for p, g in saved_grads.items():
            p.grad = g


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj) if not hasattr(obj, "_fields") else obj
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def batches_from(input_fn: Callable[[], Any] | None = None, x: Any = None, y: Any = NO_TARGET
                 ) -> Callable[[], tuple[Any, Any]]:
    """A batch function from the seed-003 form (input_fn) or the seed-004 form (fixed x, y)."""
    if input_fn is not None:
        def from_fn() -> tuple[Any, Any]:
            out = input_fn()
            return out, NO_TARGET
        return from_fn

    def fixed() -> tuple[Any, Any]:
        return x, y
    return fixed


def contract_batches(inputs: Any, targets: Any = None) -> Callable[[], tuple[Any, Any]]:
    """The contract's inputs/targets as a batch function: a zero-argument callable (not a module) gives fresh
    inputs each step, anything else is the fixed input; targets None means loss_fn(output)."""
    if inputs is None:
        raise TypeError("analyze() needs inputs (what the model is called with, or a function returning them)")
    y = NO_TARGET if targets is None else targets
    if callable(inputs) and not isinstance(inputs, (torch.Tensor, nn.Module)):
        def fresh() -> tuple[Any, Any]:
            return inputs(), y
        return fresh
    return batches_from(x=inputs, y=y)


def default_loss(output: Any, *target: Any) -> torch.Tensor:
    """The loss when no loss_fn is given: `output.loss` (a Hugging Face model given labels), else the output
    itself when it is a scalar tensor."""
    if target:
        raise TypeError("targets were given without a loss_fn: pass loss_fn(output, targets)")
    loss = None if isinstance(output, torch.Tensor) else getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, torch.Tensor) and output.ndim == 0:
        return output
    raise TypeError("no loss_fn given and the model output has no `loss` and is not a scalar: pass loss_fn")


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy that shares nothing with `model` (for checkpoint comparisons)."""
    return copy.deepcopy(model)


def layer_parameters(layers: Sequence[Layer]) -> dict[int, list[nn.Parameter]]:
    """Trainable parameters owned by each layer (the agent's rule: a leaf owns all of its parameters, a
    container only its direct ones; a parameter shared by several layers belongs to the first)."""
    seen: set[int] = set()
    out: dict[int, list[nn.Parameter]] = {}
    for layer in layers:
        recurse = next(layer.module.children(), None) is None
        mine = []
        for p in layer.module.parameters(recurse=recurse):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                mine.append(p)
        out[layer.index] = mine
    return out


# -- extensions ------------------------------------------------------------------------------------------------
@dataclass
class ExtensionResult:
    """What an extension adds to a report: issues, a rendered section, and its typed result."""

    issues: list[FlowIssue] = field(default_factory=list)
    section: dict[str, Any] | None = None
    stats: Any = None


class Extension:
    """An add-on measurement of an analysis: its collectors, then issues and a report section from the run."""

    name = "extension"

    def collectors(self) -> list[Collector]:
        return []

    def evaluate(self, run: AnalysisRun, metrics: list[FlowMetrics], th: FlowThresholds) -> ExtensionResult:
        raise NotImplementedError
