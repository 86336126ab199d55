"""Shared by the trainer integrations: the trainer-signals plug-in (learning rate, where gradients are
read) and the step-boundary adapter for trainers whose optimizer pre-hook fires at the wrong moment."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..export.metrics import Metric
from ..hooks import unwrap_optimizer  # noqa: F401 - defined with the optimizer hooks, used by every integration

LEARNING_RATE = Metric("gradflow_learning_rate", "gauge",
                       "Learning rate of each optimizer parameter group at the last optimizer step, forwarded "
                       "by the trainer integration.", labels=("param_group",))
GRAD_NORM_BEFORE_CLIP = Metric("gradflow_grad_norm_before_clip", "gauge",
                               "Global gradient L2 norm before clipping as reported by the trainer (Hugging Face "
                               "logs it at each logging step).")
INTEGRATION_INFO = Metric("gradflow_integration_info", "info",
                          "The trainer integration, and when it reads gradients: before the optimizer step, after "
                          "unscaling, and before or after gradient clipping.",
                          labels=("framework", "framework_version", "grad_read_at", "clipping"))
MAX_PARAM_GROUPS = 32


class TrainerSignals:
    """Agent plug-in publishing what the trainer knows and the agent does not: learning rates, the
    trainer's pre-clipping gradient norm, and where gradients are read."""

    name = "trainer"
    metrics = (LEARNING_RATE, GRAD_NORM_BEFORE_CLIP, INTEGRATION_INFO)

    def __init__(self, framework: str, version: str, grad_read_at: str, clipping: str) -> None:
        self.info = {"framework": framework, "framework_version": version, "grad_read_at": grad_read_at,
                     "clipping": clipping}
        self.learning_rates: list[float] = []
        self.grad_norm_before_clip = float("nan")

    def record_lr(self, optimizer: Any) -> None:
        groups = getattr(optimizer, "param_groups", None) or []
        self.learning_rates = [_float(g.get("lr", float("nan"))) for g in groups[:MAX_PARAM_GROUPS]]

    def on_step(self, agent: Any) -> None:
        """Nothing per step: the integration records the values at the trainer's own hooks."""

    def collect(self) -> list[tuple[Metric, dict[str, str], float]]:
        rows: list[tuple[Metric, dict[str, str], float]] = [(INTEGRATION_INFO, dict(self.info), 1.0)]
        rows += [(LEARNING_RATE, {"param_group": str(i)}, lr) for i, lr in enumerate(self.learning_rates)
                 if math.isfinite(lr)]
        if math.isfinite(self.grad_norm_before_clip):
            rows.append((GRAD_NORM_BEFORE_CLIP, {}, self.grad_norm_before_clip))
        return rows

    def close(self) -> None:
        """Nothing held."""


def _float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0].item())
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


class InertOptimizer(torch.optim.Optimizer):
    """Handed to `attach()` when the integration marks step boundaries itself: its hooks are the agent's
    but it never steps, so the agent's own optimizer hooks never fire at the wrong moment."""

    def __init__(self, params: Any) -> None:
        super().__init__([p for p in params if p.requires_grad] or [torch.zeros(1, requires_grad=True)], {})

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never called
        raise RuntimeError("InertOptimizer never steps")


def read_gradients(agent: Any) -> None:
    """Record the gradients as they are now (the agent's optimizer-pre-hook action)."""
    agent.read_gradients()


def end_optimizer_step(agent: Any, loss: Any = None) -> None:
    """Mark the optimizer step as done (the agent's post-hook action), then record the loss."""
    agent.end_optimizer_step()
    agent.step(loss=loss)


class LossCollector:
    """Mean of the losses of an optimizer step's micro-batches, kept on the device (no sync)."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self.summed = False  # the losses are parts of one sum (HF with num_items_in_batch), not means

    def add(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()).float())
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self._losses.append(torch.tensor(float(loss)))

    def pop(self) -> torch.Tensor | None:
        if not self._losses:
            return None
        device = self._losses[0].device
        stacked = torch.stack([x.to(device) for x in self._losses])
        self._losses = []
        return stacked.sum() if self.summed else stacked.mean()


def loss_of(output: Any) -> Any:
    """The loss in a model / training_step output: a tensor, `.loss`, or `["loss"]`."""
    if isinstance(output, torch.Tensor):
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss
