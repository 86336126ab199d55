"""Never hurt the run: every failure inside the agent is caught, counted and logged once."""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger("gradflow_agent")


class ErrorCounter:
    """Counts errors per component; logs the first of each (component, exception type) only."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def record(self, component: str, exc: BaseException) -> None:
        with self._lock:
            self.counts[component] += 1
            key = (component, type(exc).__name__)
            first = key not in self._seen
            self._seen.add(key)
        if first:
            log.error("gradflow_agent: error in %s (training continues; further %s errors in this "
                      "component are counted in gradflow_agent_errors_total, not logged): %s: %s",
                      component, type(exc).__name__, type(exc).__name__, exc, exc_info=exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
