"""Input tensors drawn from the distributions the operator-norm analysis probes.

All draws use an explicit `torch.Generator` on the analysis device so that runs are reproducible
and nothing touches the global RNG between analyses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .spec import Shape

SPARSE_DENSITY = 0.1  # fraction of non-zero entries in "sparse" inputs
LARGE_SCALE = 100.0
SMALL_SCALE = 0.01
CORRELATION = 0.9  # correlation between any two features of a "correlated" input


def _normal(shape: Shape, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device)


def _sparse(shape: Shape, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    values = torch.randn(shape, generator=gen, device=device)
    mask = torch.rand(shape, generator=gen, device=device) < SPARSE_DENSITY
    if not bool(mask.any()):  # tiny shapes: keep at least one entry so that ||x|| > 0
        mask.view(-1)[0] = True
    return values * mask


def _large(shape: Shape, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return LARGE_SCALE * torch.randn(shape, generator=gen, device=device)


def _small(shape: Shape, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return SMALL_SCALE * torch.randn(shape, generator=gen, device=device)


def _correlated(shape: Shape, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Unit-variance features sharing one common factor along the last dimension."""
    common = torch.randn((*shape[:-1], 1), generator=gen, device=device)
    noise = torch.randn(shape, generator=gen, device=device)
    return CORRELATION**0.5 * common + (1.0 - CORRELATION) ** 0.5 * noise


DISTRIBUTIONS: dict[str, Callable[[Shape, torch.Generator, torch.device], torch.Tensor]] = {
    "normal": _normal,
    "sparse": _sparse,
    "large_magnitude": _large,
    "small_magnitude": _small,
    "correlated": _correlated,
}


def draw(
    shapes: dict[str, Shape],
    distribution: str,
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """One tensor per named input, drawn in float32 and then cast (half types have no randn on CPU)."""
    fn = DISTRIBUTIONS[distribution]
    return {name: fn(shape, gen, device).to(dtype) for name, shape in shapes.items()}
