"""The agent plug-in: runs a ModelAnalysisManager at the agent's step boundary and exports its results.

    agent = gradflow_agent.attach(model, optimizer=opt)
    dyn = attach_dynamics(agent, {"interval": 100, "param_change_track_components": True})

`on_step` runs on the training thread right after each optimizer step (gradients and optimizer state
still there); off-interval it costs one modulo. Results become `(Metric, labels, value)` rows that the
agent publishes with its own metrics (Prometheus, OTel, JSONL): `gradflow_param_change_*` (labels
`threshold`, `layer`, `component`), `gradflow_sparse_*` (labels `threshold`, `mask`), and the plug-in's
own counters. While the analysis runs, the agent's activation hooks are paused (its forwards are not
training forwards) and input capture is off. Errors are counted in
gradflow_agent_errors_total{component="dynamics.<computer>"}; training goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..export.metrics import Metric
from .config import AnalysisConfig
from .manager import ModelAnalysisManager
from .snapshot import ParameterMismatchError
from .sparse_quality import ModelCall

SECONDS = Metric("gradflow_dynamics_compute_seconds_total", "counter",
                 "Time spent by each training-dynamics computer (and on snapshots) on the training thread.", "s",
                 ("computer",))
MEASUREMENTS = Metric("gradflow_dynamics_measurements_total", "counter", "Training-dynamics measurements made.")
LAST_STEP = Metric("gradflow_dynamics_last_measurement_step", "gauge",
                   "Optimizer step of the latest training-dynamics measurement.", "{step}")
SKIPPED = Metric("gradflow_dynamics_skipped_total", "counter",
                 "Measurements a computer skipped because the step had no inputs to run the model on.",
                 labels=("computer",))
VALUE = Metric("gradflow_dynamics_value", "gauge",
               "A result of a custom dynamics computer that does not describe its own metric.", labels=("key",))
OWN = (SECONDS, MEASUREMENTS, LAST_STEP, SKIPPED, VALUE)


class DynamicsPlugin:
    """Agent plug-in (see `Agent.add_plugin`) running the training-dynamics analysis."""

    name = "dynamics"

    def __init__(self, config: AnalysisConfig | Mapping[str, Any] | None = None, *,
                 manager: ModelAnalysisManager | None = None, inputs: Any = None, max_custom_keys: int = 256) -> None:
        """`inputs`: a fixed probe batch for sparse quality (comparable across measurements); without it
        the model's latest call is captured (config `capture_inputs`)."""
        self.manager = manager if manager is not None else ModelAnalysisManager.create(config)
        self.config = self.manager.config
        self.manager.on_error = self._on_error
        self.fixed_inputs = inputs
        self.optimizer: Any = None  # the optimizer whose state momentum metrics read (default: the agent's)
        self.max_custom_keys = max_custom_keys
        self._agent: Any = None
        self._handle = None
        self._captured: ModelCall | None = None
        self._busy = False
        self._rows: list[tuple[Metric, dict[str, str], float]] = []
        self._custom_keys: set[str] = set()
        self.dropped_keys = 0
        seen: dict[str, Metric] = {}
        for computer in self.manager.metrics:
            for metric in getattr(computer, "catalogue", ()):
                seen.setdefault(metric.name, metric)
        for metric in OWN:
            seen.setdefault(metric.name, metric)
        self.metrics: tuple[Metric, ...] = tuple(seen.values())

    # -- lifecycle -----------------------------------------------------------------------------------------
    def bind(self, agent: Any) -> None:
        """Start: capture the baseline now and, unless a probe batch was given, watch the model's calls."""
        if self._agent is agent:
            return
        self._agent = agent
        if self.fixed_inputs is None and self.config.capture_inputs:
            from ..hooks import add_module_hook  # deepcopy/torch.save of the model never carry it
            self._handle = add_module_hook(agent.model, self._capture, pre=True, with_kwargs=True)
        if self.manager.snapshot is None:
            self.manager.capture_baseline(agent.model, step=agent.steps)

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not self._busy:
            self._captured = ModelCall(tuple(args), dict(kwargs))

    @property
    def inputs(self) -> Any:
        """What sparse quality runs the model on: the probe batch, else the latest captured call."""
        return self.fixed_inputs if self.fixed_inputs is not None else self._captured

    def on_step(self, agent: Any) -> None:
        if self._agent is not agent:
            self.bind(agent)
        step = agent.steps
        if self.manager.snapshot is not None and not self.manager.due(step):
            self.manager.step = step
            return
        self._busy = True
        try:
            with agent.paused():
                optimizer = self.optimizer or getattr(getattr(agent, "hooks", None), "optimizer", None)
                results = self.manager.on_optimizer_step(agent.model, self.inputs, step=step, optimizer=optimizer)
        except ParameterMismatchError:
            self.manager.reset()  # counted and logged by the agent; the next step takes a new baseline
            raise
        finally:
            self._busy = False
        if results:
            self._rows = self._to_rows(results)

    def _on_error(self, computer: str, exc: BaseException) -> None:
        if self._agent is not None:
            self._agent.errors.record(f"dynamics.{computer}", exc)

    # -- export --------------------------------------------------------------------------------------------
    def _to_rows(self, results: Mapping[str, float]) -> list[tuple[Metric, dict[str, str], float]]:
        rows = []
        for key, value in results.items():
            described = None
            for computer in self.manager.metrics:
                describe = getattr(computer, "describe", None)
                described = describe(key) if describe is not None else None
                if described is not None:
                    break
            if described is None:
                if key not in self._custom_keys and len(self._custom_keys) >= self.max_custom_keys:
                    self.dropped_keys += 1
                    continue
                self._custom_keys.add(key)
                described = (VALUE, {"key": key})
            rows.append((described[0], dict(described[1]), float(value)))
        return rows

    def collect(self) -> list[tuple[Metric, dict[str, str], float]]:
        rows = [row for row in self._rows if not math.isnan(row[2])]
        m = self.manager
        for computer, seconds in sorted(m.seconds.items()):
            rows.append((SECONDS, {"computer": computer}, float(seconds)))
        for computer, count in sorted(m.skipped.items()):
            rows.append((SKIPPED, {"computer": computer}, float(count)))
        rows.append((MEASUREMENTS, {}, float(m.measurements)))
        if m.last_step is not None:
            rows.append((LAST_STEP, {}, float(m.last_step)))
        return rows

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._captured = None
        self.manager.reset()


