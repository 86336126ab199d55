"""Gradient flowing through each layer's output (opt-in: `stats.gradients.output_grads`).

Read with `Tensor.register_hook` on the output inside the forward hook - the safe way: full backward
module hooks break when an in-place op (ReLU(inplace=True), `out += x`) follows the module. This sees
parameterless layers (activations, norms without affine, pooling) that parameter gradients cannot.
One reading per backward pass through the layer (per micro-batch), unlike the optimizer-step readings.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine import device_index


class OutputGradStats:
    def __init__(self, n_layers: int, device: torch.device) -> None:
        self.device = device
        self.on_host = device.type == "cpu"
        self.sum = np.zeros(n_layers)
        self.count = np.zeros(n_layers)
        self._pending: list[torch.Tensor] = []
        self._pending_idx: list[int] = []
        self.acc = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self._last = np.full(n_layers, np.nan)

    def watch(self, i: int, y: torch.Tensor) -> None:
        """Register a one-shot hook on this output tensor (called from the forward hook)."""
        if y.requires_grad and torch.is_grad_enabled():
            y.register_hook(lambda grad: self._record(i, grad))

    def _record(self, i: int, grad: torch.Tensor) -> None:
        norm = torch.linalg.vector_norm(torch.nan_to_num(grad.detach(), nan=0.0, posinf=0.0, neginf=0.0),
                                        dtype=torch.float32)
        if self.on_host:
            self.sum[i] += norm.item()
        else:
            self._pending.append(norm)
            self._pending_idx.append(i)
        self.count[i] += 1

    def device_parts(self) -> list[torch.Tensor]:
        if self._pending:
            idx = device_index(self._pending_idx, self.device)
            self.acc.index_add_(0, idx, torch.stack(self._pending).double())
            self._pending, self._pending_idx = [], []
        return [self.acc]

    def finish(self, host: list[np.ndarray]) -> dict[str, np.ndarray]:
        total = host[0] + self.sum
        with np.errstate(invalid="ignore", divide="ignore"):
            self._last = np.where(self.count > 0, total / np.maximum(self.count, 1), self._last)
        self.acc.zero_()
        self.sum[:] = 0
        self.count[:] = 0
        return {"output_grad_norm": self._last.copy()}
