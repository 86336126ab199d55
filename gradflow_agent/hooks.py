"""HookManager: chooses the layers, owns every hook handle, and routes hook calls to the agent.

Activations come from per-module forward hooks on the chosen layers. Gradients are read at the
optimizer step boundary (a step pre-hook sees accumulated, DDP-averaged, unscaled gradients), never
per micro-batch. Without an optimizer reference the process-wide optimizer hooks are used, locked onto
the first optimizer that steps this model's parameters.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ErrorCounter
from .stats.kinds import CHANNELS_FIRST, OutputKind, first_tensor, output_kind

log = logging.getLogger("gradflow_agent")


def _in_backward() -> bool:
    """True while autograd runs backward: activation checkpointing re-runs forwards there."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - older torch
        return False


@dataclass(frozen=True)
class Layer:
    index: int
    name: str
    module: nn.Module
    type_name: str
    kind: OutputKind


def select_layers(model: nn.Module, modules_cfg) -> tuple[list[Layer], int]:
    """Layers to monitor, in model order, and how many more matched but were left out by the cap.

    A module qualifies when it matches the include/exclude globs and the type list, and is a leaf or
    directly owns parameters (MultiheadAttention's in_proj_weight, an LSTM's weights).
    """
    chosen: list[Layer] = []
    skipped = 0
    types = set(modules_cfg.types)
    for name, module in model.named_modules():
        label = name or "(root)"
        is_leaf = next(module.children(), None) is None
        owns = next(module.parameters(recurse=False), None) is not None
        if modules_cfg.leaf_only and not (is_leaf or owns):
            continue
        if not modules_cfg.leaf_only and module is model and not owns:
            continue
        if not any(fnmatch.fnmatchcase(label, g) for g in modules_cfg.include):
            continue
        if any(fnmatch.fnmatchcase(label, g) for g in modules_cfg.exclude):
            continue
        if types and type(module).__name__ not in types:
            continue
        if type(module).__name__ in modules_cfg.exclude_types:
            continue
        if len(chosen) >= modules_cfg.max_layers:
            skipped += 1
            continue
        chosen.append(Layer(len(chosen), label, module, type(module).__name__, output_kind(module)))
    return chosen, skipped


class HandleSet:
    """Base of the classes that own hook handles (in `self._handles`): removes them all at once."""

    _handles: list

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def handle_count(self) -> int:
        return len(self._handles)


class HookManager(HandleSet):
    """Registers and removes every hook; a hook that fails is counted and training goes on."""

    def __init__(self, layers: list[Layer], errors: ErrorCounter,
                 on_activation: Callable[[int, torch.Tensor, bool], None] | None,
                 on_output: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.layers = layers
        self.errors = errors
        self.on_activation = on_activation
        self.on_output = on_output
        self.active = True  # statistics are computed on this step
        self.overhead = 0.0  # seconds spent in hooks
        self._handles: list = []
        self._channels_first = False  # layout of the latest parametric layer's output
        self._optimizer: torch.optim.Optimizer | None = None
        self._owned_params: set[int] = set()

    # -- activations ----------------------------------------------------------------------------------
    def attach_forward(self) -> None:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))

    def _forward_hook(self, layer: Layer):
        sets_layout = next(layer.module.parameters(recurse=False), None) is not None
        layout = isinstance(layer.module, CHANNELS_FIRST)
        index, observe, watch, errors = layer.index, self.on_activation, self.on_output, self.errors

        def hook(module, inputs, output):
            if not self.active or _in_backward():
                return
            t0 = time.perf_counter()
            try:
                y = first_tensor(output)
                if y is not None:
                    if observe is not None:
                        observe(index, y, self._channels_first)
                    if watch is not None:
                        watch(index, y)
                if sets_layout or layout:
                    self._channels_first = layout
            except Exception as exc:  # never hurt the run
                errors.record("hook", exc)
            self.overhead += time.perf_counter() - t0

        return hook

    # -- optimizer step boundary ---------------------------------------------------------------------
    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter],
                         pre: Callable[[], None], post: Callable[[], None]) -> None:
        self._owned_params = {id(p) for p in params}

        def guarded(fn, name):
            def run(opt, args, kwargs):
                if not self._is_ours(opt):
                    return
                t0 = time.perf_counter()
                try:
                    fn()
                except Exception as exc:
                    self.errors.record(name, exc)
                self.overhead += time.perf_counter() - t0
            return run

        if optimizer is not None:
            self._optimizer = optimizer
            self._handles.append(optimizer.register_step_pre_hook(guarded(pre, "optimizer_pre_hook")))
            self._handles.append(optimizer.register_step_post_hook(guarded(post, "optimizer_post_hook")))
        else:
            from torch.optim.optimizer import (
                register_optimizer_step_post_hook,
                register_optimizer_step_pre_hook,
            )
            self._handles.append(register_optimizer_step_pre_hook(guarded(pre, "optimizer_pre_hook")))
            self._handles.append(register_optimizer_step_post_hook(guarded(post, "optimizer_post_hook")))

    def _is_ours(self, opt: torch.optim.Optimizer) -> bool:
        if self._optimizer is not None:
            return opt is self._optimizer
        if any(id(p) in self._owned_params for g in opt.param_groups for p in g["params"]):
            self._optimizer = opt  # lock on: one optimizer defines the step
            return True
        return False

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer
