"""One host transfer per snapshot: every device buffer is concatenated and copied back at once."""

from __future__ import annotations

import numpy as np
import torch


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
