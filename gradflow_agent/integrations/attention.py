"""Hook points for attention that is a function call, not a module: the statistics of stats/attention.py.

    from gradflow_agent.integrations.attention import AttentionPlugin
    agent = gradflow_agent.attach(model, optimizer=opt)
    agent.add_plugin(AttentionPlugin(model))      # gradflow_attention_{entropy,max_prob}_ratio, _head_diversity

Three ways in, all feeding an `AttentionStats` (or any object with `observe(name, probs, valid)`):

- transformers' attention registry (`AttentionInterface` / `ALL_ATTENTION_FUNCTIONS`): a model picks its
  attention function with `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
  eager_attention_forward)` (eager is the module's own default, sdpa/flash/flex/custom ones are registered)
  or `ALL_ATTENTION_FUNCTIONS[name]`. While installed, both return a wrapper around whatever they would
  have returned: it calls the original unchanged, then samples the call's attention from its `module,
  query, key, attention_mask, scaling` (and `softcap`, `sliding_window`, `position_bias`; see
  `sample_probs`). The layer is the qualified name of the
  `module` argument (`model.layers.0.self_attn`), from an id -> name map built at install time; a module
  of another model passes straight through. Causality follows the implementation: a tensor mask is taken
  as is; without one, eager attends everywhere (it adds no mask) and the others are causal when
  `is_causal` (the call's, else the module's, default True) says so, as in transformers' sdpa.
- `F.scaled_dot_product_attention` (hand-written models, nn.MultiheadAttention with need_weights=False):
  the function in `torch.nn.functional` is wrapped; a forward pre-hook / post-hook pair on the modules
  that may own the call (every module whose class is not from torch.nn, nn.MultiheadAttention, and the
  root; or the `modules=` names) keeps a thread-local stack of running modules, and a call made while one
  of them runs is recorded under the innermost one's name. A call outside the model is not touched.
  Code that bound the function before install (`from torch.nn.functional import
  scaled_dot_product_attention`) is not seen: call `record_attention` there.
- `record_attention(module_name, query, key, mask=None, scale=None)`: explicit, from your own attention.

Opt-in (the offline TransformerAnalyzer uses it): `softmax=True` also reads attention-shaped softmax
calls (`F.softmax`, `torch.softmax`, `Tensor.softmax` with dim=-1 on a (B, H, L, S) tensor, or (B, L, L))
made inside a watched module: hand-written attention without sdpa.

Guarantees: the original function is called with the same arguments and its result returned untouched
(outputs are bit-identical: the statistics use no random generator and no in-place op on the model's
tensors); nothing is observed under `torch.inference_mode()` or in activation-checkpointing re-runs
inside backward; a failure is counted (`errors`) and never raised; `remove()` puts back exactly what
was there (the class attributes of AttentionInterface, `F.scaled_dot_product_attention`, the softmax
functions) once the last install is removed; if another library wrapped them on top meanwhile, its
wrapper is left in place and ours passes calls through. Under `torch.compile` the observation runs in a
`torch.compiler.disable` island: each observed call is a graph break (the attention itself stays
compiled); pass `compiled=False` to skip observing inside compiled code instead.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ErrorCounter
from ..export.metrics import Metric
from ..hooks import add_module_hook, in_backward
from ..stats.attention import AttentionSample, AttentionStats, sample_probs, sample_softmax_output
from ..stats.engine import model_device

log = logging.getLogger("gradflow_agent")

COMPONENT = "attention"


class AttentionSink(Protocol):
    def observe(self, name: str, probs: torch.Tensor, valid: torch.Tensor) -> None: ...


# -- process-wide state ------------------------------------------------------------------------------------
class _State(threading.local):
    def __init__(self) -> None:
        self.stack: list[tuple[AttentionHandle, str]] = []  # watched modules running now, innermost last
        self.busy = 0  # inside our own observation: its softmax/sdpa calls are not attention
        self.inside = 0  # inside an observed registry call: the sdpa it makes is the same attention
        self.softmax_depth = 0  # F.softmax calls Tensor.softmax: count the outer call only


_STATE = _State()
_HANDLES: list[AttentionHandle] = []  # installed and not removed, oldest first
_LOCK = threading.RLock()
_MISSING = object()


def _island(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run outside torch.compile's graph (a graph break rather than a traced side effect). Made on the
    first compiled call: importing torch._dynamo at install would cost every eager user a second."""
    made: list[Callable[..., Any]] = []

    def island(*args: Any) -> Any:
        if not made:
            disable = getattr(getattr(torch, "compiler", None), "disable", None)
            made.append(disable(fn) if disable is not None else fn)
        return made[0](*args)
    return island


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


