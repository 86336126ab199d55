"""Small custom modules to try `gradflow-agent init-check` on (see docs/init-check.md).

Run from the repository root so that `examples.initcheck_custom_module` is importable, e.g.

    gradflow-agent init-check analyze examples.initcheck_custom_module@ReluMLP \
        --input-shape 4,16 --module-kwargs in_features=16 hidden=32 out_features=16 --device cpu
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ReluMLP(nn.Sequential):
    """Linear -> ReLU -> ... -> Linear. A Sequential, so its Lipschitz weight bound is a true upper bound."""

    def __init__(
        self,
        in_features: int = 16,
        hidden: int = 32,
        out_features: int = 16,
        depth: int = 2,
        init: str = "default",
    ) -> None:
        sizes = [in_features] + [hidden] * (depth - 1) + [out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers.append(nn.Linear(a, b))
            if i < depth - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        if init == "orthogonal":
            for m in self:
                if isinstance(m, nn.Linear):
                    nn.init.orthogonal_(m.weight)
                    nn.init.zeros_(m.bias)
        elif init != "default":
            raise ValueError(f"init must be 'default' or 'orthogonal', got {init!r}")


class SymbolMixer(nn.Module):
    """Two inputs, as in the seed's `x:2,16,64 symbols:2,16,64` example: x plus a codebook read by symbols.

    `symbols` are soft symbol embeddings; they attend over `n_symbols` learned codes, and the result is
    projected and added to `x` (a residual block).
    """

    def __init__(self, dim: int = 64, n_symbols: int = 100) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(n_symbols, dim) / math.sqrt(dim))
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
        attn = torch.softmax(symbols @ self.codebook.t() / math.sqrt(x.shape[-1]), dim=-1)
        return self.norm(x + self.proj(attn @ self.codebook))


class FourierMixer(nn.Module):
    """FNet-style token mixing: real part of a 2-D FFT, then a feed-forward layer.

    torch has no float16/bfloat16 FFT on the CPU, so `--dtype float16 --device cpu` is refused with a
    one-line error: an example of a dtype the device cannot run.
    """

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + torch.fft.fft2(x).real)
        return self.norm2(x + self.ff(x))


class LowRankLinear(nn.Module):
    """A Linear layer whose weight is initialised as a rank-`rank` product: what the rank analysis flags."""

    def __init__(self, in_features: int = 16, out_features: int = 16, rank: int = 2) -> None:
        super().__init__()
        a = torch.randn(out_features, rank) / math.sqrt(rank)
        b = torch.randn(rank, in_features) / math.sqrt(in_features)
        self.weight = nn.Parameter(a @ b)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)
