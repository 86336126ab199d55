"""Scalar losses used to drive a backward pass through the module at initialization.

Each takes the module's primary output and its inputs and returns a float32 scalar (half-precision
outputs are upcast before reducing so the loss itself never overflows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor], torch.Generator], torch.Tensor]


def loss_sum(out: torch.Tensor, inputs: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Sum of outputs: every output unit gets gradient 1."""
    return out.float().sum()


def loss_mse_random(out: torch.Tensor, inputs: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """MSE against a standard-normal target of the output's shape (a fixed 'regression' task)."""
    target = torch.randn(out.shape, generator=gen, device=out.device)
    return F.mse_loss(out.float(), target)


def reconstruction_target(out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    """The first input, shaped like the output where that is possible, and how it was matched.

    Same shape: the input itself. Only the last dimension differs: the input truncated or zero-padded
    along it. Anything else: a zero target, so the loss becomes the mean square of the output.
    """
    x = next(iter(inputs.values())).detach().float()
    if x.shape == out.shape:
        return x, "input"
    if x.dim() == out.dim() and x.shape[:-1] == out.shape[:-1]:
        width = out.shape[-1]
        if x.shape[-1] >= width:
            return x[..., :width], "input truncated along the last dimension"
        return F.pad(x, (0, width - x.shape[-1])), "input zero-padded along the last dimension"
    return torch.zeros(out.shape, device=out.device), "zero target (output and input shapes differ)"


def loss_reconstruction(
    out: torch.Tensor, inputs: dict[str, torch.Tensor], gen: torch.Generator
) -> torch.Tensor:
    """MSE between output and input: how far the module is from the identity map."""
    target, _ = reconstruction_target(out, inputs)
    return F.mse_loss(out.float(), target)


def loss_variance(out: torch.Tensor, inputs: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Variance of the outputs: sensitive to scale, blind to a constant shift."""
    flat = out.float().reshape(-1)
    if flat.numel() < 2:
        return flat.pow(2).sum()
    return flat.var()


LOSSES: dict[str, LossFn] = {
    "sum": loss_sum,
    "mse_random": loss_mse_random,
    "reconstruction": loss_reconstruction,
    "variance": loss_variance,
}
