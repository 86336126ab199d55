"""What a module's output means: which statistics apply to it, decided once per layer at attach time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Units of these outputs "fire" when positive: track units that never fire (dead units).
RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
               nn.SiLU, nn.Mish)
# Outputs that are exactly zero by design for part of their domain: their zero ratio is measured.
ZERO_PRODUCING = (nn.ReLU, nn.ReLU6, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.modules.dropout._DropoutNd)
# Layers whose outputs are laid out channels-first (N, C, ...): a following activation's unit is dim 1.
CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
                  nn.modules.pooling._AvgPoolNd)


@dataclass(frozen=True)
class OutputKind:
    """Static facts about a layer's output used by the reductions."""

    relu_family: bool = False
    has_zeros: bool = False  # exact zeros are meaningful (ReLU-like): measure the zero ratio
    bounds: tuple[float, float] | None = None  # bounded activation: (low, high)
    softmax_dim: int | None = None  # softmax: saturation is judged per row along this dim

    @property
    def bounded(self) -> bool:
        return self.bounds is not None or self.softmax_dim is not None


def output_kind(module: nn.Module) -> OutputKind:
    relu = isinstance(module, RELU_FAMILY)
    zeros = isinstance(module, ZERO_PRODUCING)
    if isinstance(module, (nn.Softmax, nn.Softmin)):
        return OutputKind(softmax_dim=-1 if module.dim is None else module.dim)
    if isinstance(module, nn.Hardtanh):  # includes ReLU6 (0, 6)
        return OutputKind(relu_family=relu, has_zeros=zeros,
                          bounds=(float(module.min_val), float(module.max_val)))
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return OutputKind(bounds=(-1.0, 1.0))
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return OutputKind(bounds=(0.0, 1.0))
    return OutputKind(relu_family=relu, has_zeros=zeros)


def first_tensor(output: object) -> torch.Tensor | None:
    """The tensor a module produced: the output itself, or the first tensor of a tuple (LSTM, MHA)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None
