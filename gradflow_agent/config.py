"""Configuration: `default.yaml` is both the documented default and the schema.

A user config (a YAML file or a dict) may set any subset of the default keys. Unknown keys, wrong types
and out-of-range values raise `ConfigError` naming the dotted key and the source. `GRADFLOW_*`
environment variables override scalars after the file is read.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = Path(__file__).with_name("default.yaml")
ENV_PREFIX = "GRADFLOW_"
ENV_CONFIG_FILE = "GRADFLOW_CONFIG"  # path of the config file `attach()` reads when given none


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _ratio(v: Any) -> bool:
    return 0 <= v <= 1


def _port(v: Any) -> bool:
    return 0 <= v <= 65535


# Value checks beyond the type: dotted key -> (predicate, what a good value is).
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "modules.max_layers": (_positive, "a positive integer"),
    "sampling.every_n_steps": (_positive, "a positive integer"),
    "sampling.export_every_n_steps": (_positive, "a positive integer"),
    "sampling.export_every_seconds": (_positive, "a positive number of seconds"),
    "sampling.window": (lambda v: v >= 2, "an integer >= 2"),
    "stats.activations.saturation_margin": (lambda v: 0 < v < 0.5, "a number in (0, 0.5)"),
    "stats.parameters.every_n_steps": (_positive, "a positive integer"),
    "stats.activations.sample_elements": (_non_negative, "an integer >= 0 (0 = exact)"),
    "stats.parameters.update_ratio": (lambda v: v in ("sampled", "exact", "off"), "sampled, exact or off"),
    "stats.parameters.sample_size": (_positive, "a positive integer"),
    "thresholds.warmup_steps": (_non_negative, "an integer >= 0"),
    "thresholds.vanishing": (_non_negative, "a number >= 0"),
    "thresholds.exploding": (_positive, "a positive number"),
    "thresholds.dead_ratio": (_ratio, "a ratio in [0, 1]"),
    "thresholds.dead_unit_ratio": (_ratio, "a ratio in [0, 1]"),
    "thresholds.unstable_cv": (_positive, "a positive number"),
    "thresholds.saturation_ratio": (_ratio, "a ratio in [0, 1]"),
    "thresholds.stalled_update_ratio": (_non_negative, "a number >= 0"),
    "exporters.prometheus.port": (_port, "a port number in 0..65535 (0 = a free port)"),
    "exporters.prometheus.pushgateway.interval_seconds": (_positive, "a positive number of seconds"),
    "exporters.otel.protocol": (lambda v: v == "http/protobuf", "http/protobuf (the OTLP/HTTP exporter)"),
    "exporters.otel.interval_seconds": (_positive, "a positive number of seconds"),
    "exporters.otel.timeout_seconds": (_positive, "a positive number of seconds"),
    "dynamics.interval": (_positive, "a positive integer"),
    "dynamics.snapshot_device": (lambda v: re.fullmatch(r"cpu|model|(cuda|xpu|mps|npu)(:\d+)?", v) is not None,
                                 "cpu, model, or an accelerator such as cuda or cuda:1"),
    "dynamics.snapshot_dtype": (lambda v: v in ("float32", "float16", "bfloat16", "native"),
                                "float32, float16, bfloat16 or native"),
    "dynamics.param_change_thresholds": (lambda v: len(v) > 0 and all(x >= 0 for x in v),
                                         "a non-empty list of numbers >= 0"),
    "dynamics.sparse_quality_thresholds": (lambda v: len(v) > 0 and all(x >= 0 for x in v),
                                           "a non-empty list of numbers >= 0"),
    "dynamics.max_layers": (_positive, "a positive integer"),
    "dynamics.chunk_elements": (_positive, "a positive integer"),
    "dynamics.sparse_quality_max_samples": (_non_negative, "an integer >= 0 (0 = the whole batch)"),
    "log.level": (lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "DEBUG, INFO, WARNING or ERROR"),
}


class Section(Mapping):
    """A read-only view of one config section with attribute access (`cfg.sampling.window`)."""

    def __init__(self, data: dict[str, Any], path: str = "") -> None:
        self._data = data
        self._path = path

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key {self._path}{name}") from None
        return Section(value, f"{self._path}{name}.") if isinstance(value, dict) else value

    def __getitem__(self, name: str) -> Any:
        return self.__getattr__(name)

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        return f"Section({self._data!r})"


def load_default() -> dict[str, Any]:
    with open(DEFAULT_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _coerce(key: str, default: Any, value: Any, source: str) -> Any:
    """Check `value` against the type of `default` (ints are accepted where floats are)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list) and default and all(isinstance(d, float) for d in default):
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = [float(v) for v in value] if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif isinstance(default, dict):  # free-form string maps (labels, headers)
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float))
                                             for k, v in value.items())
        value = {k: str(v) for k, v in value.items()} if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{source}: key '{key}' must be {_type_name(default)}, got {value!r}")
    check = CHECKS.get(key)
    if check and not check[0](value):
        raise ConfigError(f"{source}: key '{key}' must be {check[1]}, got {value!r}")
    return value


def merge(default: dict[str, Any], user: Mapping[str, Any], source: str, prefix: str = "") -> dict:
    out = copy.deepcopy(default)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in default:
            known = ", ".join(sorted(default))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {known})")
        if isinstance(default[key], dict) and default[key]:  # a section (empty dicts are free-form maps)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: key '{dotted}' must be a mapping, got {value!r}")
            out[key] = merge(default[key], value, source, dotted + ".")
        else:
            out[key] = _coerce(dotted, default[key], value, source)
    return out


def _scalar_paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Environment variable name -> key path, for every scalar key."""
    out = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, dict) and value:
            out.update(_scalar_paths(value, path))
        elif not isinstance(value, (dict, list)):
            out[ENV_PREFIX + "_".join(path).upper()] = path
    return out


def _apply_env(cfg: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    paths = _scalar_paths(cfg)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        if name not in paths:
            raise ConfigError(f"environment: unknown variable {name} (it names no config key)")
        path = paths[name]
        node = cfg
        for part in path[:-1]:
            node = node[part]
        default = node[path[-1]]
        value = raw if isinstance(default, str) else yaml.safe_load(raw)
        node[path[-1]] = _coerce(".".join(path), default, value, f"environment {name}")
    return cfg


def load_config(config: str | os.PathLike | Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> Section:
    """Merge a YAML path or a dict over the defaults, apply `GRADFLOW_*` overrides, validate."""
    environ = os.environ if environ is None else environ
    if config is None and environ.get(ENV_CONFIG_FILE):
        config = environ[ENV_CONFIG_FILE]
    if config is None:
        user, source = {}, "config"
    elif isinstance(config, Mapping):
        user, source = config, "config dict"
    elif isinstance(config, (str, os.PathLike)):
        source = str(config)
        try:
            with open(config, encoding="utf-8") as fh:
                user = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(user, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    else:
        raise ConfigError(f"config must be a path, a dict or None, got {type(config).__name__}")
    merged = merge(load_default(), user, source)
    return Section(_apply_env(merged, environ))
