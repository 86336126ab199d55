"""Module specs (`package.module@ClassName`), `key=value` kwargs and input shapes.

Everything here turns user text into Python values or raises one of the errors in `errors.py` with a
message that quotes the offending text, so that the CLI can print it as a single line.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import KwargsError, ShapeError, SpecError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModuleSpec:
    """A parsed module spec: where to import from and which attribute to take."""

    module_path: str  # dotted import path, or a path to a .py file
    class_name: str  # attribute path inside that module, may itself be dotted (Outer.Inner)

    @property
    def text(self) -> str:
        return f"{self.module_path}@{self.class_name}"

    @property
    def is_file(self) -> bool:
        return self.module_path.endswith(".py")


def parse_module_spec(spec: str) -> ModuleSpec:
    """Split `package.module@ClassName` (or `package.module.ClassName`, or `path/file.py@ClassName`)."""
    text = spec.strip()
    if not text:
        raise SpecError("empty module spec: expected package.module@ClassName, e.g. torch.nn@Linear")
    if "@" in text:
        module_path, _, class_name = text.rpartition("@")
    elif "." in text:
        module_path, _, class_name = text.rpartition(".")
    else:
        raise SpecError(f"bad module spec {spec!r}: expected package.module@ClassName, e.g. torch.nn@Linear")
    if not module_path or not class_name:
        raise SpecError(f"bad module spec {spec!r}: expected package.module@ClassName, e.g. torch.nn@Linear")
    if not all(part.isidentifier() for part in class_name.split(".")):
        raise SpecError(f"bad module spec {spec!r}: {class_name!r} is not a class name")
    if not module_path.endswith(".py") and not all(part.isidentifier() for part in module_path.split(".")):
        raise SpecError(
            f"bad module spec {spec!r}: {module_path!r} is not a dotted module path or a .py file"
        )
    return ModuleSpec(module_path, class_name)


def _import_file(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"cannot import {path!r}: no such file")
    name = f"_initcheck_user_{abs(hash(str(file.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise SpecError(f"cannot import {path!r}: not a Python source file")
    mod = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = mod
    try:
        loader_spec.loader.exec_module(mod)
    except Exception as exc:
        del sys.modules[name]
        raise SpecError(f"importing {path!r} failed: {type(exc).__name__}: {exc}") from exc
    return mod


def _import_dotted(module_path: str) -> Any:
    """Import like `python -m` would: the working directory counts as an import root."""
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_path
        # `gradflow-agent` as a console script does not put the working directory on sys.path; retry with it.
        cwd = os.getcwd()
        if cwd not in sys.path and module_path.split(".")[0] == missing.split(".")[0]:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(module_path)
            except ModuleNotFoundError:
                pass
            finally:
                sys.path.remove(cwd)
        if missing != module_path and not module_path.startswith(missing + "."):
            raise SpecError(
                f"importing {module_path!r} failed: it needs {missing!r}, which is not installed"
            ) from exc
        raise SpecError(f"cannot import module {module_path!r}: no module named {missing!r}") from exc
    except Exception as exc:
        raise SpecError(f"importing {module_path!r} failed: {type(exc).__name__}: {exc}") from exc


def load_module_class(spec: str | ModuleSpec) -> type[nn.Module]:
    """Import the class a spec names and check that it is a `torch.nn.Module` subclass."""
    parsed = parse_module_spec(spec) if isinstance(spec, str) else spec
    mod = _import_file(parsed.module_path) if parsed.is_file else _import_dotted(parsed.module_path)
    obj: Any = mod
    for attr in parsed.class_name.split("."):
        if not hasattr(obj, attr):
            candidates = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, candidates, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"module {parsed.module_path!r} has no attribute {parsed.class_name!r}{hint}")
        obj = getattr(obj, attr)
    if not isinstance(obj, type):
        raise SpecError(f"{parsed.text!r} is a {type(obj).__name__}, not a class")
    if not issubclass(obj, nn.Module):
        raise SpecError(f"{parsed.text!r} is not a torch.nn.Module subclass")
    return obj


def parse_value(text: str) -> Any:
    """A Python literal when the text is one (`16`, `False`, `(4, 16)`, `None`), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_module_kwargs(items: Iterable[str] | None) -> dict[str, Any]:
    """Parse `key=value` items with literal evaluation of each value."""
    kwargs: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise KwargsError(f"bad module kwarg {item!r}: expected key=value, e.g. in_features=16")
        if not key.isidentifier():
            raise KwargsError(f"bad module kwarg {item!r}: {key!r} is not a valid keyword name")
        if key in kwargs:
            raise KwargsError(f"module kwarg {key!r} given twice")
        kwargs[key] = parse_value(value.strip())
    return kwargs


def parse_shape(text: str) -> Shape:
    """Parse `2,16,64` (brackets and spaces allowed) into a tuple of positive ints."""
    body = text.strip().strip("()[]").strip()
    parts = [p.strip() for p in body.split(",")] if body else []
    if parts and parts[-1] == "":  # a trailing comma, as in "(16,)"
        parts = parts[:-1]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ShapeError(f"bad shape {text!r}: expected comma-separated positive integers, e.g. 2,16")
    return dims


def parse_named_shapes(items: Sequence[str]) -> dict[str, Shape]:
    """Parse `name:shape` items (`query:2,8,32`) into an ordered name -> shape mapping."""
    shapes: dict[str, Shape] = {}
    for item in items:
        name, sep, shape = item.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ShapeError(f"bad input {item!r}: expected name:shape, e.g. query:2,8,32")
        if not name.isidentifier():
            raise ShapeError(f"bad input {item!r}: {name!r} is not a valid argument name")
        if name in shapes:
            raise ShapeError(f"input {name!r} given twice")
        shapes[name] = parse_shape(shape)
    return shapes


def normalize_shapes(shapes: Mapping[str, Sequence[int]] | Sequence[int]) -> dict[str, Shape]:
    """Accept `{"x": (2, 16)}` or a bare `(2, 16)` (named `x`) from the Python API and validate it."""
    named: Mapping[str, Sequence[int]] = {"x": shapes} if not isinstance(shapes, Mapping) else shapes
    if not named:
        raise ShapeError("no input shapes given: pass --input-shape or --input-shapes")
    out: dict[str, Shape] = {}
    for name, shape in named.items():
        if isinstance(shape, str):
            out[name] = parse_shape(shape)
            continue
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise ShapeError(
                f"bad shape for input {name!r}: {shape!r} is not a sequence of integers"
            ) from None
        if not dims or any(d <= 0 for d in dims):
            raise ShapeError(f"bad shape for input {name!r}: {shape!r} must be non-empty positive integers")
        out[name] = dims
    return out


def format_call(cls: type, kwargs: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{cls.__name__}({args})"


def build_module(cls: type[nn.Module], kwargs: Mapping[str, Any], seed: int | None = 0) -> nn.Module:
    """Instantiate the class with the kwargs under a fixed seed (the global RNG state is restored after).

    Constructor failures become `KwargsError`.
    """
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            module = cls(**kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError, AttributeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KwargsError(f"{format_call(cls, kwargs)} failed: {type(exc).__name__}: {detail}") from exc
    if not isinstance(module, nn.Module):  # a metaclass or __new__ that returns something else
        raise SpecError(f"{cls.__name__}(...) did not return a torch.nn.Module")
    return module
