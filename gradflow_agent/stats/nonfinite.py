"""Where and when non-finite values started: the first (step, layer, tensor) that held a NaN/Inf.

One NaN spreads to every layer within a step or two (forward to the outputs, backward to the inputs,
the update to the weights), so cumulative per-layer counts name the wrong layer. The statistics report
each non-finite event here in the order it happens - a step's forward outputs in call order, then its
gradients in backward order (deepest layer first), then the weights after its update - and only the
first is kept. On an accelerator the choice is made with device ops (no sync); on the CPU directly.
"""

from __future__ import annotations

import numpy as np
import torch

TENSORS = ("activation", "grad", "param")


class NonfiniteOrigin:
    def __init__(self, device: torch.device, on_host: bool | None = None) -> None:
        """`on_host=False` forces the accelerator path (tests run it on the CPU)."""
        self.device = device
        self.on_host = device.type == "cpu" if on_host is None else on_host
        self._host: tuple[int, int, int] | None = None
        self._dev = None if self.on_host else torch.full((3,), -1.0, dtype=torch.float64, device=device)
        # on an accelerator the step and the tensor codes live on the device: no host->device copy per note
        self._step_dev = None if self.on_host else torch.zeros((), dtype=torch.float64, device=device)
        self._codes = None if self.on_host else torch.arange(len(TENSORS), dtype=torch.float64, device=device)
        self.step = 1  # the step being computed; the agent moves it at each boundary

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = value
        if self._step_dev is not None:
            self._step_dev.fill_(value)

    def note_host(self, layer: int, tensor: int) -> None:
        """A non-finite value in `layer` (a plain index), found on the host."""
        if self._host is None:
            self._host = (self.step, layer, tensor)

    def note(self, layers: torch.Tensor, counts: torch.Tensor, tensor: int, last: bool = False) -> None:
        """Entries `layers[k]` with `counts[k]` non-finite values, in the order they were computed;
        `last` picks the last entry (backward order runs from the deepest layer)."""
        if self._host is not None:
            return
        mask = counts > 0
        if self.on_host:
            positions = torch.nonzero(mask).flatten().tolist()
            if positions:
                self.note_host(int(layers[positions[-1] if last else positions[0]]), tensor)
            return
        order = mask.flip(0) if last else mask
        pos = order.to(torch.int32).argmax()
        if last:
            pos = mask.numel() - 1 - pos
        candidate = torch.stack([self._step_dev, layers[pos].double(), self._codes[tensor]])
        take = (self._dev[0] < 0) & mask.any()
        self._dev.copy_(torch.where(take, candidate, self._dev))

    def device_parts(self) -> list[torch.Tensor]:
        return [] if self._dev is None else [self._dev]

    def finish(self, host: list[np.ndarray]) -> tuple[int, int, str] | None:
        """(step, layer index, tensor) of the first non-finite value, or None."""
        if self._host is None and host and host[0][0] >= 0:
            self._host = (int(host[0][0]), int(host[0][1]), int(host[0][2]))
        if self._host is None:
            return None
        step, layer, tensor = self._host
        return step, layer, TENSORS[tensor]
