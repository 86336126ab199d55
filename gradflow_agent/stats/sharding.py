"""Sharded parameters (FSDP2 `fully_shard`, DTensor tensor parallelism): statistics of the whole tensor.

A DTensor parameter's gradient and weights are split over the ranks of its device mesh, so each rank
sees a shard. Norms are not additive, squares are: every statistic is computed from the local shard as a
sum of squares (or a count), and the sums are added over the shard group once per snapshot, in one
collective per distinct (mesh, dims) - never per layer or per step. Replicated tensors (DDP, plain
parameters) are already whole on every rank and are never reduced.

The collective runs inside the snapshot, on the training thread, and only at snapshot steps every rank
agrees on (see `Agent._due`), so every rank of the group arrives.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch


def is_dtensor(t: object) -> bool:
    """A DTensor exists only once torch.distributed.tensor was imported (by FSDP2 or the user): never
    import it here (0.5 s at `import gradflow_agent` otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (the tensor itself unless it is a DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def _groups(p: torch.Tensor) -> tuple | None:
    """The process groups a DTensor's shard sums must be added over (None: nothing to add)."""
    if not is_dtensor(p):
        return None
    mesh = p.device_mesh
    # every mesh dimension the tensor is not replicated over: Shard, Partial, and FSDP2-over-TP's
    # _StridedShard (whose is_shard() is False in torch 2.13, and which is no Shard subclass)
    dims = [d for d, placement in enumerate(p.placements) if not placement.is_replicate()]
    if not dims:
        return None
    return tuple(mesh.get_group(d) if mesh.ndim > 1 else mesh.get_group() for d in dims)


class ShardSums:
    """Adds per-parameter columns of sharded parameters over their shard groups, in few collectives."""

    def __init__(self, params: Sequence[torch.Tensor], device: torch.device) -> None:
        plans: dict[tuple, list[int]] = {}
        for k, p in enumerate(params):
            groups = _groups(p)
            if groups is not None:
                plans.setdefault(groups, []).append(k)
        self.plans = [(groups, torch.tensor(cols, dtype=torch.long, device=device)) for groups, cols in plans.items()]
        mask = torch.zeros(len(params), dtype=torch.bool, device=device)
        for _, cols in self.plans:
            mask[cols] = True
        self.mask = mask  # sharded parameters
        self.any = bool(self.plans)

    def reduce_columns(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (..., P) with the columns of sharded parameters summed over their groups (a new tensor)."""
        if not self.any:
            return t
        import torch.distributed as dist
        out = t.clone()
        for groups, cols in self.plans:
            part = out.index_select(-1, cols).contiguous()
            for group in groups:
                dist.all_reduce(part, group=group)
            out.index_copy_(-1, cols, part)
        return out


def identical_across_ranks(sharded: bool, per_rank: str) -> bool:
    """Do all ranks hold the same layers, so that their statistics can be combined and exported once?
    `per_rank: false` says so; `auto` knows it for sharded (FSDP2/DTensor) runs. Under DDP the agent
    cannot tell data parallelism from a pipeline whose ranks hold different layers: set `false` there."""
    return per_rank == "false" or (per_rank == "auto" and sharded)


def world_size() -> int:
    """Processes of the job (1 outside torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