class _Patch:
    """Reference-counted replacement of attributes (owner, name) by wrappers of what was there."""

    def __init__(self, targets: Callable[[], list[tuple[Any, str, Callable[[Any], Any]]]]) -> None:
        self._targets = targets
        self.count = 0
        self._saved: list[tuple[Any, str, Any, Any]] = []  # owner, name, own attribute (or _MISSING), wrapper

    def acquire(self) -> None:
        if self.count == 0:
            for owner, name, make in self._targets():
                own = vars(owner).get(name, _MISSING)
                wrapper = make(getattr(owner, name))
                setattr(owner, name, wrapper)
                self._saved.append((owner, name, own, wrapper))
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count > 0:
            return
        for owner, name, own, wrapper in reversed(self._saved):
            if vars(owner).get(name) is not wrapper:  # wrapped again on top by someone else: theirs stays
                log.warning("gradflow_agent: %s.%s was replaced while attention statistics were installed; "
                            "left as it is (our wrapper now passes calls through)", getattr(owner, "__name__", owner),
                            name)
                continue
            if own is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self._saved.clear()


# -- the transformers registry -----------------------------------------------------------------------------
_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # original fn -> {is_default: wrapper}


def _param_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    import inspect
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def wrap_attention_function(fn: Callable[..., Any], implementation: str = "", is_default: bool = False
                            ) -> Callable[..., Any]:
    """The observing wrapper of a transformers attention function (cached; a wrapper is returned as is).

    `is_default`: `fn` is the model's own eager function (get_interface's default), which adds no causal
    mask of its own."""
    if getattr(fn, "__gradflow_attention__", False):
        return fn
    try:
        cache = _WRAPPED.setdefault(fn, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    wrapper = cache.get(is_default)
    if wrapper is not None:
        return wrapper
    names = _param_names(fn)
    eager = is_default or implementation in ("eager", "paged|eager")
    flash = "flash" in implementation

    @functools.wraps(fn)
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                  **kwargs: Any) -> Any:
        if not _HANDLES or _STATE.busy:
            return fn(module, query, key, value, *args, **kwargs)
        _STATE.inside += 1
        try:
            out = fn(module, query, key, value, *args, **kwargs)
        finally:
            _STATE.inside -= 1
        if not _compiling():
            _observe_registry(module, query, key, args, kwargs, names, eager, flash)
        elif any(h.compiled for h in _HANDLES):
            _observe_registry_island(module, query, key, args, kwargs, names, eager, flash)
        return out

    attention.__gradflow_attention__ = True  # type: ignore[attr-defined]
    attention.__wrapped_attention__ = fn  # type: ignore[attr-defined]
    cache[is_default] = attention
    return attention


