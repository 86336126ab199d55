"""`ModelAnalysisManager`: owns the measurement schedule and the snapshot, runs the metric computers.

    analyzer = ModelAnalysisManager.create(AnalysisConfig(interval=100))
    for batch in loader:
        ...; optimizer.step()
        metrics = analyzer.on_optimizer_step(model, inputs=batch)   # {} off-interval
        if metrics: log(metrics)

The snapshot W_old is captured at the first call (or `capture_baseline`) and again after every
measurement, so each measurement covers `interval` optimizer steps. Only one snapshot is held: the old
one is dropped before the new one is captured. An error inside one computer is caught, logged once per
(computer, error type), counted in `errors` and passed to `on_error`; the others and the training go on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .computer import MetricComputer
from .config import AnalysisConfig
from .context import AnalysisContext
from .param_change import ParameterChangeMetrics
from .snapshot import ParameterDelta, ParameterSnapshot
from .sparse_quality import SparseQualityMetrics
from .training_state import GradientMetrics, MomentumMetrics

log = logging.getLogger("gradflow_agent")


class ModelAnalysisManager:
    """Schedules measurements every `config.interval` optimizer steps; builder: `.add_metric(computer)`."""

    def __init__(self, config: AnalysisConfig | Mapping[str, Any] | None = None, *,
                 on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self.config = AnalysisConfig.from_mapping(config)
        self.metrics: list[MetricComputer] = []
        self.on_error = on_error
        self.step = 0
        self.errors: Counter[str] = Counter()  # computer name -> errors caught
        self.skipped: Counter[str] = Counter()  # computer name -> measurements skipped (no inputs)
        self.seconds: Counter[str] = Counter()  # computer name (and "snapshot") -> time spent
        self.measurements = 0
        self.last_results: dict[str, float] = {}
        self.last_step: int | None = None
        self._snapshot: ParameterSnapshot | None = None
        self._logged: set[tuple[str, str]] = set()

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, config: AnalysisConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> ModelAnalysisManager:
        """A manager with the computers the config enables."""
        manager = cls(config, **kwargs)
        c = manager.config
        if c.param_change_enabled:
            manager.add_metric(ParameterChangeMetrics(c.param_change_thresholds, c.param_change_per_layer,
                                                      c.param_change_track_components, c.max_layers))
        if c.sparse_quality_enabled:
            manager.add_metric(SparseQualityMetrics(c.sparse_quality_thresholds, c.sparse_quality_include_random,
                                                    c.sparse_quality_max_samples, c.seed, c.chunk_elements))
        if c.gradient_enabled:
            manager.add_metric(GradientMetrics())
        if c.momentum_enabled:
            manager.add_metric(MomentumMetrics())
        return manager

    @classmethod
    def minimal(cls, **overrides: Any) -> ModelAnalysisManager:
        """Preset: parameter change only, every 500 steps (`AnalysisConfig.minimal`)."""
        return cls.create(AnalysisConfig.minimal(**overrides))

    @classmethod
    def comprehensive(cls, **overrides: Any) -> ModelAnalysisManager:
        """Preset: every metric, per layer and component, every 50 steps (`AnalysisConfig.comprehensive`)."""
        return cls.create(AnalysisConfig.comprehensive(**overrides))

    def add_metric(self, computer: MetricComputer) -> ModelAnalysisManager:
        """Add a computer (builder style: returns the manager). Names must be unique."""
        if not callable(getattr(computer, "compute", None)):
            raise TypeError(f"a metric computer needs a compute() method, got {type(computer).__name__}")
        name = _label(computer)
        if any(_label(m) == name for m in self.metrics):
            raise ValueError(f"a metric computer named {name!r} is already registered")
        self.metrics.append(computer)
        return self

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def snapshot(self) -> ParameterSnapshot | None:
        """The current baseline W_old (None before the first call or after reset)."""
        return self._snapshot

    def capture_baseline(self, model: nn.Module, step: int | None = None) -> ParameterSnapshot:
        """Capture W_old now (e.g. before training, so the first window spans exactly `interval` steps)."""
        if step is not None:
            self.step = step
        self._snapshot = None  # never two snapshots at once
        t0 = time.perf_counter()
        c = self.config
        self._snapshot = ParameterSnapshot.capture(model, step=self.step, device=c.torch_device,
                                                   dtype=c.torch_dtype, trainable_only=c.trainable_only,
                                                   chunk_elements=c.chunk_elements)
        self.seconds["snapshot"] += time.perf_counter() - t0
        return self._snapshot

    def reset(self) -> None:
        """Forget the snapshot (call after changing the architecture); the next call captures a new one."""
        self._snapshot = None

    def due(self, step: int) -> bool:
        return step % self.config.interval == 0

    def on_optimizer_step(self, model: nn.Module, inputs: Any = None, *, optimizer: torch.optim.Optimizer | None = None,
                          step: int | None = None) -> dict[str, float]:
        """Call once after every optimizer step. Returns the metrics at measurement steps, else {}.

        `step` overrides the internal step counter (the agent passes its own). Raises
        ParameterMismatchError when the parameters no longer match the snapshot (see `reset`).
        """
        self.step = self.step + 1 if step is None else int(step)
        if self._snapshot is None:
            self.capture_baseline(model)
            return {}
        if not self.due(self.step) or self.step == self._snapshot.step:
            return {}
        snapshot = self._snapshot
        delta = ParameterDelta.from_model(snapshot, model, chunk_elements=self.config.chunk_elements)
        context = AnalysisContext(model=model, inputs=inputs, step=self.step, snapshot_step=snapshot.step,
                                  optimizer=optimizer, config=self.config)
        results: dict[str, float] = {}
        for computer in self.metrics:
            name = _label(computer)
            if getattr(computer, "requires_inputs", False) and inputs is None:
                self.skipped[name] += 1
                self._log_once(name, "no-inputs", f"gradflow_agent: dynamics metric {name} skipped: it needs "
                               "inputs (pass inputs= to on_optimizer_step, or let the plug-in capture them)")
                continue
            t0 = time.perf_counter()
            try:
                out = computer.compute(delta=delta, snapshot=snapshot, context=context)
                results.update(_check_results(name, out))
            except Exception as exc:  # fail-safe: one computer never stops the others or the training
                self._record(name, exc)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        del delta, context, snapshot
        self.capture_baseline(model)
        self.measurements += 1
        self.last_results, self.last_step = results, self.step
        return results

    # -- errors ---------------------------------------------------------------------------------------
    def _record(self, name: str, exc: BaseException) -> None:
        self.errors[name] += 1
        if self.on_error is not None:  # the handler reports it (the agent plug-in: agent.errors)
            self.on_error(name, exc)
            return
        self._log_once(name, type(exc).__name__, f"gradflow_agent: dynamics metric {name} failed (training and "
                       f"the other metrics continue): {type(exc).__name__}: {exc}", exc)

    def _log_once(self, name: str, kind: str, message: str, exc: BaseException | None = None) -> None:
        if (name, kind) in self._logged:
            return
        self._logged.add((name, kind))
        if exc is None:
            log.warning(message)
        else:
            log.error(message, exc_info=exc)


def _label(computer: Any) -> str:
    return getattr(computer, "name", "") or type(computer).__name__


def _check_results(name: str, out: Any) -> dict[str, float]:
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise TypeError(f"{name}.compute() must return a mapping of str -> float, got {type(out).__name__}")
    clean = {}
    for k, v in out.items():
        if not isinstance(k, str):
            raise TypeError(f"{name}.compute() returned a non-string key {k!r}")
        clean[k] = float(v.item()) if isinstance(v, torch.Tensor) else float(v)
    return clean
