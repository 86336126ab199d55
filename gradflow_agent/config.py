"""Configuration: `default.yaml` is both the documented default and the schema.

A user config (a YAML file or a dict) may set any subset of the default keys. Unknown keys, wrong types
and out-of-range values raise `ConfigError` naming the dotted key and the source. `GRADFLOW_*`
environment variables override scalars after the file is read; one that names no key is a warning, since
other tools share the prefix. `check_runtime` checks what only this machine can tell (files, addresses,
devices); attach() and `gradflow-agent check-config` run it, load_config does not.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import logging
import os
import re
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_PATH = Path(__file__).with_name("default.yaml")
ENV_PREFIX = "GRADFLOW_"
ENV_CONFIG_FILE = "GRADFLOW_CONFIG"  # path of the config file `attach()` reads when given none
DEFAULT_SOURCE = "default config"  # the source named in messages when neither a file nor a dict was given

log = logging.getLogger("gradflow_agent")
_warned_variables: set[str] = set()  # unknown GRADFLOW_* variables already logged by this process


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
    "exporters.prometheus.series_budget": (_non_negative, "0 (no limit) or a positive integer"),
    "exporters.prometheus.worst_k": (_non_negative, "a non-negative integer"),
    "exporters.prometheus.depth_bins": (_positive, "a positive integer"),
    "exporters.prometheus.per_rank": (lambda v: v in ("auto", "true", "false"), '"auto", "true" or "false"'),
    "sampling.every_n_steps": (_positive, "a positive integer"),
    "sampling.export_every_n_steps": (_positive, "a positive integer"),
    "sampling.export_every_seconds": (_positive, "a positive number of seconds"),
    "sampling.window": (lambda v: v >= 2, "an integer >= 2"),
    "sampling.overhead_budget": (lambda v: 0 <= v < 1, "a fraction of the step time in [0, 1) (0 = off)"),
    "stats.activations.saturation_margin": (lambda v: 0 < v < 0.5, "a number in (0, 0.5)"),
    "stats.parameters.every_n_steps": (_positive, "a positive integer"),
    "stats.activations.sample_elements": (_non_negative, "an integer >= 0 (0 = exact)"),
    "stats.parameters.update_ratio": (lambda v: v in ("sampled", "exact", "off"), "sampled, exact or off"),
    "stats.parameters.sample_size": (_positive, "a positive integer"),
    "thresholds.warmup_steps": (_non_negative, "an integer >= 0"),
    "thresholds.straggler_skew": (_positive, "a positive fraction, e.g. 0.25"),
    "thresholds.vanishing": (_non_negative, "a number >= 0"),
    "thresholds.exploding": (_positive, "a positive number"),
    "thresholds.dead_ratio": (_ratio, "a ratio in [0, 1]"),
    "thresholds.dead_unit_ratio": (_ratio, "a ratio in [0, 1]"),
    "thresholds.unstable_cv": (_positive, "a positive number"),
    "thresholds.saturation_ratio": (_ratio, "a ratio in [0, 1]"),
    "thresholds.stalled_update_ratio": (_non_negative, "a number >= 0"),
    "thresholds.attention_collapse_entropy": (_ratio, "a ratio in [0, 1]"),
    "thresholds.attention_collapse_max_prob": (_ratio, "a ratio in [0, 1]"),
    "thresholds.expert_imbalance": (_ratio, "a ratio in [0, 1]"),
    "thresholds.dead_expert_ratio": (lambda v: 0 <= v < 1, "a ratio in [0, 1)"),
    "stats.moe.top_k": (_non_negative, "an integer >= 0 (0 = read it from the router)"),
    "stats.moe.max_experts": (_non_negative, "an integer >= 0 (0 = no per-expert series)"),
    "stats.moe.min_assignments_per_expert": (_positive, "a positive integer"),
    "exporters.prometheus.port": (_port, "a port number in 0..65535 (0 = a free port)"),
    "exporters.prometheus.pushgateway.interval_seconds": (_positive, "a positive number of seconds"),
    "exporters.otel.protocol": (lambda v: v == "http/protobuf", "http/protobuf (the OTLP/HTTP exporter)"),
    "exporters.otel.interval_seconds": (_positive, "a positive number of seconds"),
    "exporters.otel.timeout_seconds": (_positive, "a positive number of seconds"),
    "exporters.tensorboard.max_layers": (_positive, "a positive integer"),
    "exporters.mlflow.max_layers": (_positive, "a positive integer"),
    "exporters.wandb.max_layers": (_positive, "a positive integer"),
    "exporters.wandb.mode": (lambda v: v in ("offline", "online", "disabled"), "offline, online or disabled"),
    "flight_recorder.steps": (_positive, "a positive number of steps"),
    "flight_recorder.snapshots": (_positive, "a positive number of snapshots"),
    "flight_recorder.max_bundles": (_non_negative, "an integer >= 0"),
    "flight_recorder.max_bytes": (lambda v: v >= 4096, "a number of bytes >= 4096"),
    "flight_recorder.directory": (lambda v: bool(v.strip()), "a directory path"),
    "flight_recorder.ranks": (lambda v: v in ("all", "zero"), "all or zero"),
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


def _glob_closed(pattern: str) -> bool:
    """Every `[` opens a set that a `]` closes, read as fnmatch reads it: fnmatch takes an unclosed `[`
    literally, so `encoder.[0-9` would silently match no module."""
    i = 0
    while (i := pattern.find("[", i)) >= 0:
        j = i + 1
        if pattern.startswith("!", j):
            j += 1
        if pattern.startswith("]", j):  # a `]` first in the set is a member, not its end
            j += 1
        i = pattern.find("]", j)
        if i < 0:
            return False
    return True


def _issue_kind(kind: str) -> bool:
    from .detect.spec import KINDS  # imported when checked: the rule table is not needed to read a config
    return kind == "*" or kind in KINDS


# Checks of each item of a list key: dotted key -> (predicate, what a good item is).
_GLOB = "an fnmatch glob with a ] for each [ (a literal [ is [[])"
ITEM_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "modules.include": (_glob_closed, _GLOB),
    "modules.exclude": (_glob_closed, _GLOB),
    "stats.moe.routers": (_glob_closed, _GLOB),
    "flight_recorder.triggers": (lambda v: _issue_kind(v), "an issue kind (nonfinite, exploding, ...) or *"),
}


class Section(Mapping):
    """A read-only view of one config section with attribute access (`cfg.sampling.window`).

    `_sources` (shared by a root and its sub-sections) maps a dotted key set from the environment to
    "environment GRADFLOW_X", and "" to the config's own source, so later checks name where a value came from.
    """

    def __init__(self, data: dict[str, Any], path: str = "", sources: dict[str, str] | None = None) -> None:
        self._data = data
        self._path = path
        self._sources = {} if sources is None else sources

    def __getattr__(self, name: str) -> Any:
        # Private and dunder names are never keys: copy and pickle probe `__deepcopy__`, `__setstate__`, ...
        # on an instance made without __init__, where reading self._data here would recurse forever.
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {self._path}{name}") from None

    def __getitem__(self, name: str) -> Any:
        try:
            value = self._data[name]
        except KeyError:
            raise KeyError(f"config has no key {self._path}{name}") from None
        return Section(value, f"{self._path}{name}.", self._sources) if isinstance(value, dict) else value

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        return f"Section({self._data!r})"


def env_overrides(cfg: Section) -> dict[str, str]:
    """Dotted key -> the GRADFLOW_* variable that set it: what the environment changed in this config."""
    prefix = "environment "
    return {key: src[len(prefix):] for key, src in cfg._sources.items() if key and src.startswith(prefix)}


def _source_of(cfg: Section, key: str, source: str | None = None) -> str:
    """Where the value of `key` came from: its variable when the environment set it, else the config's source."""
    return cfg._sources.get(key) or source or cfg._sources.get("") or "config"


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
    item_check = ITEM_CHECKS.get(key)
    for item in value if item_check else ():
        if not item_check[0](item):
            raise ConfigError(f"{source}: key '{key}' item {item!r} must be {item_check[1]}")
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


