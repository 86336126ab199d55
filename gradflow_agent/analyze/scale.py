"""gradient_scale: identity in the forward pass, gradient times `factor` in the backward pass.

The fix seed 004 applies to a compression layer whose gradients explode: damp the gradient that flows
back into the layers before it without changing what the network computes. factor = 0 stops the
gradient (like detach), factor = -1 reverses it (a gradient-reversal layer, as in domain-adversarial
training).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class GradientScale(torch.autograd.Function):
    """y = x; dL/dx = factor * dL/dy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = float(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def gradient_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x unchanged, its gradient multiplied by `factor` (see the module docstring)."""
    return GradientScale.apply(x, factor)


class ScaleGradient(nn.Module):
    """gradient_scale as a layer, for nn.Sequential."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gradient_scale(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"