def _observe_registry(module: nn.Module, query: torch.Tensor, key: torch.Tensor, args: tuple, kwargs: dict,
                      names: tuple[str, ...], eager: bool, flash: bool) -> None:
    if torch.is_inference_mode_enabled() or in_backward():
        return
    for h in _HANDLES:
        if h.registry and h.is_active():
            name = h.names.get(id(module))
            if name is not None and name not in h.exclude:
                break
    else:
        return
    with _Busy(h):
        bound = dict(zip(names[4:] if len(names) >= 5 else ("attention_mask",), args))
        bound.update(kwargs)
        mask = bound.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            h.unsupported[name] = f"attention mask of type {type(mask).__name__}"
            return
        scale = bound.get("scaling", bound.get("scale"))
        causal = False
        if mask is None and not eager and query.shape[-2] > 1:
            flag = bound.get("is_causal")
            causal = bool(flag if flag is not None else getattr(module, "is_causal", True))
        elif mask is not None and flash and mask.ndim == 2:  # flash: a (batch, keys) padding mask
            mask = mask.bool()[:, None, None, :]
            causal = bool(getattr(module, "is_causal", True)) and query.shape[-2] > 1
        window = bound.get("sliding_window") if mask is None else None
        bias = bound.get("position_bias")
        h.feed(name, query, key, mask, scale, causal, bound.get("softcap"), window,
               bias if isinstance(bias, torch.Tensor) else None)


_observe_registry_island = _island(_observe_registry)


