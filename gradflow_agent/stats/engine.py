"""One host transfer per snapshot: every device buffer is concatenated and copied back at once."""

from __future__ import annotations

import numpy as np
import torch


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
