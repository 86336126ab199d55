"""Hugging Face `transformers.Trainer` integration: `GradflowCallback`.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GradflowCallback(config={"exporters": {...}}, dynamics={"interval": 100})])

When gradients are read: the Trainer clips (`max_grad_norm`, after accelerate has unscaled fp16
gradients), calls `on_pre_optimizer_step`, then `optimizer.step()`. The agent reads the gradients in the
step pre-hook of the torch optimizer inside accelerate's wrapper, i.e. after accumulation, after
unscaling and AFTER clipping: per-layer pressure and `gradflow_grad_norm` are post-clipping values. The
Trainer's own pre-clipping norm is republished as `gradflow_grad_norm_before_clip` at each logging step.
Set `max_grad_norm=0` to read unclipped gradients. A step the fp16 scaler skips (inf/NaN) never reaches
the torch optimizer and is counted in `gradflow_optimizer_steps_skipped_total`.

The loss forwarded to `agent.step(loss=)` is the training loss of each optimizer step as the Trainer
logs it, taken from the model's outputs (`outputs.loss`) of the step's micro-batches: their sum when the
Trainer normalised them by `num_items_in_batch`, else their mean; models that return no loss fall back
to the Trainer's logged loss. The learning rate of each parameter group is read before the step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch

import gradflow_agent

from .._optional import require
from ..dynamics import AnalysisConfig, attach_dynamics, running_dynamics
from ._common import LossCollector, TrainerSignals, loss_of, unwrap_optimizer

TrainerCallback = require("transformers", "hf", "gradflow_agent.integrations.GradflowCallback").TrainerCallback


class GradflowCallback(TrainerCallback):
    """Attaches the gradflow agent at train begin and feeds it the Trainer's step boundaries."""

    def __init__(self, config: str | os.PathLike | Mapping[str, Any] | None = None, *,
                 dynamics: AnalysisConfig | Mapping[str, Any] | bool | None = None, probe_inputs: Any = None,
                 agent: Any = None, detach_at_end: bool = True) -> None:
        """`config`: the agent config (path or dict). `dynamics`: an AnalysisConfig/dict to run the
        training-dynamics plug-in (True = the agent config's `dynamics:` section). `probe_inputs`: a fixed
        batch for sparse quality (default: the step's latest batch). `agent`: an agent attached already."""
        self.config = config
        self.dynamics = dynamics
        self.probe_inputs = probe_inputs
        self.agent = agent
        self.detach_at_end = detach_at_end
        self.signals: TrainerSignals | None = None
        self.dynamics_plugin = None
        self._losses = LossCollector()
        self._logged_loss: float | None = None
        self._model_gives_loss = False
        self._handle = None
        self._owns_agent = agent is None

    # -- lifecycle --------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        torch_opt = unwrap_optimizer(optimizer)
        if self.agent is None or (self._owns_agent and getattr(self.agent, "_closed", False)):  # a new train()
            self.agent = gradflow_agent.attach(model, self.config, optimizer=torch_opt,
                                               scaler=getattr(optimizer, "scaler", None))
        import transformers

        clipping = "after_clipping" if args.max_grad_norm and args.max_grad_norm > 0 else "no_clipping"
        self.signals = TrainerSignals("transformers", transformers.__version__, "optimizer_step_pre_hook", clipping)
        self.agent.add_plugin(self.signals)
        self.dynamics_plugin = running_dynamics(self.agent)  # from the agent config's dynamics.enabled
        if self.dynamics_plugin is None and self.dynamics is not None and self.dynamics is not False:
            cfg = None if self.dynamics is True else self.dynamics
            self.dynamics_plugin = attach_dynamics(self.agent, cfg, inputs=self.probe_inputs)
        from ..hooks import add_module_hook  # deepcopy/torch.save of the model never carry it
        self._handle = add_module_hook(self.agent.model, self._on_forward, with_kwargs=True)

    def _on_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):  # evaluation, or the dynamics analysis
            return
        loss = loss_of(output) if not isinstance(output, torch.Tensor) else None
        if loss is not None:
            self._model_gives_loss = True
            self._losses.summed = kwargs.get("num_items_in_batch") is not None
            self._losses.add(loss)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        if self.signals is not None:
            self.signals.record_lr(unwrap_optimizer(optimizer) or optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.agent is None:
            return
        loss = self._losses.pop()
        if loss is None and self._logged_loss is not None:
            loss, self._logged_loss = self._logged_loss, None
        self.agent.step(loss=loss)

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not logs:
            return
        if "grad_norm" in logs and self.signals is not None:
            with contextlib.suppress(TypeError, ValueError):
                self.signals.grad_norm_before_clip = float(logs["grad_norm"])
        if not self._model_gives_loss and "loss" in logs:
            with contextlib.suppress(TypeError, ValueError):
                self._logged_loss = float(logs["loss"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.agent is not None and self.detach_at_end and self._owns_agent:
            self.agent.detach()
