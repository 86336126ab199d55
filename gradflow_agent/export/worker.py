"""Run a slow sink (file, network push) on its own thread so the training thread never waits on it."""

from __future__ import annotations

import queue
import threading


class BackgroundSink:
    """Queues snapshots for `sink.publish` on a daemon thread; `close()` drains, then closes the sink."""

    _STOP = object()

    def __init__(self, sink, errors, name: str) -> None:
        self.sink = sink
        self.errors = errors
        self.name = name
        self._queue: queue.Queue = queue.Queue(maxsize=1024)
        self._thread = threading.Thread(target=self._run, name=f"gradflow-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            try:
                self.sink.publish(item)
            except Exception as exc:  # never hurt the run
                self.errors.record(self.name, exc)

    def publish(self, snap) -> None:
        try:
            self._queue.put_nowait(snap)
        except queue.Full:
            self.errors.record(self.name, RuntimeError(f"{self.name} is too slow; a snapshot was dropped"))

    def close(self) -> None:
        self._queue.put(self._STOP)
        self._thread.join(timeout=30)
        try:
            self.sink.close()
        except Exception as exc:
            self.errors.record(self.name, exc)
