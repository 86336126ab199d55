"""Run a slow sink (file, network push) on its own thread so the training thread never waits on it.

Close contract shared by every sink: `close(deadline)` takes an absolute `time.monotonic()` value and
returns by it whatever the network does, with its threads joined. Network sinks bound each request's
socket timeout by the time left and register their sockets with a `SocketAborter`, so that a request
already blocked when close begins can be ended at the deadline instead of leaving a thread in a read.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import socket
import threading
import time
import weakref

# How long the sinks may take to close (Agent.detach() gives them this, and close() without a deadline
# waits this long): 0.5 s under the 2 s that detach() promises, for joining and logging on a loaded host.
DEFAULT_CLOSE_SECONDS = 1.5


def resolve_deadline(deadline: float | None) -> float:
    """The absolute monotonic deadline of a close(): the caller's, or DEFAULT_CLOSE_SECONDS from now."""
    return time.monotonic() + DEFAULT_CLOSE_SECONDS if deadline is None else deadline


def remaining(deadline: float | None) -> float:
    """Seconds left until `deadline` (never negative; infinity without a deadline)."""
    return float("inf") if deadline is None else max(0.0, deadline - time.monotonic())


# Seconds kept before a close deadline to end blocked requests and join the threads.
ABORT_MARGIN = 0.1


_open_sinks: weakref.WeakSet = weakref.WeakSet()


def close_at_exit(sink) -> None:
    """Close `sink` at interpreter exit unless it was closed before (an agent that was never detached),
    so that no thread is left mid-request while the interpreter tears down."""
    _open_sinks.add(sink)


def closed(sink) -> None:
    """`sink` is closed: nothing to do for it at exit."""
    _open_sinks.discard(sink)


def begin_close(sink, deadline: float | None) -> float | None:
    """The first close() of `sink` (which has `_close_lock` and `_closed`): marks it closed and returns the
    absolute deadline to finish by; None for every later call (close is idempotent)."""
    with sink._close_lock:
        if sink._closed:
            return None
        sink._closed = True
    closed(sink)
    return resolve_deadline(deadline)


def call_by_deadline(fn, deadline: float | None, name: str, what: str) -> None:
    """Run `fn` (a blocking close call of a client library) on a daemon thread and wait for it until
    `deadline`, less ABORT_MARGIN: its exception is raised here; a call still running then raises
    TimeoutError naming `what`, and is left to finish on its own."""
    done = threading.Event()
    failure: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as exc:  # raised by the caller below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=call, name=name, daemon=True).start()
    if not done.wait(max(0.0, remaining(resolve_deadline(deadline)) - ABORT_MARGIN)):
        raise TimeoutError(f"{what} by the close deadline")
    if failure:
        raise failure[0]


@atexit.register
def _close_open_sinks() -> None:
    """At exit: close every sink still open, concurrently, by one deadline (DEFAULT_CLOSE_SECONDS)."""
    sinks = list(_open_sinks)
    if not sinks:
        return
    deadline = resolve_deadline(None)
    threads = [threading.Thread(target=sink.close, args=(deadline,), name="gradflow-exit-close", daemon=True)
               for sink in sinks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(remaining(deadline) + 0.05)


class SocketAborter:
    """The open sockets of a sink's requests, so that close() can end a request blocked in a read.

    `abort()` shuts every registered socket down (a blocked recv returns at once, the request fails) and
    makes every socket registered afterwards fail the same way.
    """

    def __init__(self) -> None:
        self._sockets: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self.aborted = False

    def add(self, sock: socket.socket | None) -> None:
        """Track `sock` (called right after connect); after abort() it is shut down at once."""
        if sock is None:
            return
        with self._lock:
            self._sockets.add(sock)
            aborted = self.aborted
        if aborted:
            _shutdown(sock)

    def abort(self) -> None:
        """End every tracked request now; later ones fail as soon as they connect."""
        with self._lock:
            self.aborted = True
            socks = list(self._sockets)
        for sock in socks:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket's own shutdown: an SSLSocket's would drop its SSL object under the reading thread.
    with contextlib.suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class BackgroundSink:
    """Queues snapshots for `sink.publish` on a daemon thread; `close(deadline)` drains, then closes the sink.

    A sink with `latest_only = True` (a push of the current state) gets only the newest queued snapshot;
    a sink with `abort()` has it called when close is about to pass its deadline. Dropped snapshots are
    counted in `dropped` and as errors of the sink's component; nothing is ever raised to the caller.
    """

    _STOP = object()

    def __init__(self, sink, errors, name: str) -> None:
        self.sink = sink
        self.errors = errors
        self.name = name
        self.dropped = 0
        self._latest_only = bool(getattr(sink, "latest_only", False))
        self._queue: queue.Queue = queue.Queue(maxsize=1024)
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._close_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"gradflow-{name}", daemon=True)
        self._thread.start()
        close_at_exit(self)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is self._STOP:
                break
            if self._latest_only:
                item = self._newest(item)
                if item is self._STOP:
                    break
            self._publish(item)
        self._finish()

    def _newest(self, item):
        """The newest queued snapshot (the STOP marker when it is queued): older ones are superseded."""
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return item
            if nxt is self._STOP:
                return nxt
            item = nxt

    def _publish(self, snap) -> None:
        try:
            self.sink.publish(snap)
        except Exception as exc:  # never hurt the run
            self.errors.record(self.name, exc)
            return
        succeeded = getattr(self.errors, "succeeded", None)
        if succeeded is not None:
            succeeded(self.name)  # a failure streak ends

    def _finish(self) -> None:
        """On the worker thread: write what the deadline allows, drop the rest, close the sink."""
        deadline = resolve_deadline(self._deadline)
        left = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is self._STOP:
                continue
            if self._latest_only:
                continue  # the sink's close() pushes the latest state itself
            if time.monotonic() < deadline - ABORT_MARGIN:
                self._publish(item)
            else:
                left += 1
        if left:
            self.dropped += left
            self.errors.record(self.name, TimeoutError(
                f"{self.name}: {left} snapshot(s) not written by the close deadline"))
        try:
            self.sink.close(deadline)
        except Exception as exc:
            self.errors.record(self.name, exc)

    def publish(self, snap) -> None:
        """Queue `snap` without waiting; a full queue drops it (counted)."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(snap)
        except queue.Full:
            self.dropped += 1
            self.errors.record(self.name, RuntimeError(f"{self.name} is too slow; a snapshot was dropped"))

    def close(self, deadline: float | None = None) -> None:
        """Drain and close the sink by `deadline` (absolute monotonic; default DEFAULT_CLOSE_SECONDS from now).

        The queue is drained while time remains, then `sink.close(deadline)` runs on the worker thread.
        Just before the deadline a still-busy sink is aborted (its blocked requests end) and joined.
        """
        deadline = begin_close(self, deadline)
        if deadline is None:
            return
        try:
            self._deadline = deadline
            self._stop.set()
            with contextlib.suppress(queue.Full):  # when full, the worker sees the stop flag after its item
                self._queue.put_nowait(self._STOP)
            self._thread.join(max(0.0, deadline - ABORT_MARGIN - time.monotonic()))
            if self._thread.is_alive():
                abort = getattr(self.sink, "abort", None)
                if abort is not None:
                    abort()
                self._thread.join(remaining(deadline))
            if self._thread.is_alive():
                self.errors.record(self.name, TimeoutError(
                    f"{self.name}: its thread did not stop by the close deadline"))
        except Exception as exc:  # never hurt the run
            self.errors.record(self.name, exc)
