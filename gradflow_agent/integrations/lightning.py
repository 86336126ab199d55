"""Lightning integration: `GradflowLightningCallback` (works with `lightning` and `pytorch_lightning`).

    trainer = lightning.Trainer(callbacks=[GradflowLightningCallback(config={...}, dynamics={"interval": 100})])

When gradients are read: Lightning calls `optimizer.step(closure)` and runs forward, backward,
`on_before_optimizer_step` and clipping INSIDE the closure, i.e. inside the torch optimizer's step. A torch
optimizer step pre-hook would therefore fire before the closure and see the previous step's gradients
(with the default precision), so this callback attaches the agent to an inert optimizer and reads the
gradients itself in `on_before_optimizer_step`: once per optimizer step, after gradient accumulation,
after AMP unscaling, and BEFORE gradient clipping (`gradient_clip_val`). The step boundary (parameter
statistics, plug-ins, export) is marked in `on_train_batch_end` of the batch whose optimizer stepped,
after the update.

The loss forwarded is the step's training loss: the sum over its micro-batches of `outputs["loss"]`
(Lightning divides each by `accumulate_grad_batches`), or their mean under manual optimization. The
learning rate of each parameter group is read before the step. The agent's activation hooks are paused
during validation and sanity checks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import gradflow_agent

from .._optional import require
from ..dynamics import AnalysisConfig, attach_dynamics, running_dynamics
from ._common import (
    InertOptimizer,
    LossCollector,
    TrainerSignals,
    end_optimizer_step,
    loss_of,
    read_gradients,
    unwrap_optimizer,
)

pl = require(("lightning.pytorch", "pytorch_lightning"),  # the unified package first, the standalone one otherwise
             "lightning", "gradflow_agent.integrations.GradflowLightningCallback")
Callback = pl.Callback


class GradflowLightningCallback(Callback):
    """Attaches the gradflow agent at fit start and marks Lightning's optimizer steps for it."""

    def __init__(self, config: str | os.PathLike | Mapping[str, Any] | None = None, *,
                 dynamics: AnalysisConfig | Mapping[str, Any] | bool | None = None, probe_inputs: Any = None,
                 detach_at_end: bool = True) -> None:
        """`config`: the agent config (path or dict). `dynamics`: an AnalysisConfig/dict to run the
        training-dynamics plug-in (True = the agent config's `dynamics:` section). `probe_inputs`: a fixed
        batch for sparse quality (default: the latest call of the LightningModule itself)."""
        self.config = config
        self.dynamics = dynamics
        self.probe_inputs = probe_inputs
        self.detach_at_end = detach_at_end
        self.agent: Any = None
        self.signals: TrainerSignals | None = None
        self.dynamics_plugin = None
        self._losses = LossCollector()
        self._stepped = False
        self._pause = contextlib.ExitStack()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.agent is not None and not getattr(self.agent, "_closed", False):
            return  # fit() again without detaching: keep the agent
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self.agent = gradflow_agent.attach(pl_module, self.config, optimizer=InertOptimizer(pl_module.parameters()),
                                           scaler=scaler)
        clipping = "before_clipping" if trainer.gradient_clip_val else "no_clipping"
        self.signals = TrainerSignals("lightning", pl.__version__, "on_before_optimizer_step", clipping)
        self.agent.add_plugin(self.signals)
        self.dynamics_plugin = running_dynamics(self.agent)  # from the agent config's dynamics.enabled
        if self.dynamics_plugin is None and self.dynamics is not None and self.dynamics is not False:
            cfg = None if self.dynamics is True else self.dynamics
            self.dynamics_plugin = attach_dynamics(self.agent, cfg, inputs=self.probe_inputs)
        if self.dynamics_plugin is not None:
            optimizers = getattr(trainer, "optimizers", None) or []
            self.dynamics_plugin.optimizer = unwrap_optimizer(optimizers[0]) if optimizers else None
        self._losses.summed = bool(getattr(pl_module, "automatic_optimization", True))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.agent is None:
            return
        read_gradients(self.agent)
        self.signals.record_lr(unwrap_optimizer(optimizer) or optimizer)
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.agent is None:
            return
        self._losses.add(loss_of(outputs))
        if self._stepped:
            self._stepped = False
            end_optimizer_step(self.agent, self._losses.pop())

    # -- validation forwards are not training forwards ------------------------------------------------------
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.agent is not None:
            self._pause.enter_context(self.agent.paused())

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._pause.close()

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self.on_validation_start(trainer, pl_module)

    def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
        self._pause.close()

    # -- end ------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._pause.close()
        if self.agent is not None and self.detach_at_end:
            self.agent.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)