def _key_paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Environment variable name -> key path, for every key that is not a section (lists and maps too)."""
    out = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, dict) and value:
            out.update(_key_paths(value, path))
        else:
            out[ENV_PREFIX + "_".join(path).upper()] = path
    return out


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _env_value(raw: str, default: Any) -> Any:
    """The value a variable's text stands for: YAML, so `true` and `3` are typed, but a number written
    `1e-8` (a string in YAML 1.1) is a number, and text that is not YAML stays text for `_coerce` to reject."""
    if isinstance(default, str):
        return raw
    if isinstance(default, float) and _NUMBER.fullmatch(raw.strip()):
        return float(raw)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if value is None else value  # "" or "null": no key takes None, so report the text


def _unknown_variable(name: str, known: list[str], paths: dict[str, tuple[str, ...]]) -> str:
    """The warning for a GRADFLOW_* variable that names no key, with the closest variable it may mean."""
    cut = len(ENV_PREFIX)  # compare what follows the prefix, which every name shares
    close = difflib.get_close_matches(name[cut:], [k[cut:] for k in known], n=1, cutoff=0.6)
    best = ENV_PREFIX + close[0] if close else None
    if best is None:
        hint = "the keys are in default.yaml"
    elif best == ENV_CONFIG_FILE:
        hint = f"did you mean {ENV_CONFIG_FILE}, the config file path?"
    else:
        hint = f"did you mean {best}, key {'.'.join(paths[best])}?"
    return f"environment {name}: not a config key, ignored ({hint})"


def _warn_once(name: str, message: str) -> None:
    """Log an unknown variable once per process: other tools set GRADFLOW_* too, and attach() may run often."""
    if name not in _warned_variables:
        _warned_variables.add(name)
        log.warning("gradflow_agent: %s", message)


def _apply_env(cfg: dict[str, Any], environ: Mapping[str, str], sources: dict[str, str],
               warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Override scalars from GRADFLOW_* variables (recording each in `sources`); warn about unknown ones."""
    paths = _key_paths(cfg)
    names = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name != ENV_CONFIG_FILE)
    scalars = sorted(n for n, p in paths.items() if not isinstance(_lookup(cfg, p), (dict, list)))
    for name in names:  # warnings first: a later error should not hide them
        if name not in paths:
            message = _unknown_variable(name, [*scalars, ENV_CONFIG_FILE], paths)
            if warn is not None:
                warn(message)
            else:
                _warn_once(name, message)
    for name in (n for n in names if n in paths):
        path, dotted, source = paths[name], ".".join(paths[name]), f"environment {name}"
        default = _lookup(cfg, path)
        if isinstance(default, (dict, list)):
            raise ConfigError(f"{source}: key '{dotted}' is {_type_name(default)}, which only a config file can set "
                              "(the environment sets scalars)")
        _lookup(cfg, path[:-1])[path[-1]] = _coerce(dotted, default, _env_value(environ[name], default), source)
        sources[dotted] = source
    return cfg


