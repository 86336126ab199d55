"""How long this rank's forward pass takes: the straggler signal that survives lockstep.

Under DDP or FSDP every rank's step takes the same wall time (the fast ranks wait for the slow one in
the gradient collectives), so step time cannot name a straggler. The forward pass holds no collective
the others wait in, so its duration differs per rank: a rank that is 40 ms slower in its forward shows
40 ms more here. Host time on the CPU; on an accelerator a pair of timing events around the last
forward of the interval (recorded without a sync, read at the snapshot, which synchronises anyway).
Forward passes run under torch.compile, in evaluation (no grad) or re-run by activation
checkpointing are not timed; nor, while the activation hooks idle between measured steps, are those
steps' forwards (the clock idles with them: the interval's mean is over the measured steps).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..hooks import add_module_hook, in_backward


class ForwardClock:
    """Times the model's forward passes through two hooks on the root module."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self._cuda = device.type == "cuda" and torch.cuda.is_available()
        self._t0: float | None = None
        self._total = 0.0
        self._count = 0
        self._events: tuple | None = None
        self._pending = False
        self._last = math.nan  # an interval without a timed forward keeps the last value (no gaps)
        self._handles = [add_module_hook(model, self._start, pre=True),
                         add_module_hook(model, self._stop, always_call=True)]

    def idle_with(self, hooks, model: nn.Module) -> None:
        """Time only the measured steps' forwards: the two hooks come off with the layer hooks (a sample
        of the forwards, and no slow call path of the root module on the other steps)."""
        hooks.idle_with(model, self._handles[0], self._start, pre=True)
        hooks.idle_with(model, self._handles[1], self._stop)

    def _timed(self) -> bool:
        return not torch.compiler.is_compiling() and torch.is_grad_enabled() and not in_backward()

    def _start(self, module: nn.Module, inputs: tuple) -> None:
        if not self._timed():
            return
        self._t0 = time.perf_counter()
        if self._cuda:
            if self._events is None:
                self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()

    def _stop(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not self._timed() or self._t0 is None:
            return
        if self._cuda and self._events is not None:
            self._events[1].record()
            self._pending = True
        else:
            self._total += time.perf_counter() - self._t0
            self._count += 1
        self._t0 = None

    def take(self) -> float:
        """Mean seconds per forward since the last call (the previous value when none was timed, NaN
        before the first); resets the interval. Called at the snapshot, after its device synchronisation."""
        if self._cuda:
            if self._pending and self._events is not None:
                self._pending = False
                self._events[1].synchronize()  # already complete: the snapshot's transfer synchronised
                self._last = self._events[0].elapsed_time(self._events[1]) / 1e3
            return self._last
        if self._count:
            self._last = self._total / self._count
            self._total, self._count = 0.0, 0
        return self._last

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
