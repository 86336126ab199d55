"""One host transfer per snapshot: every device buffer is concatenated and copied back at once."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_NUMPY_FLOATS = (torch.float32, torch.float64)


def as_numpy(t: torch.Tensor) -> np.ndarray | None:
    """A float32/float64 CPU tensor as a numpy array on the same memory (numpy reduces small tensors
    several times faster than torch's per-op dispatch); None for anything else - half precision, a
    subclass, a tensor that requires grad, an unusual view - which torch then reduces."""
    if t.dtype not in _NUMPY_FLOATS or type(t) is not torch.Tensor or t.device.type != "cpu":
        return None
    try:
        return t.numpy()
    except (RuntimeError, TypeError):  # requires grad, negative-bit or otherwise unusual views
        return None


class _IndexCache:
    """Device index tensors, created once per (indices, device): a host list turned into a device tensor
    is a blocking host->device copy (a synchronisation under `torch.cuda.set_sync_debug_mode`), so the
    hot path reuses the tensor instead of making one per call."""

    LIMIT = 256

    def __init__(self) -> None:
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, idx, device: torch.device) -> torch.Tensor:
        key = (tuple(idx), device)
        t = self._cache.get(key)
        if t is None:
            if len(self._cache) >= self.LIMIT:
                self._cache.clear()
            t = self._cache[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        return t


device_index = _IndexCache()


class LaggedFlag:
    """A device boolean read without a synchronisation: on CUDA each pushed flag is copied back without
    blocking into pinned memory, and read once its event says the copy landed (`seen`, at a later
    call); on the CPU it is read at once (free there). Other accelerators are never read here: their
    flags are left to the snapshot, which synchronises anyway."""

    MAX_PENDING = 64

    def __init__(self) -> None:
        self._landing: list[tuple[torch.Tensor, Any]] = []  # (pinned host flag, event after its copy)
        self._seen = False

    def push(self, flag: torch.Tensor) -> None:
        if self._seen:
            return
        if flag.device.type == "cpu":
            self._seen = bool(flag)
        elif flag.device.type == "cuda" and len(self._landing) < self.MAX_PENDING:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(flag.device))
            self._landing.append((host, event))

    def seen(self) -> bool:
        """Was any pushed flag true (of those whose copy has landed)?"""
        while not self._seen and self._landing and self._landing[0][1].query():
            self._seen = bool(self._landing.pop(0)[0])
        return self._seen

    def reset(self) -> None:
        self._landing.clear()
        self._seen = False


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's statistics live: the device of its first parameter (or buffer), else the CPU."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def transfer(groups: list[list[torch.Tensor]], device: torch.device) -> list[list[np.ndarray]]:
    """Copy lists of device tensors to numpy with a single device->host transfer (the only sync)."""
    flat = [t.reshape(-1).double() for parts in groups for t in parts]
    sizes = [t.numel() for t in flat]
    host = torch.cat(flat).cpu().numpy() if flat else np.zeros(0)
    out, k, pos = [], 0, 0
    for parts in groups:
        arrays = []
        for _ in parts:
            arrays.append(host[pos:pos + sizes[k]])
            pos += sizes[k]
            k += 1
        out.append(arrays)
    return out
