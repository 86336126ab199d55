"""HookManager: chooses the layers, owns every hook handle, and routes hook calls to the agent.

Activations come from per-module forward hooks on the chosen layers. Gradients are read at the
optimizer step boundary (a step pre-hook sees accumulated, DDP-averaged, unscaled gradients), never
per micro-batch. Without an optimizer reference the process-wide optimizer hooks are used, locked onto
the first optimizer that steps this model's parameters. Without any optimizer step, the end of each
backward pass can be the step boundary (`watch_backward`).

Hooks never travel with the model: `copy.deepcopy(model)` (EMA copies) and `torch.save(model)` see
the modules as if the agent were not attached (see `_CopyWithoutAgentHooks`).
"""

from __future__ import annotations

import fnmatch
import logging
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .errors import DISABLE_AFTER, ErrorCounter
from .overhead import AgentClock
from .stats.kinds import CHANNELS_FIRST, OutputKind, first_tensor, output_kind

log = logging.getLogger("gradflow_agent")

# A layer whose hook fails this many calls in a row is unhooked (the others go on): the same limit as
# every other component (errors.DISABLE_AFTER), counted per layer.
HOOK_DISABLE_AFTER = DISABLE_AFTER


def in_backward() -> bool:
    """True while autograd runs backward: activation checkpointing re-runs forwards there."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - older torch
        return False


@dataclass(frozen=True)
class Layer:
    index: int
    name: str
    module: nn.Module
    type_name: str
    kind: OutputKind


def select_layers(model: nn.Module, modules_cfg) -> tuple[list[Layer], int]:
    """Layers to monitor, in model order, and how many more matched but were left out by the cap.

    A module qualifies when it matches the include/exclude globs and the type list, and is a leaf or
    directly owns parameters (MultiheadAttention's in_proj_weight, an LSTM's weights). A selection
    that matches no module is a ConfigError (a silent zero-layer attach monitors nothing); an include
    glob that matches no module is logged once.
    """
    chosen: list[Layer] = []
    skipped = 0
    types = set(modules_cfg.types)
    names: list[str] = []
    used_globs: set[str] = set()
    for name, module in model.named_modules():
        label = name or "(root)"
        is_leaf = next(module.children(), None) is None
        owns = next(module.parameters(recurse=False), None) is not None
        if modules_cfg.leaf_only and not (is_leaf or owns):
            continue
        if not modules_cfg.leaf_only and module is model and not owns:
            continue
        names.append(label)
        matched = [g for g in modules_cfg.include if fnmatch.fnmatchcase(label, g)]
        used_globs.update(matched)
        if not matched:
            continue
        if any(fnmatch.fnmatchcase(label, g) for g in modules_cfg.exclude):
            continue
        if types and type(module).__name__ not in types:
            continue
        if type(module).__name__ in modules_cfg.exclude_types:
            continue
        chosen.append(Layer(len(chosen), label, module, type(module).__name__, output_kind(module)))
    if len(chosen) > modules_cfg.max_layers:
        chosen, skipped = _spread(chosen, modules_cfg.max_layers), len(chosen) - modules_cfg.max_layers
    unused = [g for g in modules_cfg.include if g not in used_globs]
    if not chosen:
        example = ", ".join(repr(n) for n in names[:4]) or "none"
        raise ConfigError(f"modules: include {list(modules_cfg.include)}, exclude {list(modules_cfg.exclude)}, "
                          f"types {list(modules_cfg.types)} select no layer of {type(model).__name__} "
                          f"(its layers are named like {example})")
    if unused:
        log.warning("gradflow_agent: modules.include globs %s match no module of %s", unused,
                    type(model).__name__)
    return chosen, skipped


def _spread(layers: list[Layer], cap: int) -> list[Layer]:
    """`cap` layers evenly spaced over the whole depth, first and last included: a cap never leaves the
    output side (or the input side) of the model unmonitored."""
    picks = [0] if cap == 1 else sorted({round(i * (len(layers) - 1) / (cap - 1)) for i in range(cap)})
    return [Layer(j, layers[i].name, layers[i].module, layers[i].type_name, layers[i].kind)
            for j, i in enumerate(picks)]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside trainer wrappers (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer): the one whose step hooks actually fire."""
    seen = 0
    while optimizer is not None and seen < 5:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