def _lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _read_file(path: str | os.PathLike, source: str) -> Mapping[str, Any]:
    """The YAML mapping in `path`; every way of failing is one ConfigError line naming `source`."""
    try:
        with open(path, encoding="utf-8") as fh:
            user = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{source}: config file not readable (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: config file is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{source}: not valid YAML ({where}{what})") from None
    if user is None:
        return {}
    if not isinstance(user, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return user


def load_config(config: str | os.PathLike | Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None, *, warn: Callable[[str], None] | None = None) -> Section:
    """Merge a YAML path or a dict over the defaults, apply `GRADFLOW_*` overrides, validate.

    With no config, the file named by `GRADFLOW_CONFIG` is read. A `GRADFLOW_*` variable that names no key is
    not an error (other tools use the prefix): it is passed to `warn`, or logged once per process without it.
    Checks that depend on this machine (files, addresses, devices) are `check_runtime`'s.
    """
    environ = os.environ if environ is None else environ
    if config is None and environ.get(ENV_CONFIG_FILE):
        config = environ[ENV_CONFIG_FILE]
        source = f"{config} (from {ENV_CONFIG_FILE})"
        user = _read_file(config, source)
    elif config is None:
        user, source = {}, DEFAULT_SOURCE
    elif isinstance(config, Mapping):
        user, source = config, "config dict"
    elif isinstance(config, (str, os.PathLike)):
        source = str(config)
        user = _read_file(config, source)
    else:
        raise ConfigError(f"config must be a path, a dict or None, got {type(config).__name__}")
    sources = {"": source}
    merged = merge(load_default(), user, source)
    return Section(_apply_env(merged, environ, sources, warn), sources=sources)


# -- checks against this machine ---------------------------------------------------------------------------------
# Run by attach() and `gradflow-agent check-config`, not by load_config: rules and dashboards are built from
# configs meant for other machines. Each check returns None when the value works, else why it does not.


def _get(cfg: Section, key: str) -> Any:
    return _lookup(cfg, tuple(key.split(".")))


def _when(*keys: str) -> Callable[[Section], bool]:
    """A check applies when all these keys are set: an exporter that is off never reads its other keys."""
    return lambda cfg: all(_get(cfg, key) for key in keys)


def _prometheus_tls(cfg: Section) -> bool:
    prom = cfg.exporters.prometheus
    return prom.enabled and bool(prom.certfile or prom.keyfile)


def _readable_file(path: str) -> str | None:
    if not path:
        return "not set"
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "is a directory"
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"not readable: {exc.strerror or exc}"


def _certfile(path: str, cfg: Section) -> str | None:
    """keyfile may be left empty only when certfile holds the private key too (one combined PEM file)."""
    problem = _readable_file(path)
    if problem == "not set":
        return "keyfile is set without it"
    if problem or cfg.exporters.prometheus.keyfile:
        return problem
    with open(path, "rb") as fh:
        return None if b"PRIVATE KEY-----" in fh.read(1 << 20) else "holds no private key and keyfile is not set"


def _keyfile(path: str, cfg: Section) -> str | None:
    return _readable_file(path) if path else None  # empty: the key is in certfile, which _certfile checks


def _address(addr: str, cfg: Section) -> str | None:
    if not addr:
        return None  # every interface
    try:
        ipaddress.ip_address(addr)
        return None
    except ValueError:
        pass
    try:
        socket.getaddrinfo(addr, None)
    except (OSError, UnicodeError) as exc:
        return f"does not resolve: {getattr(exc, 'strerror', None) or exc}"
    return None


_HOST = re.compile(r"[A-Za-z0-9._~%-]+|\[[0-9A-Fa-f:.]+\]")


def _url_problem(url: str, bare_host_ok: bool) -> str | None:
    if "://" not in url and bare_host_ok:
        url = "http://" + url  # what prometheus_client does with "pushgateway:9091"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"the scheme is {parts.scheme or 'missing'}" if "://" in url else "no http:// or https://"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return str(exc)
    host = parts.netloc.rpartition("@")[2]
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if not host or not _HOST.fullmatch(host):
        return "no host" if not host else f"bad host {host!r}"
    return None


def _http_url(url: str, cfg: Section) -> str | None:
    return _url_problem(url, bare_host_ok=False)


def _pushgateway_url(url: str, cfg: Section) -> str | None:
    return _url_problem(url, bare_host_ok=True)


def _writable_file(path: str, cfg: Section) -> str | None:
    """The JSONL recorder creates the parent directories and appends: find out without creating anything."""
    target = Path(path)
    if target.is_dir():
        return "is a directory"
    if target.exists():
        try:
            with open(target, "a", encoding="utf-8"):
                return None
        except OSError as exc:
            return f"cannot be written: {exc.strerror or exc}"
    parent = target.absolute().parent
    while not parent.exists():  # the nearest directory that exists; the recorder creates the rest
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=parent):
            return None
    except OSError as exc:
        return f"cannot write in {parent}: {exc.strerror or exc}"


def _device(spec: str, cfg: Section) -> str | None:
    import torch  # only for this check: loading a config needs no torch
    if spec in ("cpu", "model"):
        return None
    kind, _, index = spec.partition(":")
    backend = getattr(torch, kind, None)
    available = getattr(backend, "is_available", None) or getattr(getattr(torch.backends, kind, None),
                                                                   "is_available", None)
    if available is None or not available():
        return f"torch {torch.__version__} sees no {kind} device"
    count_of = getattr(backend, "device_count", None)
    count = count_of() if count_of is not None else 1
    if index and int(index) >= count:
        return f"torch sees {count} {kind} device{'s' if count != 1 else ''}"
    return None


def _web_config(path: str, cfg: Section) -> str | None:
    if cfg.exporters.prometheus.certfile or cfg.exporters.prometheus.keyfile:
        return "certfile/keyfile are set too: put the certificate in its tls_server_config"
    problem = _readable_file(path)
    if problem:
        return problem
    try:
        from .export.webconfig import load_web_config
    except ModuleNotFoundError as exc:
        if exc.name != "gradflow_agent.export.webconfig":
            raise
        return None  # a package without web configuration support: the file exists, that is all we can say
    load_web_config(path)  # raises a ConfigError of its own naming the file and its key
    return None


# Dotted key -> (applies to this config, problem with the value or None, what a good value is).
RUNTIME_CHECKS: dict[str, tuple[Callable[[Section], bool], Callable[[Any, Section], str | None], str]] = {
    "exporters.prometheus.addr": (_when("exporters.prometheus.enabled"), _address,
                                  "an IP address or a host name that resolves"),
    "exporters.prometheus.certfile": (_prometheus_tls, _certfile, "a readable PEM file, with keyfile or a key"),
    "exporters.prometheus.keyfile": (_prometheus_tls, _keyfile, "a readable PEM file, for certfile"),
    "exporters.prometheus.web_config_file": (_when("exporters.prometheus.enabled",
                                                   "exporters.prometheus.web_config_file"), _web_config,
                                             "a readable exporter-toolkit web configuration file"),
    "exporters.prometheus.pushgateway.url": (_when("exporters.prometheus.enabled",
                                                   "exporters.prometheus.pushgateway.url"), _pushgateway_url,
                                             "an http(s) URL such as http://pushgateway:9091"),
    "exporters.otel.endpoint": (_when("exporters.otel.enabled", "exporters.otel.endpoint"), _http_url,
                                "an http(s) URL such as http://collector:4318/v1/metrics"),
    "exporters.jsonl.path": (_when("exporters.jsonl.enabled"), _writable_file,
                             "a path where a file can be written"),
    "dynamics.snapshot_device": (_when("dynamics.enabled"), _device, "cpu, model or a device here"),
}


def check_runtime(cfg: Section, source: str | None = None) -> None:
    """Raise ConfigError for a value that validates but cannot work here (a missing certificate, an address
    that does not resolve, an unwritable path, an absent device): at run time these would be logged and the
    exporter dropped, or fail deep inside attach. The message names the key and where its value came from
    (its GRADFLOW_* variable, else `source`, else the source load_config recorded)."""
    for key, (applies, problem_of, good) in RUNTIME_CHECKS.items():
        if not applies(cfg):
            continue
        value = _get(cfg, key)
        problem = problem_of(value, cfg)
        if problem:
            raise ConfigError(f"{_source_of(cfg, key, source)}: key '{key}' must be {good}, got {value!r} "
                              f"({problem})")
