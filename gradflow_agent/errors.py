"""Never hurt the run: every failure inside the agent is caught, counted and logged once.

A component that fails on `DISABLE_AFTER` consecutive calls is switched off with one warning, so a
broken part costs nothing per step instead of a caught exception per step; the rest of the agent
goes on and the disabled component is visible on /metrics (gradflow_agent_component_disabled).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gradflow_agent")

# Consecutive failures (with no success in between) after which a component is disabled.
DISABLE_AFTER = 20


class ErrorCounter:
    """Counts errors per component; logs the first of each (component, exception type) only."""

    def __init__(self, disable_after: int = DISABLE_AFTER) -> None:
        self.counts: Counter[str] = Counter()
        self.disabled: set[str] = set()
        self.disable_after = disable_after
        self._streak: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def record(self, component: str, exc: BaseException) -> None:
        with self._lock:
            self.counts[component] += 1
            self._streak[component] += 1
            key = (component, type(exc).__name__)
            first = key not in self._seen
            self._seen.add(key)
            disable = self._streak[component] >= self.disable_after and component not in self.disabled
            if disable:
                self.disabled.add(component)
        if first:
            log.error("gradflow_agent: error in %s (training continues; further %s errors in this "
                      "component are counted in gradflow_agent_errors_total, not logged): %s: %s",
                      component, type(exc).__name__, type(exc).__name__, exc, exc_info=exc)
        if disable:
            log.warning("gradflow_agent: %s failed %d times in a row and is now disabled for this run "
                        "(gradflow_agent_component_disabled{component=%r} = 1)",
                        component, self.disable_after, component)

    def succeeded(self, component: str) -> None:
        """A call of `component` went through: its failure streak starts again."""
        if self._streak.get(component):
            self._streak[component] = 0

    def enabled(self, component: str) -> bool:
        return component not in self.disabled

    def guard(self, component: str, fn: Callable[..., Any], *args: Any, default: Any = None,
              resets: bool = True) -> Any:
        """`fn(*args)` unless the component is disabled; an exception is recorded and `default` returned.

        `resets=False`: a success here does not end the component's failure streak (a secondary call,
        such as reading a component's buffers at a snapshot, while its per-step work keeps failing)."""
        if component in self.disabled:
            return default
        try:
            out = fn(*args)
        except Exception as exc:  # never hurt the run
            self.record(component, exc)
            return default
        if resets and self._streak.get(component):  # `succeeded`, inline: this runs several times a step
            self._streak[component] = 0
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())