def attach_dynamics(agent: Any, config: AnalysisConfig | Mapping[str, Any] | None = None, *,
                    inputs: Any = None, manager: ModelAnalysisManager | None = None) -> DynamicsPlugin:
    """Create the plug-in, capture the baseline now and add it to the agent. Without `config` or
    `manager`, the agent's `dynamics:` config section is used (when it has one)."""
    existing = running_dynamics(agent)
    if existing is not None:
        raise ValueError("the agent already runs a dynamics plug-in (config dynamics.enabled or an earlier "
                         "attach_dynamics); configure that one instead")
    if config is None and manager is None:
        config = agent.config.get("dynamics") if isinstance(agent.config, Mapping) else None
    plugin = DynamicsPlugin(config, manager=manager, inputs=inputs)
    plugin.bind(agent)
    agent.add_plugin(plugin)
    return plugin


def running_dynamics(agent: Any) -> DynamicsPlugin | None:
    """The dynamics plug-in the agent runs already, if any."""
    return next((p for p in getattr(agent, "plugins", ()) if isinstance(p, DynamicsPlugin)), None)


def dynamics_from_config(agent: Any) -> DynamicsPlugin | None:
    """Attach the plug-in when the agent's config has `dynamics.enabled: true` (for `attach()`)."""
    section = agent.config.get("dynamics") if isinstance(agent.config, Mapping) else None
    if not section or not section.get("enabled", False):
        return None
    return running_dynamics(agent) or attach_dynamics(agent, section)