# -- hooks never travel with the model ------------------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_OWNED: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()


class _CopyWithoutAgentHooks:
    """A module's instance-level `__reduce_ex__`: deepcopy and pickle see it without the agent's hooks.

    `copy.deepcopy` and `pickle` look `__reduce_ex__` up on the instance, so this covers EMA copies and
    `torch.save(model)` without touching the model's class; the copy or the file carries no agent
    hook (and loads where gradflow_agent is not installed).
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)

    def __call__(self, protocol: int = 2) -> Any:
        module = self._module()
        rv = type(module).__reduce_ex__(module, protocol)
        ours = _OWNED.get(module, set())
        if not (isinstance(rv, tuple) and len(rv) > 2 and isinstance(rv[2], dict)):
            return rv
        state = dict(rv[2])
        state.pop("__reduce_ex__", None)
        for key in _HOOK_DICTS:
            hooks = state.get(key)
            if isinstance(hooks, Mapping) and any(k in ours for k in hooks):
                state[key] = type(hooks)((k, v) for k, v in hooks.items() if k not in ours) \
                    if isinstance(hooks, OrderedDict) else {k: v for k, v in hooks.items() if k not in ours}
        return (*rv[:2], state, *rv[3:])


def _own(module: nn.Module, handle) -> None:
    _OWNED.setdefault(module, set()).add(handle.id)
    if not isinstance(module.__dict__.get("__reduce_ex__"), _CopyWithoutAgentHooks):
        module.__dict__["__reduce_ex__"] = _CopyWithoutAgentHooks(module)


def _disown(module: nn.Module, handle) -> None:
    ids = _OWNED.get(module)
    if ids is not None:
        ids.discard(handle.id)
        if not ids:
            del _OWNED[module]
            if isinstance(module.__dict__.get("__reduce_ex__"), _CopyWithoutAgentHooks):
                del module.__dict__["__reduce_ex__"]


class _ModuleHandle:
    """A module hook handle that also gives the module's copy protection back when removed."""

    def __init__(self, module: nn.Module, handle) -> None:
        self._module = weakref.ref(module)
        self._handle = handle
        self.removed = False
        _own(module, handle)

    @property
    def id(self) -> int:
        return self._handle.id

    def remove(self) -> None:
        self.removed = True
        self._handle.remove()
        module = self._module()
        if module is not None:
            _disown(module, self._handle)


def _put_back(entries: list[tuple[nn.Module, str, _ModuleHandle, Callable]]) -> list:
    """Hooks taken off their modules for an idle stretch - (module, hook dict attribute, handle, hook) -
    back in place under their own handle ids (after any hook added meanwhile, like a new registration);
    those their owner removed meanwhile stay out. Returns the entries still live."""
    live = [entry for entry in entries if not entry[2].removed]
    for module, attr, handle, fn in live:
        getattr(module, attr)[handle.id] = fn
    return live


def add_module_hook(module: nn.Module, hook: Callable, *, pre: bool = False, with_kwargs: bool = False,
                    always_call: bool = False, prepend: bool = False) -> _ModuleHandle:
    """Register a forward (pre-)hook that deepcopy/pickle of the model never carries. Every hook the
    agent or its plug-ins put on a model goes through here. `prepend`: before the hooks already there."""
    if pre:
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs, prepend=prepend)
    else:
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs, always_call=always_call)
    return _ModuleHandle(module, handle)