def _registry_targets() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    from transformers.modeling_utils import AttentionInterface

    def get_interface(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def patched(self: Any, attn_implementation: str, default: Callable[..., Any]) -> Callable[..., Any]:
            fn = orig(self, attn_implementation, default)
            return wrap_attention_function(fn, attn_implementation or "", fn is default)
        return patched

    def getitem(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def patched(self: Any, key: str) -> Callable[..., Any]:
            fn = orig(self, key)
            return wrap_attention_function(fn, key) if callable(fn) else fn
        return patched

    return [(AttentionInterface, "get_interface", get_interface), (AttentionInterface, "__getitem__", getitem)]


# -- F.scaled_dot_product_attention and softmax ------------------------------------------------------------
def _sdpa_targets() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = orig(*args, **kwargs)
            if _HANDLES and _STATE.stack and not _STATE.inside and not _STATE.busy:
                if not _compiling():
                    _observe_sdpa(args, kwargs)
                elif any(h.compiled for h in _HANDLES):
                    _observe_sdpa_island(args, kwargs)
            return out
        return scaled_dot_product_attention
    return [(F, "scaled_dot_product_attention", make)]


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _observe_sdpa(args: tuple, kwargs: dict) -> None:
    if torch.is_inference_mode_enabled() or in_backward():
        return
    h, name = _STATE.stack[-1]
    if not (h.sdpa and h.is_active()) or name in h.exclude:
        return
    with _Busy(h):
        bound = dict(zip(_SDPA_ARGS, args))
        bound.update(kwargs)
        h.feed(name, bound["query"], bound["key"], bound.get("attn_mask"), bound.get("scale"),
               bool(bound.get("is_causal", False)), None, None)


_observe_sdpa_island = _island(_observe_sdpa)


def _softmax_targets() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
            st = _STATE
            if not _HANDLES or not st.stack or st.busy or st.inside or st.softmax_depth or _compiling():
                return orig(*args, **kwargs)
            st.softmax_depth += 1
            try:
                out = orig(*args, **kwargs)
            finally:
                st.softmax_depth -= 1
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            _observe_softmax(out, dim)
            return out
        return softmax
    return [(F, "softmax", make), (torch, "softmax", make), (torch.Tensor, "softmax", make)]


def _observe_softmax(out: Any, dim: Any) -> None:
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or not isinstance(dim, int):
        return
    if out.ndim not in (3, 4) or dim not in (-1, out.ndim - 1) or (out.ndim == 3 and out.shape[-1] != out.shape[-2]):
        return
    if torch.is_inference_mode_enabled() or in_backward():
        return
    h, name = _STATE.stack[-1]
    if not (h.softmax and h.is_active()) or name in h.exclude:
        return
    with _Busy(h):
        probs, valid = sample_softmax_output(out, h.sample)
        h.sink.observe(name, probs, valid)


_PATCHES = {"registry": _Patch(_registry_targets), "sdpa": _Patch(_sdpa_targets),
            "softmax": _Patch(_softmax_targets)}


class _Busy:
    """Marks our own work (its softmax is not attention) and contains its failures."""

    def __init__(self, handle: AttentionHandle) -> None:
        self.handle = handle

    def __enter__(self) -> None:
        _STATE.busy += 1
        if self.handle.clock is not None:  # the agent's own time (its overhead budget sees it)
            self.handle.clock.__enter__()

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        _STATE.busy -= 1
        if self.handle.clock is not None:
            self.handle.clock.__exit__(kind, exc, tb)
        if exc is not None and isinstance(exc, Exception):
            self.handle.errors.record(COMPONENT, exc)
            return True  # never raised into the model's forward
        if exc is None:
            self.handle.errors.succeeded(COMPONENT)
        return False


# -- installs -----------------------------------------------------------------------------------------------
def _watch_type(module: nn.Module) -> bool:
    """Modules that may call F.scaled_dot_product_attention themselves (torch.nn's own leaves never do)."""
    if isinstance(module, (nn.MultiheadAttention, nn.Softmax)):
        return True
    return not type(module).__module__.startswith("torch.nn.")


class AttentionHandle:
    """One install: what it watches, where the statistics go; `remove()` undoes it (idempotent)."""

    def __init__(self, model: nn.Module, sink: AttentionSink, *, sample: AttentionSample, registry: bool,
                 sdpa: bool, softmax: bool, active: Callable[[], bool] | None, exclude: Iterable[str],
                 errors: ErrorCounter | None, compiled: bool) -> None:
        self.model = model
        self.sink = sink
        self.sample = sample
        self.registry, self.sdpa, self.softmax = registry, sdpa, softmax
        self.active = active
        self.exclude = set(exclude)
        self.errors = errors if errors is not None else ErrorCounter()
        self.clock: Any = None  # an AgentClock once an agent binds it: the observations' time is the agent's
        self.compiled = compiled
        self.names: dict[int, str] = {id(m): (n or "(root)") for n, m in model.named_modules()}
        self.unsupported: dict[str, str] = {}  # layer -> why it could not be observed
        self.removed = False
        self._patches: list[_Patch] = []
        self._hooks: list[Any] = []

    @property
    def stats(self) -> AttentionSink:
        return self.sink

    def is_active(self) -> bool:
        if self.removed or not self.errors.enabled(COMPONENT):
            return False
        return self.active is None or bool(self.active())

    def feed(self, name: str, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
             scale: float | None, causal: bool, softcap: float | None = None, window: int | None = None,
             bias: torch.Tensor | None = None) -> None:
        """Sample one call and hand it to the sink (inside _Busy: failures are counted there)."""
        if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or query.ndim < 2:
            return
        probs, valid = sample_probs(query, key, mask, scale, is_causal=causal, softcap=softcap,
                                    sliding_window=window, bias=bias, sample=self.sample)
        self.sink.observe(name, probs, valid)

    def _start(self, modules: Iterable[str] | None) -> None:
        with _LOCK:
            for kind, on in (("registry", self.registry), ("sdpa", self.sdpa), ("softmax", self.softmax)):
                if on:
                    _PATCHES[kind].acquire()
                    self._patches.append(_PATCHES[kind])
            if self.sdpa or self.softmax:
                chosen = None if modules is None else set(modules)
                for name, module in self.model.named_modules():
                    label = name or "(root)"
                    if module is self.model or (label in chosen if chosen is not None else _watch_type(module)):
                        self._hooks.append(add_module_hook(module, self._enter(label), pre=True))
                        self._hooks.append(add_module_hook(module, self._leave(label), always_call=True))
            _HANDLES.append(self)

    def _enter(self, label: str) -> Callable[..., None]:
        entry = (self, label)

        def pre(module: nn.Module, args: tuple) -> None:
            _STATE.stack.append(entry)
        return pre

    def _leave(self, label: str) -> Callable[..., None]:
        entry = (self, label)

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            stack = _STATE.stack
            for i in range(len(stack) - 1, -1, -1):  # robust to a forward that raised below us
                if stack[i] == entry:
                    del stack[i:]
                    break
        return post

    def remove(self) -> None:
        """Remove the hooks and give back the patched functions (the last install restores the originals)."""
        with _LOCK:
            if self.removed:
                return
            self.removed = True
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
            if self in _HANDLES:
                _HANDLES.remove(self)
            for patch in reversed(self._patches):
                patch.release()
            self._patches.clear()

    def __enter__(self) -> AttentionHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


def install(model: nn.Module, stats: AttentionSink | None = None, *, registry: bool | None = None,
            sdpa: bool = True, softmax: bool = False, modules: Iterable[str] | None = None,
            sample: AttentionSample | None = None, active: Callable[[], bool] | None = None,
            exclude: Iterable[str] = (), errors: ErrorCounter | None = None, compiled: bool = True
            ) -> AttentionHandle:
    """Observe `model`'s functional attention into `stats` (a new AttentionStats when None: `handle.stats`).

    registry: wrap transformers' attention functions (None: when transformers is already imported, as it is
    for a transformers model); sdpa: F.scaled_dot_product_attention; softmax: attention-shaped softmax calls;
    modules: the names of the modules that may own an sdpa/softmax call (default: every module not from
    torch.nn, MultiheadAttention and the root); active(): observe only while it is true (the agent's
    sampling); exclude: layer names measured another way; compiled: observe inside torch.compile'd code (a
    graph break per call) or not. Transactional: it raises and leaves nothing behind, or returns a handle.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule: names of the original
    if registry is None:
        registry = "transformers.modeling_utils" in sys.modules
    if sample is None:
        sample = getattr(stats, "sample", None) or AttentionSample()
    if stats is None:
        stats = AttentionStats([], model_device(model), sample=sample)
    handle = AttentionHandle(model, stats, sample=sample, registry=registry, sdpa=sdpa, softmax=softmax,
                             active=active, exclude=exclude, errors=errors, compiled=compiled)
    try:
        handle._start(modules)
    except BaseException:
        handle.remove()
        raise
    return handle


def observe_sdpa(model: nn.Module, stats: AttentionSink | None = None, *, modules: Iterable[str] | None = None,
                 sample: AttentionSample | None = None, active: Callable[[], bool] | None = None) -> AttentionHandle:
    """Observe the `F.scaled_dot_product_attention` calls made inside `model`'s modules (no registry).
    Also a context manager: `with observe_sdpa(model) as h: ...; h.stats`."""
    return install(model, stats, registry=False, sdpa=True, modules=modules, sample=sample, active=active)


def record_attention(module_name: str, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None, *, is_causal: bool = False) -> None:
    """Record one attention call from your own code (every active install receives it; a no-op without
    one, and inside torch.compile'd code). query (.., H, L, D), key (.., Hk, S, D), mask boolean (True =
    attend) or additive, as for sdpa."""
    if not _HANDLES or torch.is_inference_mode_enabled() or in_backward() or _compiling():
        return
    for h in list(_HANDLES):
        if h.is_active():
            with _Busy(h):
                h.feed(module_name, query, key, mask, scale, is_causal, None, None)


# -- the agent plug-in ---------------------------------------------------------------------------------------
def _metric(name: str, help: str, unit: str = "") -> Metric:
    return Metric(name, "gauge", help, unit, ("layer",))


ENTROPY = _metric("gradflow_attention_entropy_ratio",
                  "Mean normalised attention entropy (entropy / ln(valid keys)) over sampled query rows of the "
                  "attention layer in the interval: 1 uniform, 0 every query on one key.", "1")
MAX_PROB = _metric("gradflow_attention_max_prob_ratio",
                   "Mean over sampled query rows of the largest attention probability: near 1 when attention "
                   "has collapsed onto one key.", "1")
DIVERSITY = _metric("gradflow_attention_head_diversity",
                    "1 - mean pairwise cosine of the sampled heads' attention patterns (deviations from "
                    "uniform), 0 identical heads to 1 unrelated.")
METRICS = {"attention_entropy": ENTROPY, "attention_max_prob": MAX_PROB, "attention_head_diversity": DIVERSITY}


class AttentionPlugin:
    """Agent plug-in (`agent.add_plugin(AttentionPlugin(model))`): functional attention statistics per layer.

    Observes while the agent measures (its `sampling.every_n_steps` and `agent.paused()`, once the first
    step has bound it); `collect()` reads the device buffer with one transfer per snapshot (training thread)
    and returns `gradflow_attention_entropy_ratio`, `gradflow_attention_max_prob_ratio` and
    `gradflow_attention_head_diversity` rows labelled `layer`; errors are counted under component
    "attention" in the agent's gradflow_agent_errors_total once bound.
    """

    name = COMPONENT
    metrics = (ENTROPY, MAX_PROB, DIVERSITY)

    def __init__(self, model: nn.Module, *, sample: AttentionSample | None = None,
                 registry: bool | None = None, sdpa: bool = True, modules: Iterable[str] | None = None,
                 compiled: bool = True) -> None:
        sample = sample if sample is not None else AttentionSample()
        base = getattr(model, "_orig_mod", model)
        self.stats = AttentionStats([], model_device(base), sample=sample)
        self._agent: Any = None
        self._types = {(n or "(root)"): type(m).__name__ for n, m in base.named_modules()}
        self._declared = attention_modules(base, modules)
        self._values: dict[str, Any] = {}
        self.handle = install(model, self.stats, registry=registry, sdpa=sdpa, modules=modules, sample=sample,
                              active=self._active, compiled=compiled)

    def _active(self) -> bool:
        agent = self._agent
        return agent is None or bool(getattr(agent.hooks, "active", True))

    def on_step(self, agent: Any) -> None:
        if self._agent is not agent:
            self._agent = agent
            self.handle.errors = agent.errors
            self.handle.clock = agent.clock

    def collect(self) -> list[tuple[Metric, dict[str, str], float]]:
        from ..stats.engine import transfer
        host = transfer([self.stats.device_parts()], self.stats.device)[0]
        values = self._values = self.stats.finish(host)
        rows = []
        for key, metric in METRICS.items():
            for layer, v in zip(self.stats.layers, values[key]):
                if math.isfinite(v):
                    rows.append((metric, {"layer": layer}, float(v)))
        return rows

    @property
    def layers(self) -> tuple[tuple[str, str], ...]:
        """(name, type) of the attention layers, for the snapshot: the modules declared at construction
        (`attention_modules`), then any other module whose attention was observed, in order of first call."""
        names = dict.fromkeys([*self._declared, *self.stats.layers])
        return tuple((n, self._types.get(n, "Attention")) for n in names)

    def layer_statistics(self) -> dict[str, dict[str, float]]:
        """statistic (stats/attention.py KEYS) -> {layer: value} of the last `collect()`, for the rule
        table (attention_collapse); a layer never observed is left out (unknown, never judged)."""
        return {key: {layer: float(v) for layer, v in zip(self.stats.layers, values) if math.isfinite(v)}
                for key, values in self._values.items()}

    def close(self) -> None:
        self.handle.remove()


def attention_modules(model: nn.Module, modules: Iterable[str] | None = None) -> list[str]:
    """Names of the modules that are attention layers before any call is seen: `modules` when given, else
    the innermost modules whose class name ends in "Attention" (LlamaAttention, GPT2Attention,
    BertSelfAttention, nn.MultiheadAttention, most hand-written ones; BertAttention, which holds
    BertSelfAttention, is not one). Declaring them up front keeps the snapshot's layer list fixed from attach."""
    if modules is not None:
        return list(modules)
    found = [n for n, m in model.named_modules() if n and type(m).__name__.endswith("Attention")]
    return [n for n in found if not any(o.startswith(n + ".") for o in found)]


__all__ = ["AttentionHandle", "AttentionPlugin", "AttentionSample", "AttentionStats", "METRICS", "attention_modules",
           "install", "observe_sdpa", "record_attention", "wrap_attention_function"]
