"""`attach(model)` and the Agent: lifecycle, step boundaries and the interval snapshot.

Data flows one way: hooks -> device buffers (stats/) -> one transfer per export interval -> an
immutable Snapshot -> detectors -> exporters and recorders. The training thread pays for the hooks,
one fold per step and one transfer per interval; exporters read the latest snapshot on their own
threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ConfigError, Section, load_config
from .detect import diagnose
from .errors import ErrorCounter
from .export import build_exporters
from .hooks import HookManager, select_layers
from .snapshot import LAYER_STATS, Snapshot
from .stats.activations import ActivationStats
from .stats.engine import transfer
from .stats.gradients import GradientStats
from .stats.output_grads import OutputGradStats
from .stats.parameters import ParameterStats

log = logging.getLogger("gradflow_agent")


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _distributed() -> tuple[int, int]:
    """(rank, local rank) under torch.distributed, (0, 0) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        return rank, int(os.environ.get("LOCAL_RANK", rank))
    return 0, 0


class Agent:
    """Monitors one model; create it with `gradflow_agent.attach(model)`."""

    def __init__(self, model: nn.Module, config: str | os.PathLike | Mapping[str, Any] | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scaler: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config: Section = load_config(config)
        log.setLevel(self.config.log.level.upper())
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            log.warning("gradflow_agent: the model is torch.compile'd; hooks go on the original module and "
                        "run only if attach() happened before the first compiled call. Attach first, "
                        "then compile.")
            model = model._orig_mod
        self.model = model
        self.scaler = scaler
        self.errors = ErrorCounter()
        self.rank, self.local_rank = _distributed()
        self.device = _model_device(model)
        cfg = self.config
        self.run_name = cfg.run.name or "default"
        self.layers, self.layers_skipped = select_layers(model, cfg.modules)
        if self.layers_skipped:
            log.warning("gradflow_agent: %d layers left out by modules.max_layers=%d",
                        self.layers_skipped, cfg.modules.max_layers)

        params, layer_of_param = self._trainable_params()
        L = len(self.layers)
        every = cfg.sampling.every_n_steps
        self._param_every = every * cfg.stats.parameters.every_n_steps
        rows = max(cfg.sampling.window, math.ceil(cfg.sampling.export_every_n_steps / every)) + 1
        self.act = ActivationStats([layer.kind for layer in self.layers], self.device,
                                   margin=cfg.stats.activations.saturation_margin,
                                   dead_units=cfg.stats.activations.dead_units, window=cfg.sampling.window,
                                   sample_elements=cfg.stats.activations.sample_elements)
        self.grad = GradientStats(params, layer_of_param, L, self.device, rows=rows,
                                  window=cfg.sampling.window)
        self.param = ParameterStats(params, layer_of_param, L, self.device,
                                    mode=cfg.stats.parameters.update_ratio,
                                    sample_size=cfg.stats.parameters.sample_size, seed=cfg.stats.parameters.seed)
        self.out_grad = OutputGradStats(L, self.device)

        self.steps = 0
        self.skipped_optimizer_steps = 0
        self._opt_stepped = False  # an optimizer step happened since the last agent.step()
        # A snapshot due at an optimizer step waits for the agent.step(loss=) that follows it (when the
        # user calls one), so that an interval's loss is the loss of its own steps.
        self._follows_with_step = False
        self._publish_waiting = False
        self._losses: list[torch.Tensor | float] = []
        self._last_loss: float | None = None
        self._interval_start = 0
        self._last_publish = time.monotonic()
        self._overhead = 0.0
        self._lock = threading.RLock()
        self._latest: Snapshot | None = None
        self._closed = False
        self.plugins: list = []

        output_grads = cfg.stats.gradients.enabled and cfg.stats.gradients.output_grads
        self.hooks = HookManager(self.layers, self.errors,
                                 self.act.observe if cfg.stats.activations.enabled else None,
                                 self.out_grad.watch if output_grads else None)
        if cfg.stats.activations.enabled or output_grads:
            self.hooks.attach_forward()
        self.hooks.attach_optimizer(optimizer, params, self._before_optimizer_step, self._after_optimizer_step)
        if cfg.stats.parameters.enabled and self._param_due(1):
            self.param.take_before()
        self.exporters = build_exporters(self)
        if cfg.dynamics.enabled:
            from .dynamics import dynamics_from_config
            dynamics_from_config(self)
        self._publish(self._snapshot())  # the endpoint serves the layer list from the start

    def _trainable_params(self) -> tuple[list[nn.Parameter], list[int]]:
        """Every trainable parameter once, with the index of the layer that owns it (L = none)."""
        owner: dict[int, int] = {}
        for layer in self.layers:
            recurse = next(layer.module.children(), None) is None
            for p in layer.module.parameters(recurse=recurse):
                owner.setdefault(id(p), layer.index)
        params, index, seen = [], [], set()
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                index.append(owner.get(id(p), len(self.layers)))
        return params, index

    # -- step boundaries --------------------------------------------------------------------------------
    def _param_due(self, step: int) -> bool:
        return self.config.stats.parameters.enabled and step % self._param_every == 0

    def _before_optimizer_step(self) -> None:
        if self.hooks.active and self.config.stats.gradients.enabled:
            self.grad.read(count_zeros=self._param_due(self.steps + 1))

    def _after_optimizer_step(self) -> None:
        self._opt_stepped = True
        self._boundary()

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Mark the end of a training step (optional when the optimizer is known) and record the loss.

        Counted once per step: when an optimizer step already marked it, this only records the loss.
        Without any optimizer step since the last call (no optimizer, or a GradScaler skipped the step),
        the gradients are read here, so call it before `zero_grad()` in that case.
        """
        if self._closed:
            return
        t0 = time.perf_counter()
        try:
            if loss is not None:
                self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))
            if self._opt_stepped:
                self._opt_stepped = False
                self._follows_with_step = True
                if self._publish_waiting:
                    self._publish_waiting = False
                    self._publish(self._snapshot())
            else:
                if self.hooks.optimizer is not None:
                    self.skipped_optimizer_steps += 1  # e.g. GradScaler found inf/NaN and skipped it
                elif self.hooks.active and self.config.stats.gradients.enabled:
                    self.grad.read(count_zeros=self._param_due(self.steps + 1))
                self._boundary()
        except Exception as exc:
            self.errors.record("step", exc)
        self._overhead += time.perf_counter() - t0

    def _boundary(self) -> None:
        t0 = time.perf_counter()
        with self._lock:
            if self.hooks.active:
                self.act.end_step()
            self.steps += 1
            if self._param_due(self.steps):
                self.param.measure(keep_as_before=self._param_due(self.steps + 1))
            elif self._param_due(self.steps + 1):
                self.param.take_before()
            self.hooks.active = self.steps % self.config.sampling.every_n_steps == 0
            for plugin in self.plugins:
                try:
                    plugin.on_step(self)
                except Exception as exc:
                    self.errors.record(plugin.name, exc)
            due = (self.steps - self._interval_start >= self.config.sampling.export_every_n_steps
                   or time.monotonic() - self._last_publish >= self.config.sampling.export_every_seconds)
        if due or self._publish_waiting:
            if self._opt_stepped and self._follows_with_step and not self._publish_waiting:
                self._publish_waiting = True  # published by the agent.step() that follows
            else:
                self._publish_waiting = False
                self._publish(self._snapshot())
        self._overhead += time.perf_counter() - t0

    # -- snapshots --------------------------------------------------------------------------------------
    def _snapshot(self) -> Snapshot:
        """Fold, transfer once, and build the interval snapshot (with its diagnosis)."""
        t0 = time.perf_counter()
        with self._lock:
            losses = self._losses
            self._losses = []
            loss_parts = [torch.stack([torch.as_tensor(x, dtype=torch.float64).to(self.device).mean()
                                       for x in losses]).mean().reshape(1)] if losses else []
            scale = [self.scaler._scale.reshape(-1)[:1]] if getattr(self.scaler, "_scale", None) is not None \
                else []
            groups = [self.act.device_parts(), self.grad.device_parts(), self.param.device_parts(),
                      loss_parts, scale, self.out_grad.device_parts()]
            host = transfer(groups, self.device)
            stats = {}
            stats.update(self.act.finish(host[0]))
            stats.update(self.grad.finish(host[1]))
            stats.update(self.param.finish(host[2]))
            stats.update(self.out_grad.finish(host[5]))
            if host[3]:  # an interval without a loss keeps the last one (None until a loss is given)
                self._last_loss = float(host[3][0][0])
            interval = self.steps - self._interval_start
            self._interval_start = self.steps
            self._last_publish = time.monotonic()
        self._overhead += time.perf_counter() - t0
        counters = {
            "steps_total": float(self.steps),
            "overhead_seconds_total": self._overhead + self.hooks.overhead,
            "errors_total": float(self.errors.total),
            "layers": float(len(self.layers)),
            "layers_skipped": float(self.layers_skipped),
            "optimizer_steps_skipped_total": float(self.skipped_optimizer_steps),
        }
        if host[4]:
            counters["grad_scale"] = float(host[4][0][0])
        extra = []
        for plugin in self.plugins:
            try:
                extra.extend(plugin.collect())
            except Exception as exc:
                self.errors.record(plugin.name, exc)
        snap = Snapshot(
            step=self.steps, time=time.time(), interval_steps=interval,
            layers=tuple(layer.name for layer in self.layers),
            layer_types=tuple(layer.type_name for layer in self.layers),
            stats={k: np.asarray(stats[k], dtype=np.float64) for k in LAYER_STATS},
            nonfinite={"grad": stats["nonfinite_grad"], "activation": stats["nonfinite_activation"],
                       "param": stats["nonfinite_param"]},
            grad_norm=stats["grad_norm"], loss=self._last_loss,
            counters=counters, errors=dict(self.errors.counts), extra=tuple(extra),
        )
        return diagnose(snap, self.config.thresholds)

    def _publish(self, snap: Snapshot) -> None:
        self._latest = snap
        for exporter in self.exporters:
            try:
                exporter.publish(snap)
            except Exception as exc:
                self.errors.record(type(exporter).__name__, exc)

    # -- public API -------------------------------------------------------------------------------------
    def read_gradients(self) -> None:
        """Read the gradients now, as the optimizer step pre-hook does: for trainer integrations that own
        the step boundary (e.g. Lightning's `on_before_optimizer_step`). Follow with `end_optimizer_step`."""
        t0 = time.perf_counter()
        try:
            self._before_optimizer_step()
        except Exception as exc:
            self.errors.record("read_gradients", exc)
        self._overhead += time.perf_counter() - t0

    def end_optimizer_step(self) -> None:
        """Mark an optimizer step as done, as the optimizer step post-hook does (integrations)."""
        try:
            self._after_optimizer_step()
        except Exception as exc:
            self.errors.record("end_optimizer_step", exc)

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
                register(plugin.metrics)

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
        return list(self.snapshot().issues)

    @property
    def prometheus_url(self) -> str | None:
        for exporter in self.exporters:
            url = getattr(exporter, "url", None)
            if url:
                return url
        return None

    @property
    def info(self) -> dict[str, str]:
        return {"version": __version__, "torch_version": torch.__version__, "device": self.device.type,
                "grad_source": "optimizer_step_pre_hook" if self.hooks.optimizer is not None or
                self.steps == 0 else "agent_step", "amp_scaler": "true" if self.scaler is not None else "false"}

    def constant_labels(self) -> dict[str, str]:
        labels = {"run": self.run_name, "rank": str(self.rank)}
        labels.update(self.config.run.labels)
        return labels

    def detach(self) -> None:
        """Remove every hook, publish a last snapshot, stop every thread and server. Idempotent."""
        if self._closed:
            return
        try:
            self._publish(self._snapshot())
        except Exception as exc:
            self.errors.record("detach", exc)
        self._closed = True
        self.hooks.remove()
        for plugin in self.plugins:
            try:
                plugin.close()
            except Exception as exc:
                self.errors.record(plugin.name, exc)
        for exporter in self.exporters:
            try:
                exporter.close()
            except Exception as exc:
                self.errors.record(type(exporter).__name__, exc)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self._closed:
                self.hooks.remove()
        except Exception:
            pass


def attach(model: nn.Module, config: str | os.PathLike | Mapping[str, Any] | None = None, *,
           optimizer: torch.optim.Optimizer | None = None, scaler: Any = None) -> Agent:
    """Attach the agent to `model`: hooks, device statistics and exporters, configured by `config`."""
    return Agent(model, config=config, optimizer=optimizer, scaler=scaler)


__all__ = ["Agent", "attach", "ConfigError"]
