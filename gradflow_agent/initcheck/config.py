"""`AnalysisConfig`: what to run, on which inputs, and the healthy ranges results are judged against.

The healthy ranges default to the table of the layer-analysis output documentation (seed 001); they
live in one `HealthyRanges` object so that the console, JSON, Markdown and notebook all judge alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import DtypeError, InitCheckError
from .spec import Shape, normalize_shapes

DTYPES = ("float32", "float16", "bfloat16")
LOSS_FNS = ("sum", "mse_random", "reconstruction", "variance")
DISTRIBUTIONS = ("normal", "sparse", "large_magnitude", "small_magnitude", "correlated")


@dataclass(frozen=True)
class HealthyRanges:
    """Thresholds from the 'Interpreting Results' table; a value outside its range fails the check."""

    operator_norm: tuple[float, float] = (0.5, 2.0)  # ||f(x)|| / ||x||
    condition_number_max: float = 1000.0  # sigma_max / sigma_min
    rank_ratio_min: float = 0.9  # healthy above 90 %
    rank_ratio_low: float = 0.5  # below 50 %: "low rank"
    gradient_ratio: tuple[float, float] = (0.1, 10.0)  # between consecutive layers
    dead_fraction_max: float = 0.5  # healthy below 50 % zeros
    dead_fraction_error: float = 0.9  # above 90 %: dead ReLU, an error
    lipschitz_max: float = 2.0  # "~1.0"; the top of the operator-norm range is the limit we accept
    vanishing_grad_norm: float = 1e-7  # a parameter gradient norm below this counts as vanishing
    skewness_max: float = 1.0  # |skewness| of an initialised weight
    excess_kurtosis_max: float = 3.0  # heavier tails than this are unusual for an init
    large_weight: float = 1e4  # |w| above this is "extremely large"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class AnalysisConfig:
    """Inputs, device and per-analysis switches for one run (the `run_*` flags turn analyses off)."""

    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] = field(default_factory=lambda: {"x": (2, 16)})
    device: str = "cuda"
    dtype: str = "float32"
    n_samples: int = 50
    loss_fns: Sequence[str] = ("reconstruction",)
    seed: int = 0
    power_iterations: int = 30
    run_parameter_norms: bool = True
    run_operator_norm: bool = True
    run_gradient_analysis: bool = True
    run_spectral_analysis: bool = True
    run_rank_analysis: bool = True
    run_lipschitz: bool = True
    run_activation_stats: bool = True
    run_gradient_ratios: bool = True
    run_numerical_precision: bool = True
    run_weight_distribution: bool = True
    ranges: HealthyRanges = field(default_factory=HealthyRanges)
    progress: bool | None = None  # None: a bar on stderr only when it is a terminal
    quiet: bool = False  # no progress bar, no device notice
    debug: bool = False  # print the traceback of an analysis that fails (the run still goes on)

    def __post_init__(self) -> None:
        self.input_shapes = normalize_shapes(self.input_shapes)
        if isinstance(self.loss_fns, str):
            self.loss_fns = (self.loss_fns,)
        self.loss_fns = tuple(self.loss_fns) or ("reconstruction",)
        unknown = [name for name in self.loss_fns if name not in LOSS_FNS]
        if unknown:
            raise InitCheckError(f"unknown loss function {unknown[0]!r}: choose from {', '.join(LOSS_FNS)}")
        if self.dtype not in DTYPES:
            raise DtypeError(f"unknown dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if int(self.n_samples) < 1:
            raise InitCheckError(f"--n-samples must be at least 1, got {self.n_samples}")
        if int(self.power_iterations) < 1:
            raise InitCheckError(f"power_iterations must be at least 1, got {self.power_iterations}")
        self.n_samples = int(self.n_samples)

    @property
    def shapes(self) -> dict[str, Shape]:
        """The validated input shapes (normalised in __post_init__)."""
        return dict(self.input_shapes)  # type: ignore[arg-type]

    def enabled(self, switch: str) -> bool:
        return bool(getattr(self, switch))
