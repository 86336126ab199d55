"""`AnalysisConfig`: the settings of the training-dynamics analysis (the `dynamics:` config section).

The field names and defaults are those of seed 002's `AnalysisConfig`; the fields after
`momentum_enabled` are additions of this package (cardinality caps, streaming chunk size, the plug-in's
input capture). `AnalysisConfig.from_mapping(agent.config.dynamics)` reads the YAML section.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

SNAPSHOT_DTYPES = ("float32", "float16", "bfloat16", "native")
DEFAULT_THRESHOLDS = (1e-8, 1e-6, 1e-4)


def _thresholds(key: str, value: Iterable[Any]) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"dynamics: '{key}' must be a list of numbers, got {value!r}")
    out = []
    for v in value:
        try:
            t = float(v)  # YAML may hand over "1e-8" (no dot) as a string
        except (TypeError, ValueError):
            raise ValueError(f"dynamics: '{key}' must hold numbers, got {v!r}") from None
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"dynamics: '{key}' values must be finite and >= 0, got {v!r}")
        out.append(t)
    return tuple(sorted(set(out)))


def is_device_spec(value: str) -> bool:
    """'model' (keep the snapshot next to each parameter) or a torch device string ('cpu', 'cuda:1')."""
    if value == "model":
        return True
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class AnalysisConfig:
    """What to measure, how often, and where snapshots live. Immutable; `dataclasses.replace` to vary."""

    # -- seed 002 fields -----------------------------------------------------------------------------
    interval: int = 100  # measure every N optimizer steps
    snapshot_device: str = "cpu"  # where the snapshot W_then lives ("model": on each parameter's device)
    snapshot_dtype: str = "float32"  # float32 | float16 | bfloat16 | native (the parameter's own dtype)
    param_change_enabled: bool = True
    param_change_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    param_change_per_layer: bool = False
    param_change_track_components: bool = False
    sparse_quality_enabled: bool = True
    sparse_quality_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    sparse_quality_include_random: bool = True
    gradient_enabled: bool = False
    momentum_enabled: bool = False
    # -- additions ----------------------------------------------------------------------------------
    enabled: bool = True  # the agent plug-in runs only when True (the YAML section defaults to false)
    trainable_only: bool = True  # snapshot only parameters with requires_grad (frozen ones never move)
    max_layers: int = 64  # per-layer series beyond this many layer groups are merged into layer="other"
    chunk_elements: int = 1 << 24  # streaming: elements per chunk on the device (bounds temporaries)
    sparse_quality_max_samples: int = 8  # rows of the batch used for sparse-quality forwards (0 = all)
    seed: int = 0  # random-baseline masks: seed + step, on a private generator (training RNG untouched)
    capture_inputs: bool = True  # plug-in: feed sparse quality with the model's latest call

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "param_change_thresholds", _thresholds("param_change_thresholds", self.param_change_thresholds))
        set_(self, "sparse_quality_thresholds",
             _thresholds("sparse_quality_thresholds", self.sparse_quality_thresholds))
        checks = {
            "interval": self.interval >= 1,
            "snapshot_device": is_device_spec(self.snapshot_device),
            "snapshot_dtype": self.snapshot_dtype in SNAPSHOT_DTYPES,
            "max_layers": self.max_layers >= 1,
            "chunk_elements": self.chunk_elements >= 1,
            "sparse_quality_max_samples": self.sparse_quality_max_samples >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"dynamics: invalid '{key}': {getattr(self, key)!r}")

    # -- presets ------------------------------------------------------------------------------------
    @classmethod
    def minimal(cls, **overrides: Any) -> AnalysisConfig:
        """Parameter change only, global statistics, every 500 steps: the production setting."""
        base = dict(interval=500, param_change_per_layer=False, param_change_track_components=False,
                    sparse_quality_enabled=False, gradient_enabled=False, momentum_enabled=False)
        return cls(**{**base, **overrides})

    @classmethod
    def comprehensive(cls, **overrides: Any) -> AnalysisConfig:
        """Every metric, per layer and per component, random baseline, every 50 steps: for studies."""
        base = dict(interval=50, param_change_per_layer=True, param_change_track_components=True,
                    sparse_quality_enabled=True, sparse_quality_include_random=True, gradient_enabled=True,
                    momentum_enabled=True)
        return cls(**{**base, **overrides})

    # -- conversions --------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | AnalysisConfig | None) -> AnalysisConfig:
        """From a dict or the agent's `config.dynamics` section; unknown keys are errors naming the key."""
        if mapping is None:
            return cls()
        if isinstance(mapping, AnalysisConfig):
            return mapping
        if not isinstance(mapping, Mapping):
            raise TypeError(f"dynamics config must be a mapping or an AnalysisConfig, got {type(mapping).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise ValueError(f"dynamics: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**dict(mapping))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("param_change_thresholds", "sparse_quality_thresholds"):
            out[key] = list(out[key])
        return out

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The snapshot dtype; None = each parameter's own dtype."""
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            self.snapshot_dtype)

    @property
    def torch_device(self) -> torch.device | None:
        """The snapshot device; None = each parameter's device."""
        return None if self.snapshot_device == "model" else torch.device(self.snapshot_device)
