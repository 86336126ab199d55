"""Trainer integrations, imported lazily so that `gradflow_agent` needs neither framework:

    from gradflow_agent.integrations import GradflowCallback            # transformers.Trainer
    from gradflow_agent.integrations import GradflowLightningCallback   # lightning / pytorch_lightning
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GradflowCallback": ("huggingface", "transformers"),
    "GradflowLightningCallback": ("lightning", "lightning (or pytorch-lightning)"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, package = _LAZY[name]
    try:
        mod = importlib.import_module(f".{module}", __name__)
    except ImportError as exc:
        raise ImportError(f"gradflow_agent.integrations.{name} needs {package}: pip install {package.split()[0]} "
                          f"({exc})") from exc
    return getattr(mod, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
