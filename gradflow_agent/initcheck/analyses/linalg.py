"""Pure math on weight tensors: matrix views, singular values, ranks and moments.

Everything is computed in float64 (half-precision linear algebra is not implemented on every device)
and on the tensor's own device when that device supports float64, on the CPU otherwise.
"""

from __future__ import annotations

import math

import torch


def _float64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    try:
        return t.to(torch.float64)
    except (RuntimeError, TypeError):  # devices without float64 (e.g. MPS)
        return t.cpu().to(torch.float64)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A 2-D float64 view: (out, in * kernel...) for weights of any rank >= 2, (1, n) for vectors."""
    t64 = _float64(t)
    if t64.dim() == 0:
        return t64.reshape(1, 1)
    if t64.dim() == 1:
        return t64.reshape(1, -1)
    return t64.reshape(t64.shape[0], -1)


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def singular_values(t: torch.Tensor) -> torch.Tensor:
    """Singular values of the matrix view, in descending order (float64)."""
    return torch.linalg.svdvals(as_matrix(t))


def frobenius_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(_float64(t)))


def operator_norm(t: torch.Tensor) -> float:
    """Largest singular value for rank >= 2; the Frobenius (L2) norm for vectors; |t| for scalars."""
    if t.dim() < 2:
        return frobenius_norm(t)
    return float(singular_values(t)[0])


def rank_tolerance(svals: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """The numpy/LAPACK `matrix_rank` tolerance: sigma_max * max(m, n) * eps of the storage dtype.

    Singular values below it cannot be told apart from rounding noise of the stored weights.
    """
    if svals.numel() == 0:
        return 0.0
    rows = shape[0]
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return float(svals[0]) * max(rows, cols) * eps


def effective_rank(svals: torch.Tensor, tol: float) -> int:
    """Number of singular values above the tolerance."""
    return int((svals > tol).sum())


def entropy_effective_rank(svals: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = s / sum(s): a smooth companion to the count."""
    total = float(svals.sum())
    if total <= 0:
        return 0.0
    p = svals / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def condition_number(svals: torch.Tensor) -> float:
    """sigma_max / sigma_min over the min(m, n) singular values; inf for a singular matrix."""
    if svals.numel() == 0:
        return math.nan
    smin = float(svals[-1])
    return math.inf if smin == 0.0 else float(svals[0]) / smin


def moments(t: torch.Tensor) -> dict[str, float | None]:
    """Mean, std (population), skewness and excess kurtosis (Fisher; 0 for a Gaussian).

    Skewness and kurtosis use the biased estimators (scipy.stats defaults); they are None for a
    constant tensor, where they are undefined.
    """
    x = _float64(t).reshape(-1)
    n = x.numel()
    mean = float(x.mean()) if n else math.nan
    centered = x - mean
    m2 = float((centered**2).mean()) if n else math.nan
    std = math.sqrt(m2) if n else math.nan
    scale = max(abs(mean), float(x.abs().max()) if n else 0.0)
    if n < 2 or m2 <= (1e-12 * scale) ** 2 or m2 == 0.0:
        return {"mean": mean, "std": std, "skewness": None, "kurtosis": None}
    m3 = float((centered**3).mean())
    m4 = float((centered**4).mean())
    return {"mean": mean, "std": std, "skewness": m3 / m2**1.5, "kurtosis": m4 / m2**2 - 3.0}
