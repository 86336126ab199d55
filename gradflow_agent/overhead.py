"""The agent's own cost, held under `sampling.overhead_budget`: one controller, two knobs.

The agent times itself on the training thread (hooks, step boundary, snapshots). Over a judgment
window of whole steps it compares that time with the wall time of the steps and, while its share is
over the budget, stretches the cadence of the optional statistics: activations first (x2 .. x64 of
the configured cadence, jumping by the factor the share is over), then - only once activations are at
their sparsest and the share is still over - the parameter statistics (x2 .. x16, the same way). It comes back one
halving at a time, parameters first, when the share is under a quarter of the budget. Gradients (the
global norm and the non-finite watch) are never stretched: they stay on every computed step.

The window spans at least one period of each stretched cadence, so that a window always holds a
measured step and the share is not judged on the cheap steps only, and at least 32 steps: the first
32 steps of a run are always measured in full (the detectors' first window). A share far over the
budget jumps by the factor it is over, so a 1000-layer model settles in two or three windows, not in
six doublings.
"""

from __future__ import annotations

import math
import threading
import time

MAX_ACTIVATION_STRETCH = 64
MAX_PARAMETER_STRETCH = 16
WINDOW = 32  # steps, at least, between judgments


class AgentClock:
    """The agent's own time on the training thread, each second counted once.

    Timed sections nest (a snapshot inside a step boundary inside an optimizer hook): only the outermost
    section of a thread adds its time. `with clock:` around a section; the forward hooks, which never
    nest, add their time to `seconds` directly (cheaper on the hot path)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._local = threading.local()

    def __enter__(self) -> AgentClock:
        local = self._local
        depth = getattr(local, "depth", 0)
        if not depth:
            local.t0 = time.perf_counter()
        local.depth = depth + 1
        return self

    def __exit__(self, *exc: object) -> None:
        local = self._local
        local.depth -= 1
        if not local.depth:
            self.seconds += time.perf_counter() - local.t0


class OverheadBudget:
    """Judge the agent's share of the step time and the stretch of the optional cadences.

    `activation_period` and `parameter_period` are the configured cadences in steps (the window covers
    one stretched period of each); `stretch_parameters` is off when the ranks must measure parameters
    on the same steps (their sharded squares meet in one collective at the snapshot)."""

    def __init__(self, budget: float, *, activation_period: int = 1, parameter_period: int = 0,
                 stretch_parameters: bool = True) -> None:
        self.budget = budget
        self.activations = 1  # stretch of the activation cadence
        self.parameters = 1  # stretch of the parameter cadence
        self.share = math.nan  # the agent's share of the step time over the last window (nan: not yet known)
        self._periods = (max(1, activation_period), max(0, parameter_period))
        self._can_stretch_parameters = parameter_period > 0
        self.stretch_parameters = stretch_parameters
        self._start: tuple[float, float] | None = None  # (clock, agent seconds) where the window began
        self._now = self._spent = 0.0  # the same at the latest step end
        self._steps = 0
        self._window = WINDOW  # `window`, kept current by whatever changes a stretch (read on every step)

    @property
    def stretch_parameters(self) -> bool:
        return self._stretch_parameters

    @stretch_parameters.setter
    def stretch_parameters(self, allowed: bool) -> None:
        self._stretch_parameters = allowed and self._can_stretch_parameters
        if not self._stretch_parameters:
            self.parameters = 1
        self._window = self.window

    @property
    def current_share(self) -> float:
        """The last window's share; before the first window ends, the share so far (0 before any step)."""
        if not math.isnan(self.share):
            return self.share
        if self._start is None or self._now <= self._start[0]:
            return 0.0
        return min((self._spent - self._start[1]) / (self._now - self._start[0]), 1.0)

    def step_ended(self, now: float, agent_seconds: float) -> bool:
        """One step ended at clock `now` with `agent_seconds` of agent time so far (a running total).
        Returns True when a cadence changed. The window's share is taken from its two ends (the same sum
        as step by step, and the least work on the steps in between)."""
        if self._start is None:
            self._start = (now, agent_seconds)
            return False
        self._steps += 1
        self._now, self._spent = now, agent_seconds
        if self._steps < self._window:
            return False
        (t0, own0), self._start = self._start, (now, agent_seconds)
        self._steps = 0
        if now <= t0:  # a clock that did not move: nothing to judge
            return False
        self.share = min((agent_seconds - own0) / (now - t0), 1.0)
        changed = bool(self.budget) and self._judge(self.share)
        self._window = self.window
        return changed

    @property
    def window(self) -> int:
        """Steps in the current judgment window: 32, or one stretched period of each cadence if longer."""
        act, par = self._periods
        return max(WINDOW, act * self.activations, par * self.parameters)

    def _judge(self, share: float) -> bool:
        if share > self.budget:
            factor = 2 ** max(1, math.ceil(math.log2(share / self.budget)))
            if self.activations < MAX_ACTIVATION_STRETCH:
                self.activations = min(MAX_ACTIVATION_STRETCH, self.activations * factor)
                return True
            if self._stretch_parameters and self.parameters < MAX_PARAMETER_STRETCH:
                self.parameters = min(MAX_PARAMETER_STRETCH, self.parameters * factor)
                return True
        elif share < self.budget / 4:
            if self.parameters > 1:
                self.parameters //= 2
                return True
            if self.activations > 1:
                self.activations //= 2
                return True
        return False
