"""`attach(model)` and the Agent: lifecycle, step boundaries and the interval snapshot.

Data flows one way: hooks -> device buffers (stats/) -> one transfer per export interval -> an
immutable Snapshot -> detectors -> exporters and recorders. The training thread pays for the hooks,
one fold per step and one transfer per interval; exporters read the latest snapshot on their own
threads.

Fault containment: `attach()` is transactional (it returns a working agent or raises one error and
leaves nothing behind); after it, every component runs under `ErrorCounter.guard`, so a failure is
counted, logged once, visible on /metrics at the next snapshot and never raised into training; a
component that keeps failing is disabled. `detach()` is bounded in time whatever the endpoints do.

The step boundary is, in order of preference: the optimizer's step (given, or found through the
process-wide optimizer hooks), `agent.step()` in a loop without an optimizer, or - when neither ever
happens but the weights move (updates by hand) - the end of each backward pass.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ConfigError, Section, check_runtime, load_config
from .detect import diagnose
from .errors import ErrorCounter
from .export import build_exporters
from .export.flight import extra_ring_rows
from .export.flight import wanted as flight_wanted
from .export.worker import DEFAULT_CLOSE_SECONDS
from .hooks import HookManager, add_module_hook, reset_compiled_code, select_layers, unwrap_optimizer
from .overhead import AgentClock, OverheadBudget
from .snapshot import LAYER_STATS, Snapshot
from .stats.activations import ActivationStats
from .stats.engine import LaggedFlag, model_device, transfer
from .stats.gradients import GradientStats
from .stats.nonfinite import NonfiniteOrigin
from .stats.output_grads import OutputGradStats
from .stats.pace import ForwardClock
from .stats.parameters import ParameterStats
from .stats.sharding import identical_across_ranks, is_dtensor, local, world_size

log = logging.getLogger("gradflow_agent")
_NEVER = 1 << 62  # a step number no run reaches
IDLE_PERIOD = 4  # activation periods (in steps) from which the forward hooks come off between measurements

# detach() returns within 2 s whatever any endpoint does: the exporters close concurrently in this budget.
DETACH_BUDGET_SECONDS = DEFAULT_CLOSE_SECONDS


# Agents still attached when the interpreter exits are detached first (bounded): the last snapshot is
# pushed and every thread joined before Python tears threads down under them.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _detach_at_exit() -> None:
    for agent in list(_LIVE):
        with contextlib.suppress(Exception):  # exiting anyway
            agent.detach()


class AttachError(RuntimeError):
    """attach() could not start; nothing was left attached (no hook, thread, port or file)."""


def _distributed() -> tuple[int, int]:
    """(rank, local rank) under torch.distributed, (0, 0) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        return rank, int(os.environ.get("LOCAL_RANK", rank))
    return 0, 0


