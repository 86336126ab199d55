"""Trainer integrations, imported lazily so that `gradflow_agent` needs neither framework:

    from gradflow_agent.integrations import GradflowCallback            # transformers.Trainer
    from gradflow_agent.integrations import GradflowLightningCallback   # lightning / pytorch_lightning
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {  # name -> submodule; each submodule names its extra (hf, lightning) when the framework is missing
    "GradflowCallback": "huggingface",
    "GradflowLightningCallback": "lightning",
    "AttentionPlugin": "attention",  # attention statistics without an attention module (no extra needed)
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
