"""Optional dependencies: which extra provides which module, and one clear line when one is missing.

The core (`pip install gradflow-agent`) is what the live agent needs inside a training image; every other
feature names its extra when it cannot import what it needs:

    gradflow-agent init-check needs the initcheck extra: pip install 'gradflow-agent[initcheck]'

`require()` is used at the point of use instead of ad-hoc try/except, so that the message is the same
everywhere; this module imports nothing but the standard library (the CLI loads it before torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

DISTRIBUTION = "gradflow-agent"

# extra -> the top-level modules it provides (pyproject's [project.optional-dependencies] installs them;
# tests/test_packaging.py checks that the two tables agree).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "initcheck": ("nbformat", "nbclient", "ipykernel", "matplotlib", "tqdm", "rich"),
    "report": ("rich",),
    "demo": ("rich",),
    "hf": ("transformers", "accelerate"),
    "lightning": ("lightning",),
    "dashboards": ("grafana_foundation_sdk",),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
}


class MissingExtraError(ImportError):
    """An optional feature's dependency is not installed; the message names the extra that provides it.

    An ImportError, so that code that already tolerates a missing optional package keeps working.
    """

    def __init__(self, feature: str, extra: str, module: str | None = None, detail: str | None = None) -> None:
        self.feature, self.extra = feature, extra
        message = f"{feature} needs the {extra} extra: pip install '{DISTRIBUTION}[{extra}]'"
        if detail:
            message += f" ({detail})"
        super().__init__(message, name=module)


def _is_missing(exc: ImportError, module: str) -> bool:
    """Whether `exc` says `module` (or a parent package of it) is absent, rather than broken inside."""
    name = getattr(exc, "name", None)
    return name is None or module == name or module.startswith(f"{name}.")


def require(module: str | Sequence[str], extra: str, feature: str) -> ModuleType:
    """Import `module` (the first importable of several alternatives) or raise MissingExtraError.

    `feature` is what the user asked for ("gradflow-agent init-check"), `extra` the one that installs it.
    A package that is installed but fails to import names its own error in parentheses, still one line.
    """
    names = (module,) if isinstance(module, str) else tuple(module)
    first: ImportError | None = None
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            first = first or exc
    assert first is not None, "require() needs at least one module name"
    detail = None if _is_missing(first, names[0]) else f"{names[0]}: {first}"
    raise MissingExtraError(feature, extra, getattr(first, "name", None) or names[0], detail) from first


def is_installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a `sys.modules[name] = None` entry counts as absent)."""
    top = module.partition(".")[0]
    if top in sys.modules:
        return sys.modules[top] is not None
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, feature: str) -> None:
    """Check, without importing anything, that every module of `extra` is installed.

    For commands whose extra is a set of packages used at different depths (init-check's notebook kernel
    needs ipykernel and matplotlib only inside the kernel): one up-front line beats a failure halfway through.
    """
    missing = [m for m in EXTRA_MODULES[extra] if not is_installed(m)]
    if missing:
        raise MissingExtraError(feature, extra, missing[0])