def _fingerprint(params: list[nn.Parameter]) -> torch.Tensor | None:
    """A few elements of every parameter, on their device: tells whether the weights moved between two
    backward passes."""
    with torch.no_grad():
        parts = [t.detach().reshape(-1)[:: max(1, t.numel() // 8)].float()
                 for t in map(local, params) if t.numel()]
        return torch.cat(parts) if parts else None


class _WeightsMoved:
    """Did the weights move between two backward passes (weights updated without torch.optim)?

    The comparison is a device flag read without a sync (`LaggedFlag`): on CUDA the boundary is found a
    step or two later, with no host synchronisation."""

    def __init__(self) -> None:
        self._last: torch.Tensor | None = None
        self._moved = LaggedFlag()

    def __call__(self, params: list[nn.Parameter]) -> bool:
        now, last = _fingerprint(params), self._last
        self._last = now
        if now is None or last is None or now.shape != last.shape:
            return False
        if now.device.type not in ("cpu", "cuda"):  # no lagged read there: this one syncs
            return not torch.equal(now.cpu(), last.cpu())
        self._moved.push((now != last).any())
        return self._moved.seen()


def _turn_after(step: int, period: int, phases: tuple[int, ...]) -> int:
    """The first step after `step` whose number modulo `period` is one of `phases`: where a cadence turns
    (its measured step, and the one after it or before it). A cadence of every step never turns."""
    if period <= 1:
        return _NEVER
    return step + min((phase - step) % period or period for phase in phases)


def _timed(method):
    """The method's time is the agent's own (AgentClock: counted once however timed methods nest)."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        with self.clock:
            return method(self, *args, **kwargs)
    return timed


@dataclasses.dataclass(frozen=True)
class _StepConfig:
    """The config values the step path reads on every step, looked up once: the config is read-only, and
    each `Section` lookup builds a view (~1-2 us; a dozen per step on a ~1 ms step is ~2%)."""

    parameters: bool
    gradients: bool
    every: int
    export_steps: int
    export_seconds: float


class Agent:
    """Monitors one model; create it with `gradflow_agent.attach(model)`."""

    def __init__(self, model: nn.Module, config: str | os.PathLike | Mapping[str, Any] | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scaler: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None:  # the torch optimizer inside a wrapper (accelerate, Lightning): its hooks fire
            inner = unwrap_optimizer(optimizer)
            if inner is None:
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            optimizer = inner
        self._closed = False
        self.exporters: list = []
        self.plugins: list = []
        self.plugin_layers: list[tuple[str, str]] = []  # (name, type) of layers only plug-ins report
        self.hooks: HookManager | None = None
        try:
            self._start(model, config, optimizer, scaler)
            _LIVE.add(self)
        except BaseException as exc:
            self._teardown(time.monotonic() + DETACH_BUDGET_SECONDS)
            if isinstance(exc, (ConfigError, TypeError, KeyboardInterrupt, SystemExit)):
                raise
            raise AttachError(f"gradflow_agent.attach() failed and left nothing attached: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _start(self, model: nn.Module, config, optimizer, scaler) -> None:
        self.config: Section = load_config(config)
        check_runtime(self.config)
        log.setLevel(self.config.log.level.upper())
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule: the hooks go on the original
            model = model._orig_mod
        self.model = model
        self.scaler = scaler
        self.errors = ErrorCounter()
        self.rank, self.local_rank = _distributed()
        self.device = model_device(model)
        cfg = self.config
        self.run_name = cfg.run.name or "default"
        self.layers, self.layers_skipped = select_layers(model, cfg.modules)
        if self.layers_skipped:
            log.warning("gradflow_agent: modules.max_layers=%d: monitoring %d layers evenly spread over the "
                        "depth, %d left out (gradflow_agent_layers_skipped); raise the cap to see them all",
                        cfg.modules.max_layers, len(self.layers), self.layers_skipped)

        L = len(self.layers)
        every = cfg.sampling.every_n_steps
        self._param_every = every * cfg.stats.parameters.every_n_steps
        # the overhead budget: stretches the activation (then parameter) cadence to keep the agent's share
        self.budget = OverheadBudget(cfg.sampling.overhead_budget, activation_period=cfg.sampling.every_n_steps,
                                     parameter_period=self._param_every if cfg.stats.parameters.enabled else 0)
        self._ring_rows = max(cfg.sampling.window, math.ceil(cfg.sampling.export_every_n_steps / every)) + 1
        self._ring_rows += extra_ring_rows(cfg, self.rank)  # the steps the flight recorder keeps before a trigger
        self.flight = None  # the flight recorder (export/flight.py), set by build_exporters when on
        self.origin = NonfiniteOrigin(self.device)
        self.act = ActivationStats([layer.kind for layer in self.layers], self.device,
                                   margin=cfg.stats.activations.saturation_margin,
                                   dead_units=cfg.stats.activations.dead_units, window=cfg.sampling.window,
                                   sample_elements=cfg.stats.activations.sample_elements, origin=self.origin)
        self._trainable_sig: tuple[bool, ...] = ()
        self._bind_parameters()
        self.out_grad = OutputGradStats(L, self.device)

        self.steps = 0
        self.skipped_optimizer_steps = 0
        self._optimizer_steps = 0
        self._scale_base = self._scale_version()
        self._opt_stepped = False  # an optimizer step happened since the last agent.step()
        # A snapshot due at an optimizer step waits for the agent.step(loss=) that follows it (when the
        # user calls one), so that an interval's loss is the loss of its own steps.
        self._follows_with_step = False
        self._publish_waiting = False
        self._losses: list[torch.Tensor | float] = []
        self._last_loss: float | None = None
        self._interval_start = 0
        self._last_publish = time.monotonic()
        self.clock = AgentClock()  # the agent's own time on the training thread (the overhead budget)
        self._lock = threading.RLock()
        self._latest: Snapshot | None = None
        self.boundary = "optimizer" if optimizer is not None else "unknown"
        self._computed = True  # gradients are read on this step (sampling.every_n_steps)
        self._next_event = 0  # the next step whose boundary does more than count (`_follow_cadences`)
        self._parameters_next = self._param_due(1)  # the next step is on the parameter cadence (kept by
        # `_follow_cadences`, at the turns)
        self._weights_moved = _WeightsMoved()

        output_grads = cfg.stats.gradients.enabled and cfg.stats.gradients.output_grads
        activations = cfg.stats.activations.enabled
        self.hooks = HookManager(self.layers, self.errors, self.act.observe if activations else None,
                                 self.out_grad.watch if output_grads else None,
                                 self.act.observe_traced if activations else None, self.clock)
        if cfg.stats.activations.enabled or output_grads:
            self.hooks.attach_forward()
        self.hooks.claims = self._claims
        self.hooks.attach_optimizer(optimizer, self._all_params, self._before_optimizer_step,
                                    self._after_optimizer_step)
        if optimizer is None:
            self.hooks.watch_backward(model, self._backward_ended)
        self.forward_clock = ForwardClock(model, self.device)
        self.forward_clock.idle_with(self.hooks, model)
        # before the wrappers' own pre-forward hooks (FSDP2 unshards the parameters in its own)
        self._first_forward = add_module_hook(model, self._on_first_forward, pre=True, prepend=True)
        if cfg.stats.parameters.enabled and self._param_due(1):
            self.param.take_before()
        self.exporters = build_exporters(self)
        if cfg.dynamics.enabled:
            from .dynamics import dynamics_from_config
            dynamics_from_config(self)
        if cfg.stats.attention.enabled:
            from .integrations.attention import AttentionPlugin
            self.add_plugin(AttentionPlugin(model))
        if cfg.stats.moe.enabled:  # only when the model has routers (docs/moe.md)
            from .integrations.moe import moe_plugin
            moe = moe_plugin(model, cfg.stats.moe)
            if moe is not None:
                self.add_plugin(moe)
        if reset_compiled_code():
            log.info("gradflow_agent: torch.compile'd code already existed; it recompiles once at its next call "
                     "so that the agent's statistics are traced into the graph")
        self._publish(self._snapshot(strict=True))  # the endpoint serves the layer list from the start

    def _bind_parameters(self) -> None:
        """(Re)build the parameter-side statistics over the model's parameters as they are now.

        Every parameter, frozen ones too: a layer unfrozen mid-run is read from its first gradient. Run at
        attach and whenever the model's parameters were replaced (FSDP2 `fully_shard` or DDP wrapping
        after attach, `to_empty`, LoRA injection): nothing is read from stale tensors."""
        L = len(self.layers)
        self._owner = self._owners()
        self._all_params = self._model_params()
        self._param_ids = {id(p) for p in self._all_params}
        self.grad = GradientStats(self._all_params, [self._owner.get(id(p), L) for p in self._all_params], L,
                                  self.device, rows=self._ring_rows, window=self.config.sampling.window,
                                  origin=self.origin, keep_recent=flight_wanted(self.config, self.rank))
        self.param = self._parameter_stats()
        self.sharded = self.grad.shards.any and torch.distributed.is_available() and \
            torch.distributed.is_initialized()
        # a data-parallel job: activation reductions are combined over the ranks at each snapshot and
        # every per-layer series is exported once, by rank 0 (exporters.prometheus.per_rank)
        self.combined = world_size() > 1 and identical_across_ranks(
            self.sharded, str(self.config.exporters.prometheus.per_rank))
        self.collective_snapshots = self.sharded or self.combined  # snapshot steps agreed between the ranks
        # the ranks' sharded parameter squares meet in one collective: every rank measures on the same steps
        self.budget.stretch_parameters = not self.collective_snapshots
        self._next_sync_step = getattr(self, "steps", 0) + min(self.config.sampling.export_every_n_steps, 10)
        if getattr(self, "hooks", None) is not None:
            self.hooks.rebind(self._all_params)
            self.hooks.reattach_forward()  # after the hooks of the wrapper that replaced the parameters

    def _params_replaced(self) -> bool:
        """The model's parameters are no longer the ones bound (checked on the parameter cadence and when an
        optimizer steps parameters the agent does not know): rebind and say so once per change."""
        current = self._model_params()
        if len(current) == len(self._all_params) and all(a is b for a, b in zip(current, self._all_params)):
            return False
        log.warning("gradflow_agent: the model's parameters were replaced after attach (%d -> %d tensors%s); "
                    "the agent now reads the new ones", len(self._all_params), len(current),
                    ", sharded" if any(is_dtensor(p) for p in current) else "")
        self._bind_parameters()
        if self.config.stats.parameters.enabled:
            self.param.take_before()
        return True

    def _on_first_forward(self, module: nn.Module, inputs: tuple) -> None:
        """Parameters replaced between attach and the first forward (fully_shard, parallelize_module,
        wrapping) are rebound before it, so that the first step is measured as the later ones (the
        forward hooks then run after the wrapper's). Once; never inside a compiled graph."""
        if torch.compiler.is_compiling():
            return
        handle, self._first_forward = self._first_forward, None
        if handle is not None:
            handle.remove()
            self.errors.guard("rebind", self._params_replaced)

    def _claims(self, opt: torch.optim.Optimizer) -> None:
        """An optimizer of parameters the agent does not know steps: rebind if they are the model's now."""
        ids = {id(p) for p in self.model.parameters()}
        if any(id(p) in ids for g in opt.param_groups for p in g["params"]):
            self._params_replaced()

    def _owners(self) -> dict[int, int]:
        """id(parameter) -> index of the layer that owns it."""
        owner: dict[int, int] = {}
        for layer in self.layers:
            recurse = next(layer.module.children(), None) is None
            for p in layer.module.parameters(recurse=recurse):
                owner.setdefault(id(p), layer.index)
        return owner

    def _model_params(self) -> list[nn.Parameter]:
        """The model's parameters, each once (`parameters()` already leaves shared ones out)."""
        return list(self.model.parameters())

    def _parameter_stats(self) -> ParameterStats:
        """Norms and update ratios over the parameters trained now (requires_grad)."""
        trainable = [p for p in self._all_params if p.requires_grad]
        self._trainable_sig = tuple(p.requires_grad for p in self._all_params)
        cfg = self.config.stats.parameters
        return ParameterStats(trainable, [self._owner.get(id(p), len(self.layers)) for p in trainable],
                              len(self.layers), self.device, mode=cfg.update_ratio, sample_size=cfg.sample_size,
                              seed=cfg.seed, origin=self.origin)

    def _trainable_changed(self) -> bool:
        """A layer was frozen or unfrozen since the parameter statistics were built: rebuild them."""
        if tuple(p.requires_grad for p in self._all_params) == self._trainable_sig:
            return False
        old = self.param
        self.param = self._parameter_stats()
        self.param.carry_over(old)
        log.info("gradflow_agent: the trainable parameters changed at step %d (%d now trainable)",
                 self.steps, len(self.param.params))
        return True

    # -- step boundaries --------------------------------------------------------------------------------
    @functools.cached_property
    def _step_cfg(self) -> _StepConfig:
        c = self.config
        return _StepConfig(c.stats.parameters.enabled, c.stats.gradients.enabled, c.sampling.every_n_steps,
                           c.sampling.export_every_n_steps, c.sampling.export_every_seconds)

    def _param_due(self, step: int) -> bool:
        every = self.parameter_every
        return bool(every) and step % every == 0

    @property
    def activation_every(self) -> int:
        """Activations are measured on every k-th computed step (k raised by the overhead budget)."""
        return self.budget.activations

    @property
    def activation_every_steps(self) -> int:
        """Activations are measured on every n-th step: the computed-step cadence times the budget's stretch."""
        return self.activation_every * self._step_cfg.every

    @property
    def parameter_every(self) -> int:
        """Parameter statistics are measured on every n-th step (n raised by the overhead budget; 0: off)."""
        return self._param_every * self.budget.parameters if self._step_cfg.parameters else 0

    def _read_gradients(self) -> None:
        if self.hooks.active:
            self.errors.guard("activations", self.act.fold)  # this step's forward comes first
        if self._computed and self._step_cfg.gradients:
            self.errors.guard("gradients", self.grad.read, self._parameters_next, self.steps + 1)

    def _before_optimizer_step(self) -> None:
        opt = self.hooks.optimizer
        groups = opt.param_groups if opt is not None else None
        if groups and groups[0]["params"] and id(groups[0]["params"][0]) not in self._param_ids:
            self._params_replaced()
        self._read_gradients()

    def _after_optimizer_step(self) -> None:
        self._opt_stepped = True
        self._optimizer_steps += 1
        if self.boundary != "optimizer":
            self._set_boundary("optimizer")
        self._boundary()

    def _set_boundary(self, kind: str) -> None:
        """Say once which step boundary is in use (and stop watching backward passes when not needed)."""
        self.boundary = kind
        if kind != "backward":
            self.hooks.stop_watching_backward()
        if kind == "agent_step":
            log.info("gradflow_agent: step boundary: agent.step() (no optimizer step seen)")
        elif kind == "backward":
            log.info("gradflow_agent: step boundary: the end of each backward pass (the weights change "
                     "without a torch.optim step; call agent.step() to choose the boundary yourself)")

    def _backward_ended(self) -> None:
        """End of a backward pass (autograd callback): a boundary when weights are updated by hand."""
        if self.boundary == "unknown" and not self._closed and self._weights_moved(self._all_params):
            self._set_boundary("backward")
        if self.boundary == "backward" and not self._closed:
            self._read_gradients()
            self._boundary()

    def _scale_version(self) -> int:
        scale = getattr(self.scaler, "_scale", None)
        return scale._version if isinstance(scale, torch.Tensor) else 0

    def _count_scaler_skips(self) -> None:
        """GradScaler.update() changes the scale in place once per step: updates without an optimizer step
        are steps the scaler skipped (inf/NaN gradients). Host-side version counters: no sync."""
        if self.scaler is None or getattr(self.scaler, "_scale", None) is None:
            return
        updates = self._scale_version() - self._scale_base
        self.skipped_optimizer_steps = max(self.skipped_optimizer_steps, updates - self._optimizer_steps)

    @_timed
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Mark the end of a training step (optional when an optimizer steps) and record the loss.

        With an optimizer, this only records the loss: call it on every micro-batch or once per step,
        the step is the optimizer's. Without any optimizer, it is the step boundary and the gradients are
        read here, so call it before `zero_grad()`.
        """
        if self._closed:
            return
        try:
            if loss is not None:
                self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))
                if self.flight is not None:  # the step this loss belongs to: after an optimizer step, its own
                    self.errors.guard("flight_recorder", self.flight.note_loss,
                                      self.steps if self._opt_stepped else self.steps + 1, self._losses[-1])
            if self.scaler is not None:
                self._count_scaler_skips()
            if self._opt_stepped:
                self._opt_stepped = False
                self._follows_with_step = True
                if self._publish_waiting:
                    self._publish_waiting = False
                    self._publish(self._snapshot())
            elif self.boundary == "optimizer" or self.scaler is not None:
                pass  # a micro-batch of an accumulated step, or a step the GradScaler skipped
            else:
                if self.boundary != "agent_step":
                    self._set_boundary("agent_step")
                self._read_gradients()
                self._boundary()
        except Exception as exc:
            self.errors.record("step", exc)

    def _boundary(self) -> None:
        """The end of a step. Not timed itself: each caller is (the optimizer post-hook, the end of the
        backward pass, `step()`), and a nested section would only add the clock's own cost."""
        t0 = time.perf_counter()
        guard, hooks = self.errors.guard, self.hooks
        with self._lock:
            if hooks.active:
                guard("activations", self.act.end_step)
            self.steps = steps = self.steps + 1
            self.origin.step = steps  # the weights after this step's update
            if steps >= self._next_event:  # a cadence turns
                if self._step_cfg.parameters:
                    guard("parameters", self._parameter_boundary)
                self._follow_cadences(steps)
            self.origin.step = steps + 1  # the next step's forward and backward
            if self.budget.step_ended(t0, self.clock.seconds):
                self._cadence_changed()
                self._follow_cadences(steps)
            for plugin in self.plugins:
                guard(plugin.name, plugin.on_step, self)
            due = self._due()
        if due or self._publish_waiting:
            if self._opt_stepped and self._follows_with_step and not self._publish_waiting:
                self._publish_waiting = True  # published by the agent.step() that follows
            else:
                self._publish_waiting = False
                self._publish(self._snapshot())

    def _follow_cadences(self, steps: int) -> None:
        """After step `steps`: is the next step computed, are its activations measured (and the hooks off
        for a stretch of unmeasured ones), and the next step whose boundary has more to do than count
        (`_next_event`) - a cadence turning on or off, or the parameters due or sampled before it. The
        boundaries in between only count: in place, cold after the backward, each statement of the step
        path costs about a microsecond."""
        every = self._step_cfg.every
        period = every * self.budget.activations
        self._computed = steps % every == 0
        self.hooks.active = active = steps % period == 0
        # a stretch of 3+ unmeasured steps pays for taking the hooks off and back on
        self.hooks.idle(period >= IDLE_PERIOD and not active)
        params = self.parameter_every
        self._parameters_next = self._param_due(steps + 1)  # a turn itself: valid until the next one
        turns = [_turn_after(steps, every, (0, 1)), _turn_after(steps, period, (0, 1))]
        if params == 1:  # measured on every step
            turns.append(steps + 1)
        elif params:
            turns.append(_turn_after(steps, params, (0, params - 1)))
        self._next_event = min(turns)

    def _cadence_changed(self) -> None:
        """The overhead budget changed a cadence: the parameter sample is retaken now when the next step is
        due under the new cadence (coming down to every step, it would otherwise measure no ratio there),
        and dropped when it is not (it is retaken the step before the next due one)."""
        if self._step_cfg.parameters:
            self.param.drop_before()
            if self._param_due(self.steps + 1):
                self.errors.guard("parameters", self.param.take_before)

    def _due(self) -> bool:
        """Is a snapshot due after this step? With sharded parameters (or activations combined over the
        ranks) the snapshot holds a collective, so
        every rank must decide alike: a step count agreed at the previous snapshot replaces the clock."""
        if self.collective_snapshots:
            return self.steps >= self._next_sync_step
        cfg = self._step_cfg
        return (self.steps - self._interval_start >= cfg.export_steps
                or time.monotonic() - self._last_publish >= cfg.export_seconds)

    def _agree_next_snapshot(self, interval: int) -> None:
        """Sharded runs: the next snapshot step, from the mean step time over the ranks (one small
        collective, in the snapshot every rank is in), so that `export_every_seconds` still holds."""
        cfg = self.config.sampling
        elapsed = time.monotonic() - self._last_publish
        t = torch.tensor([elapsed, float(interval)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        seconds, steps = float(t[0]), float(t[1])
        per_step = seconds / steps if steps > 0 else 0.0
        k = cfg.export_every_n_steps if per_step <= 0 else round(cfg.export_every_seconds / per_step)
        self._next_sync_step = self.steps + max(1, min(int(k), cfg.export_every_n_steps))

    def _parameter_boundary(self) -> None:
        measure, before = self._param_due(self.steps), self._param_due(self.steps + 1)
        if not (measure or before):
            return
        if self._params_replaced():
            return
        if self._trainable_changed():  # the sample taken before no longer matches: start again
            if before:
                self.param.take_before()
            return
        if measure:
            self.param.measure(keep_as_before=before)
        else:
            self.param.take_before()

    # -- snapshots --------------------------------------------------------------------------------------
    def _components(self) -> list[tuple[str, Any]]:
        return [("activations", self.act), ("gradients", self.grad), ("parameters", self.param),
                ("output_grads", self.out_grad), ("nonfinite_origin", self.origin)]

    @_timed
    def _snapshot(self, strict: bool = False) -> Snapshot:
        """Fold, transfer once, and build the interval snapshot (with its diagnosis).

        Each component is guarded: one that fails leaves its statistics unknown (NaN, never healthy) and
        the snapshot, with its error counts, is still published. `strict` (at attach) raises instead."""
        failed: list[str] = []

        def run(component, fn, *args):
            if strict:
                return fn(*args)
            if not self.errors.enabled(component):
                failed.append(component)
                return None
            out = self.errors.guard(component, fn, *args, default=failed, resets=False)
            if out is failed:
                failed.append(component)
                return None
            return out

        with self._lock:
            losses, self._losses = self._losses, []
            components = self._components()
            if self.combined:
                run("activations", self.act.combine_across_ranks)
            parts = [run(name, obj.device_parts) for name, obj in components]
            loss_parts = run("loss", self._loss_parts, losses) or []
            scale = [self.scaler._scale.reshape(-1)[:1]] if isinstance(getattr(self.scaler, "_scale", None),
                                                                       torch.Tensor) else []
            groups = [p or [] for p in parts] + [loss_parts, scale]
            host = run("transfer", transfer, groups, self.device)
            if host is None:
                host = [[] for _ in groups]
                parts = [None] * len(parts)
            stats: dict[str, Any] = {}
            origin = None
            for (name, obj), p, h in zip(components, parts, host):
                if p is None:
                    continue
                result = run(name, obj.finish, h)
                if name == "nonfinite_origin":
                    origin = result
                elif result is not None:
                    stats.update(result)
            loss_host = host[len(components)]
            if loss_host:  # an interval without a loss keeps the last one (None until a loss is given)
                self._last_loss = float(loss_host[0][0])
            scale_host = host[len(components) + 1]
            interval = self.steps - self._interval_start
            if self.collective_snapshots and not strict:
                run("schedule", self._agree_next_snapshot, interval)
            self._interval_start = self.steps
            self._last_publish = time.monotonic()
            self._count_scaler_skips()
        degraded = tuple(sorted(set(failed) | (self.errors.disabled & {n for n, _ in components})))
        snap = self._build(stats, origin, interval, scale_host, degraded, strict)
        if self.flight is not None:  # right after the transfer: an incident's rows leave a device with an empty queue
            self.errors.guard("flight_recorder", self.flight.capture, snap, self.grad, resets=False)
        return snap

    def _loss_parts(self, losses: list) -> list[torch.Tensor]:
        """The interval's mean loss (each step's loss averaged over its elements first), on the device:
        one stack for all the loss tensors, not three ops per loss (3.3 ms against 0.4 for a 500-step
        interval on the CPU: `python bench/hot_path.py`)."""
        if not losses:
            return []
        tensors = [x for x in losses if isinstance(x, torch.Tensor)]
        floats = [float(x) for x in losses if not isinstance(x, torch.Tensor)]
        total = torch.tensor(math.fsum(floats), dtype=torch.float64).to(self.device) if floats else 0.0
        if tensors:
            try:
                stacked = torch.stack(tensors).to(self.device, torch.float64)
            except RuntimeError:  # losses of different shapes or on different devices
                stacked = torch.stack([t.to(self.device, torch.float64).mean() for t in tensors])
            per_step = stacked if stacked.dim() == 1 else stacked.flatten(1).mean(1)
            total = total + per_step.sum()
        return [(total / len(losses)).reshape(1)]

    def _build(self, stats: dict, origin, interval: int, scale_host: list, degraded: tuple[str, ...],
               strict: bool) -> Snapshot:
        L = len(self.layers)
        zeros = np.zeros(L)
        counters = {
            "steps_total": float(self.steps),
            "overhead_seconds_total": self.clock.seconds,
            "errors_total": float(self.errors.total),
            "layers": float(L),
            "layers_skipped": float(self.layers_skipped),
            "optimizer_steps_skipped_total": float(self.skipped_optimizer_steps),
            "activation_every_steps": float(self.activation_every_steps),
            "parameter_every_steps": float(self.parameter_every),
            "overhead_ratio": float(self.budget.current_share),
        }
        if scale_host:
            counters["grad_scale"] = float(scale_host[0][0])
        clock = getattr(self, "forward_clock", None)
        forward = self.errors.guard("forward_clock", clock.take, default=math.nan) if clock else math.nan
        if forward == forward:
            counters["forward_seconds"] = float(forward)
        extra = []
        for plugin in self.plugins:
            extra.extend(self.errors.guard(plugin.name, plugin.collect, default=()) or ())
        grad_norm = stats.get("grad_norm", float("nan"))
        names, types, columns = self._layer_columns(stats)
        pad = np.zeros(len(names) - L)
        snap = Snapshot(
            step=self.steps, time=time.time(), interval_steps=interval,
            layers=names, layer_types=types, stats=columns,
            nonfinite={t: np.concatenate([np.asarray(stats.get(f"nonfinite_{t}", zeros), dtype=np.float64), pad])
                       for t in ("grad", "activation", "param")},
            grad_norm=grad_norm, loss=self._last_loss,
            counters=counters, errors=dict(self.errors.counts), extra=tuple(extra),
            nonfinite_origin=origin, degraded=degraded,
            disabled=tuple(sorted(self.errors.disabled)) + tuple(f"hook:{n}" for n in self.hooks.disabled_layers),
        )
        if strict:
            return diagnose(snap, self.config.thresholds)
        diagnosed = self.errors.guard("detect", diagnose, snap, self.config.thresholds)
        if diagnosed is None:  # issues unknown: no health score is exported rather than a healthy one
            return dataclasses.replace(snap.with_diagnosis((), np.full(len(names), np.nan)),
                                       errors=dict(self.errors.counts), degraded=(*snap.degraded, "detect"))
        return diagnosed

    def _layer_columns(self, stats: dict) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, np.ndarray]]:
        """The snapshot's layers and per-layer statistics: the hooked layers, then the layers only plug-ins
        report (attention modules, routers the agent does not hook), added when a plug-in first lists them
        in `plugin.layers` and kept from then on. A plug-in's `layer_statistics()` -> {statistic: {layer:
        value}} (read after its `collect()`, so from the same transfer) fills those LAYER_STATS columns: the
        rule table judges them like the agent's own statistics."""
        names = [layer.name for layer in self.layers]
        types = [layer.type_name for layer in self.layers]
        L = len(names)
        seen = set(names) | {n for n, _ in self.plugin_layers}
        reported = []
        for plugin in self.plugins:
            if not hasattr(plugin, "layer_statistics"):
                continue
            for name, type_name in self.errors.guard(plugin.name, lambda p=plugin: tuple(p.layers), default=()) or ():
                if name not in seen:
                    seen.add(name)
                    self.plugin_layers.append((name, type_name))
            reported.append(self.errors.guard(plugin.name, plugin.layer_statistics, default=None) or {})
        names += [n for n, _ in self.plugin_layers]
        types += [t for _, t in self.plugin_layers]
        index = {n: i for i, n in enumerate(names)}
        columns = {}
        for k in LAYER_STATS:
            col = np.full(len(names), np.nan)
            col[:L] = np.asarray(stats.get(k, np.nan), dtype=np.float64)
            columns[k] = col
        for values in reported:
            for key, per_layer in values.items():
                for name, value in per_layer.items() if key in columns else ():
                    if name in index:
                        columns[key][index[name]] = value
        return tuple(names), tuple(types), columns

    def _publish(self, snap: Snapshot) -> None:
        self._latest = snap
        for exporter in self.exporters:
            self.errors.guard(_component(exporter), exporter.publish, snap)

    # -- public API -------------------------------------------------------------------------------------
    @_timed
    def read_gradients(self) -> None:
        """Read the gradients now, as the optimizer step pre-hook does: for trainer integrations that own
        the step boundary (e.g. Lightning's `on_before_optimizer_step`). Follow with `end_optimizer_step`."""
        self.errors.guard("read_gradients", self._before_optimizer_step)

    @_timed
    def end_optimizer_step(self) -> None:
        """Mark an optimizer step as done, as the optimizer step post-hook does (integrations)."""
        self.errors.guard("end_optimizer_step", self._after_optimizer_step)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No activation statistics inside this block (evaluation, or a plug-in's own forward passes)."""
        previous = self.hooks.active
        self.hooks.active = False
        try:
            yield
        finally:
            self.hooks.active = previous

    def add_plugin(self, plugin) -> None:
        """Run a plug-in inside the agent: `plugin.on_step(agent)` at every step boundary (training
        thread), `plugin.collect()` -> [(Metric, labels, value)] at every snapshot, published by every
        exporter with the built-in metrics; `plugin.metrics` lists its catalogue entries; `plugin.name`
        labels its errors; `plugin.close()` at detach. A failing plug-in is counted, never raised.
        """
        self.plugins.append(plugin)
        for exporter in self.exporters:
            register = getattr(exporter, "register", None)
            if register is not None:
                self.errors.guard(_component(exporter), register, plugin.metrics)

    def observe_router(self, name: str, logits: torch.Tensor | None, top_k: int | None = None,
                       indices: torch.Tensor | None = None) -> None:
        """Router statistics of a hand-written MoE layer (docs/moe.md): call it from the layer's forward with
        the router logits (tokens, experts) and top_k, or the chosen experts (tokens, k). No host sync."""
        from .integrations.moe import observe_router
        self.errors.guard("moe", observe_router, self, name, logits, top_k, indices)

    @property
    def latest(self) -> Snapshot | None:
        """The last published snapshot (no flush, no sync)."""
        return self._latest

    def snapshot(self) -> Snapshot:
        """Flush the device buffers (one sync) and return a snapshot covering every step so far."""
        if self._closed:
            return self._latest
        snap = self._snapshot()
        self._publish(snap)
        return snap

    def issues(self) -> list:
        """Issues found by the in-process detectors, after flushing every step taken so far."""
        from .detect.issues import IssueList  # a list that notebooks show as a table
        return IssueList(self.snapshot().issues)

    @property
    def prometheus_url(self) -> str | None:
        for exporter in self.exporters:
            url = getattr(exporter, "url", None)
            if url:
                return url
        return None

    @property
    def info(self) -> dict[str, str]:
        source = {"optimizer": "optimizer_step_pre_hook", "agent_step": "agent_step",
                  "backward": "backward_end"}.get(self.boundary, "optimizer_step_pre_hook")
        return {"version": __version__, "torch_version": torch.__version__, "device": self.device.type,
                "grad_source": source, "amp_scaler": "true" if self.scaler is not None else "false"}

    def constant_labels(self) -> dict[str, str]:
        labels = {"run": self.run_name, "rank": str(self.rank)}
        labels.update(self.config.run.labels)
        return labels

    def detach(self) -> None:
        """Remove every hook, publish a last snapshot, stop every thread and server. Idempotent, and
        bounded: it returns within ~2 s whatever the endpoints do (a sink that cannot finish in time is
        counted as an error)."""
        if self._closed:
            return
        deadline = time.monotonic() + DETACH_BUDGET_SECONDS
        if self.hooks is not None:
            self.hooks.remove()  # first: no hook may run into a half-closed agent
            if getattr(self.act, "traced", False):  # compiled graphs hold the hooks' ops: recompile without
                reset_compiled_code()
            self.errors.guard("detach", lambda: self._publish(self._snapshot()))
        self._teardown(deadline)

    def _teardown(self, deadline: float) -> None:
        """Release everything that exists (also after a failed attach): hooks, plug-ins, exporters."""
        self._closed = True
        _LIVE.discard(self)
        errors = getattr(self, "errors", None) or ErrorCounter()
        if self.hooks is not None:
            self.hooks.remove()
        if getattr(self, "forward_clock", None) is not None:
            errors.guard("forward_clock", self.forward_clock.remove)
        if getattr(self, "_first_forward", None) is not None:
            errors.guard("rebind", self._first_forward.remove)
            self._first_forward = None
        for plugin in self.plugins:
            errors.guard(plugin.name, plugin.close)
        close_all(self.exporters, deadline, errors)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self._closed and self.hooks is not None:
                self.hooks.remove()
        except Exception:
            pass


def _component(exporter: Any) -> str:
    return getattr(exporter, "name", None) or type(exporter).__name__


def close_all(exporters: list, deadline: float, errors: ErrorCounter) -> None:
    """Close every exporter concurrently, each given the same deadline; one still running at the
    deadline is counted as an error and left to its (daemon) thread."""

    def close(exporter):
        try:
            takes_deadline = bool(inspect.signature(exporter.close).parameters)
        except (TypeError, ValueError):
            takes_deadline = False
        try:  # never through guard(): a sink disabled after repeated failures must still stop its threads
            exporter.close(*((deadline,) if takes_deadline else ()))
        except Exception as exc:
            errors.record(_component(exporter), exc)

    threads = [threading.Thread(target=close, args=(e,), name=f"gradflow-close-{_component(e)}", daemon=True)
               for e in exporters]
    for t in threads:
        t.start()
    for t, exporter in zip(threads, exporters):
        t.join(max(0.0, deadline - time.monotonic()) + 0.05)
        if t.is_alive():
            errors.record(_component(exporter), TimeoutError(f"{_component(exporter)} did not close in time"))


def attach(model: nn.Module, config: str | os.PathLike | Mapping[str, Any] | None = None, *,
           optimizer: torch.optim.Optimizer | None = None, scaler: Any = None) -> Agent:
    """Attach the agent to `model`: hooks, device statistics and exporters, configured by `config`.

    Returns a working agent, or raises `ConfigError` (a configuration problem, naming the key) or
    `AttachError` (anything else), leaving no hook, thread, port or file behind."""
    return Agent(model, config=config, optimizer=optimizer, scaler=scaler)


__all__ = ["Agent", "AttachError", "attach", "ConfigError"]