def compiled_anything() -> bool:
    """Has torch.compile compiled any frame in this process? (torch.optim alone imports dynamo.)"""
    convert = sys.modules.get("torch._dynamo.convert_frame")
    return bool(getattr(getattr(convert, "input_codes", None), "seen", None))


def reset_compiled_code() -> int:
    """Drop torch.compile's compiled code in this process; returns how many code objects had some.

    Dynamo's guards ignore module hook dicts, so code compiled before attach never runs the agent's hooks,
    and code compiled while attached keeps the hooks' ops after detach. Resetting makes the next call
    recompile once with the hooks as they are now. A no-op when nothing was compiled."""
    if "torch._dynamo.convert_frame" not in sys.modules:  # nothing was ever compiled (and no import cost)
        return 0
    try:
        import torch._dynamo
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as entries
        from torch._dynamo.convert_frame import input_codes
    except (ImportError, AttributeError):  # pragma: no cover - torch without dynamo
        return 0
    codes = [ref() for ref in list(getattr(input_codes, "seen", []))]
    compiled = [c for c in codes if c is not None and entries(c)]
    for code in compiled:
        torch._dynamo.reset_code(code)
    return len(compiled)


def tensors_of(output: object) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, a tuple/list, or a mapping (Hugging Face ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    return []


class HandleSet:
    """Base of the classes that own hook handles (in `self._handles`): removes them all at once."""

    _handles: list

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def handle_count(self) -> int:
        return len(self._handles)


class HookManager(HandleSet):
    """Registers and removes every hook; a hook that fails is counted and training goes on.

    Forward passes under `torch.inference_mode()` (Lightning's validation, serving) are not measured,
    by design: they are not training steps, and inference tensors cannot feed the agent's buffers.
    Passes under `torch.no_grad()` are (activation checkpointing runs the first forward there).
    """

    def __init__(self, layers: list[Layer], errors: ErrorCounter,
                 on_activation: Callable[[int, torch.Tensor, bool], None] | None,
                 on_output: Callable[[int, torch.Tensor], None] | None = None,
                 on_activation_traced: Callable[[int, torch.Tensor, bool], None] | None = None,
                 clock: AgentClock | None = None) -> None:
        """`on_activation_traced`: what the hook calls instead while torch.compile traces it (device ops only);
        `clock`: where the hooks' own time is counted (the agent's)."""
        self.layers = layers
        self.errors = errors
        self.on_activation = on_activation
        self.on_activation_traced = on_activation_traced
        self.on_output = on_output
        self.active = True  # statistics are computed on this step
        self._idle = False  # forward hooks taken off for a stretch of unmeasured steps (`idle`)
        self._never_idle = False
        self.clock = clock if clock is not None else AgentClock()
        self._handles: list = []
        self._channels_first = False  # layout of the latest parametric layer's output
        self._optimizer: torch.optim.Optimizer | None = None
        self._owned_params: set[int] = set()
        self.claims: Callable[[torch.optim.Optimizer], None] | None = None  # set by the agent
        self._fails = [0] * len(layers)  # consecutive failures per layer
        # other hooks that idle with the forward hooks, as `_forward_entries` are kept (`_put_back`)
        self._idle_with: list[tuple[nn.Module, str, _ModuleHandle, Callable]] = []
        self._on_backward_end: Callable[[], None] | None = None
        self._backward_task = -2  # graph task whose end is already queued

    # -- activations ----------------------------------------------------------------------------------
    def attach_forward(self) -> None:
        hooks = [self._forward_hook(layer) for layer in self.layers]
        self._forward_handles = [add_module_hook(layer.module, fn) for layer, fn in zip(self.layers, hooks)]
        self._forward_entries = [(layer.module, "_forward_hooks", handle, fn)
                                 for layer, handle, fn in zip(self.layers, self._forward_handles, hooks)]
        self._handles.extend(self._forward_handles)
        self._idle = False

    def _detach_forward(self) -> None:
        if self._idle:  # the hooks idling with these stay: back in place before the layer hooks go
            self._idle_with = _put_back(self._idle_with)
        gone = set(map(id, self._forward_handles))
        for handle in self._forward_handles:
            handle.remove()
        self._handles = [h for h in self._handles if id(h) not in gone]  # one pass, not a remove() per hook
        self._forward_handles = []
        self._forward_entries = []
        self._idle = False

    def reattach_forward(self) -> None:
        """Move the forward hooks to the end of each module's hooks: after those a later wrapper added
        (tensor parallelism turns outputs into DTensors and back in its own hooks), so they see the local
        outputs the model computes with. Called when the parameters were replaced after attach."""
        if not getattr(self, "_forward_handles", None):
            return
        self._detach_forward()
        self.attach_forward()

    def idle(self, idle: bool) -> None:
        """Steps whose activations are not measured: take the forward hooks off for the stretch, since a
        module with hooks takes PyTorch's slow call path (~3 us each, 1000 layers ~3-7 ms per step) even
        when the hook returns at once. The hooks leave and re-enter their modules' hook dicts under their
        own handle ids - no handle, closure or weak reference is made or dropped (registering 1000 hooks
        anew allocates enough to set off the garbage collector's full passes, ~150 ms each). Only while
        nothing was compiled in this process (compiled graphs do not see hook changes); once something
        is, the hooks go back for good and compiled code is reset once, so that it traces them."""
        if getattr(self, "_forward_handles", None) is None or self._never_idle:
            return
        if compiled_anything():
            self._never_idle = True
            if self._idle:
                self._resume_forward()
                reset_compiled_code()
            return
        if idle and not self._idle:
            for module, attr, handle, _ in (*self._forward_entries, *self._idle_with):
                getattr(module, attr).pop(handle.id, None)
            self._idle = True
        elif not idle and self._idle:
            self._resume_forward()

    def idle_with(self, module: nn.Module, handle, fn: Callable, *, pre: bool = False) -> None:
        """Another forward (pre-)hook of the agent's (`handle` from `add_module_hook`) that is only
        needed on measured steps: it comes off and back with the layer hooks."""
        self._idle_with.append((module, "_forward_pre_hooks" if pre else "_forward_hooks", handle, fn))

    def _resume_forward(self) -> None:
        self._forward_entries = _put_back(self._forward_entries)
        self._idle_with = _put_back(self._idle_with)
        self._idle = False

    def remove(self) -> None:
        self._idle_with = []  # their owners remove them: never put back after this
        super().remove()

    def _forward_hook(self, layer: Layer):
        sets_layout = next(layer.module.parameters(recurse=False), None) is not None
        layout = isinstance(layer.module, CHANNELS_FIRST)
        index, observe, watch, errors, fails = layer.index, self.on_activation, self.on_output, self.errors, \
            self._fails
        observe_traced = self.on_activation_traced
        clock = self.clock

        def hook(module, inputs, output):
            if torch.compiler.is_compiling():  # traced into the user's graph: device ops only, no break
                if self.active and fails[index] >= 0:
                    y = first_tensor(output)
                    if y is not None and observe_traced is not None:
                        observe_traced(index, y, self._channels_first)
                    if sets_layout or layout:
                        self._channels_first = layout
                return
            if not self.active or fails[index] < 0 or torch.is_inference_mode_enabled():
                return
            t0 = time.perf_counter()
            try:
                y = first_tensor(output)
                if y is not None:
                    # a checkpointed region re-runs its forward during backward: the statistics were taken
                    # in the first pass, but the re-run output is the one whose gradient is computed
                    # (reentrant checkpointing runs the first pass under no_grad)
                    if observe is not None and not in_backward():
                        observe(index, y, self._channels_first)
                    if watch is not None:
                        watch(index, y)
                if sets_layout or layout:
                    self._channels_first = layout
                if fails[index]:
                    fails[index] = 0
            except Exception as exc:  # never hurt the run
                errors.record("hook", exc)
                fails[index] += 1
                if fails[index] >= HOOK_DISABLE_AFTER:
                    fails[index] = -1
                    log.warning("gradflow_agent: the hook of layer %r failed %d times in a row; that layer is "
                                "no longer measured", layer.name, HOOK_DISABLE_AFTER)
            clock.seconds += time.perf_counter() - t0  # hooks never nest in agent sections: added directly

        return hook

    @property
    def disabled_layers(self) -> list[str]:
        return [layer.name for layer, f in zip(self.layers, self._fails) if f < 0]

    # -- end of backward (a step boundary for loops without an optimizer step) ------------------------
    def watch_backward(self, model: nn.Module, on_end: Callable[[], None]) -> None:
        """Call `on_end` once at the end of every backward pass through `model`'s outputs.

        A tensor hook on each output starts it; `queue_callback` runs it once autograd has finished the
        whole graph (every gradient accumulated). Turned off with `stop_watching_backward`."""
        self._on_backward_end = on_end
        self._handles.append(add_module_hook(model, self._root_forward_hook))

    def stop_watching_backward(self) -> None:
        self._on_backward_end = None

    def _root_forward_hook(self, module, inputs, output) -> None:
        # not traced into a compiled graph (a graph break); compiled loops step an optimizer anyway
        if torch.compiler.is_compiling() or self._on_backward_end is None or not torch.is_grad_enabled() \
                or in_backward():
            return
        try:
            for t in tensors_of(output):
                if t.requires_grad:
                    t.register_hook(self._output_grad_seen)
        except Exception as exc:
            self.errors.record("backward_hook", exc)

    def _output_grad_seen(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._backward_task and self._on_backward_end is not None:
            self._backward_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        self._backward_task = -2
        fn = self._on_backward_end
        if fn is not None:
            with self.clock:
                self.errors.guard("backward_boundary", fn)

    # -- optimizer step boundary ---------------------------------------------------------------------
    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter],
                         pre: Callable[[], None], post: Callable[[], None]) -> None:
        self._owned_params = {id(p) for p in params}

        clock, guard = self.clock, self.errors.guard

        def guarded(fn, name):
            def run(opt, args, kwargs):
                if opt is not self._optimizer and not self._is_ours(opt):
                    return
                with clock:
                    guard(name, fn)
            return run

        if optimizer is not None:
            self._optimizer = optimizer
            self._handles.append(optimizer.register_step_pre_hook(guarded(pre, "optimizer_pre_hook")))
            self._handles.append(optimizer.register_step_post_hook(guarded(post, "optimizer_post_hook")))
        else:
            from torch.optim.optimizer import (
                register_optimizer_step_post_hook,
                register_optimizer_step_pre_hook,
            )
            self._handles.append(register_optimizer_step_pre_hook(guarded(pre, "optimizer_pre_hook")))
            self._handles.append(register_optimizer_step_post_hook(guarded(post, "optimizer_post_hook")))

    def rebind(self, params: list[nn.Parameter]) -> None:
        """The model's parameters were replaced (sharding, wrapping): recognise optimizers of the new ones."""
        self._owned_params = {id(p) for p in params}

    def _is_ours(self, opt: torch.optim.Optimizer) -> bool:
        if self._optimizer is not None:
            return opt is self._optimizer
        if self.claims is not None and not any(id(p) in self._owned_params for g in opt.param_groups
                                               for p in g["params"]):
            self.claims(opt)  # parameters replaced since attach (e.g. fully_shard): rebinds when they are ours
        if any(id(p) in self._owned_params for g in opt.param_groups for p in g["params"]):
            self._optimizer = opt  # lock on: one optimizer defines the step
            log.info("gradflow_agent: step boundary: %s.step() (found through the optimizer hooks)",
                     type(opt).__name__)
            return True
        return False

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer
