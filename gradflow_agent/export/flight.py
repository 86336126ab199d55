"""Flight recorder: one post-mortem bundle per incident, for the person on call.

An incident starts when a trigger issue kind (`flight_recorder.triggers`, non-finite values by default)
appears on a layer where it was not active at the previous snapshot; an issue that stays active writes no
second bundle, one that clears and comes back is a new incident. Non-finite values are one incident per
run (their issue stays once seen).

Where the data comes from, and what it costs the training thread:
- per step, nothing on the device: the gradient ring (stats/gradients.py) already holds one row of
  per-parameter norms per computed step; it grows by `steps` rows so that the steps before a trigger are
  still there when the snapshot after it is built. Losses given to `agent.step(loss=)` are kept as the
  (detached) tensors they are, with their step number, in a bounded deque: no sync, no device op.
- per snapshot, nothing more: the snapshot already reduces every ring row to per-layer norms (after the
  shard sums); the recorder keeps a reference to them.
- per incident only (at most `max_bundles` per run): the trigger's rows and losses are copied to the host
  in one transfer, right after the snapshot's own transfer, when the device queue is empty (so it waits
  for no work). Carrying them in every snapshot's transfer instead would move `steps` x layers values at
  every snapshot of every healthy run to serve the rare one that has an incident.
Serialising, bounding and writing the bundle run on a BackgroundSink thread (component
"flight_recorder"): a failure is counted as an agent error and never raised into training.

The bundle is one JSON file (`format: gradflow-flight-bundle`), read back by `read_bundle` and rendered by
`gradflow-agent report BUNDLE` (report/bundle.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .worker import BackgroundSink

if TYPE_CHECKING:
    import torch

log = logging.getLogger("gradflow_agent")

FORMAT = "gradflow-flight-bundle"
VERSION = 1
_MAGIC = b'{"format":"' + FORMAT.encode() + b'"'  # every bundle starts with these bytes


def wanted(config: Any, rank: int) -> bool:
    """Does this rank record (flight_recorder.enabled, and `ranks: zero` keeps only rank 0)?"""
    cfg = config.flight_recorder
    return bool(cfg.enabled) and (cfg.ranks == "all" or rank == 0)


def extra_ring_rows(config: Any, rank: int) -> int:
    """Rows the gradient ring needs beyond one export interval: the steps kept before a trigger, and its own."""
    if not wanted(config, rank):
        return 0
    return math.ceil(config.flight_recorder.steps / config.sampling.every_n_steps) + 1


@dataclass(frozen=True)
class Incident:
    """What the training thread hands to the writer: issues, host arrays and snapshot references only."""

    trigger: Any  # detect.Issue
    new: tuple  # every issue that started at this snapshot (trigger first)
    snapshot_step: int
    layers: tuple[str, ...]
    layer_types: tuple[str, ...]
    origin: tuple[int, int, str] | None
    steps: np.ndarray  # history: the steps, oldest first
    loss: np.ndarray  # per step; NaN where the loss was NaN, None-rows are marked by `has_loss`
    has_loss: np.ndarray
    norms: np.ndarray  # (steps, layers + 1) per-layer gradient norms; NaN = no gradient read at that step
    snapshots: tuple = ()


class FlightRecorder:
    """The training-thread side: notes losses, spots incidents, reads their rows; an exporter entry.

    `capture(snap, grad)` runs where the snapshot is built (Agent._snapshot), `publish(snap)` with the
    other exporters; the writer thread is started at the first incident, so a healthy run has none."""

    name = "flight_recorder"

    def __init__(self, agent: Any) -> None:
        cfg = agent.config.flight_recorder
        self.errors = agent.errors
        self.device = agent.device
        self.rank = agent.rank
        self.run = agent.run_name
        self.labels = agent.constant_labels()
        self.directory = Path(cfg.directory)
        self.steps = cfg.steps
        self.max_bundles = cfg.max_bundles
        self.max_bytes = cfg.max_bytes
        self.n_snapshots = cfg.snapshots
        self.triggers = None if "*" in cfg.triggers else frozenset(cfg.triggers)
        # losses of the steps the ring covers: [step, [loss, ...]] (micro-batches share a step)
        self._losses: deque = deque(maxlen=agent._ring_rows * agent.config.sampling.every_n_steps + 1)
        self._snaps: deque = deque(maxlen=self.n_snapshots)
        self._active: set[tuple[str, str]] = set()
        self._pending: tuple[Any, Incident] | None = None
        self._sink: BackgroundSink | None = None
        self._told_full = False
        self.bundles = 0  # incidents handed to the writer

    # -- training thread ------------------------------------------------------------------------------
    def note_loss(self, step: int, loss: torch.Tensor | float) -> None:
        """Keep `loss` (already detached) as the loss of `step`: a reference, no device work."""
        if self._losses and self._losses[-1][0] == step:
            self._losses[-1][1].append(loss)
        else:
            self._losses.append([step, [loss]])

    def capture(self, snap: Any, grad: Any) -> None:
        """At a snapshot: is an incident starting? If so (and the run's budget allows), read its history."""
        if "detect" in snap.degraded:  # issues unknown: neither a start nor an end of anything
            return
        issues = [i for i in snap.issues if self.triggers is None or i.kind in self.triggers]
        active = {_key(i) for i in issues}
        new = [i for i in issues if _key(i) not in self._active]
        self._active = active
        if not new:
            return
        if self.bundles >= self.max_bundles:
            if not self._told_full:
                self._told_full = True
                log.warning("gradflow_agent: flight recorder: %s at %s (step %d) not recorded: "
                            "flight_recorder.max_bundles=%d bundles already written by this rank",
                            new[0].kind, new[0].layer, snap.step, self.max_bundles)
            return
        trigger = next((i for i in new if i.kind == "nonfinite"), new[0])
        self._pending = (snap, self._incident(snap, trigger, new, grad))
        self.bundles += 1

    def _incident(self, snap: Any, trigger: Any, new: list, grad: Any) -> Incident:
        import torch  # here, not at import: `gradflow-agent report BUNDLE` reads bundles without torch

        from ..stats.engine import transfer
        step = trigger.first_step if trigger.first_step is not None else trigger.step
        first = step - self.steps
        rows = grad.recent(first, step) if grad is not None else None
        losses = [(s, vals) for s, vals in list(self._losses) if first <= s <= step]
        groups: list[list[torch.Tensor]] = [[], []]
        if rows is not None and len(rows[0]):
            groups[0].append(rows[1])
        if losses:
            groups[1].append(torch.stack([
                torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device).mean() for v in vals]).mean()
                for _, vals in losses]))
        host = transfer(groups, self.device)  # the incident's one copy: the device queue is empty here
        L = len(snap.layers)
        grad_steps = rows[0] if groups[0] else np.zeros(0, dtype=np.int64)
        norms_rows = host[0][0].reshape(len(grad_steps), -1) if groups[0] else np.zeros((0, L + 1))
        steps = np.array(sorted(set(grad_steps.tolist()) | {s for s, _ in losses}), dtype=np.int64)
        index = {int(s): k for k, s in enumerate(steps)}
        norms = np.full((len(steps), norms_rows.shape[1] if norms_rows.size else L + 1), np.nan)
        for s, row in zip(grad_steps, norms_rows):
            norms[index[int(s)]] = row
        loss, has_loss = np.full(len(steps), np.nan), np.zeros(len(steps), dtype=bool)
        for (s, _), value in zip(losses, host[1][0] if losses else ()):
            loss[index[s]], has_loss[index[s]] = value, True
        return Incident(trigger=trigger, new=tuple(new), snapshot_step=snap.step, layers=snap.layers,
                        layer_types=snap.layer_types, origin=snap.nonfinite_origin, steps=steps, loss=loss,
                        has_loss=has_loss, norms=norms)

    def publish(self, snap: Any) -> None:
        """Remember the snapshot; hand the incident it opened (if any) to the writer thread."""
        self._snaps.append(snap)
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not snap:
            return
        if self._sink is None:
            self._sink = BackgroundSink(BundleWriter(self.directory, self.run, self.rank, self.labels, self.max_bytes,
                                                     self.steps, self.n_snapshots), self.errors, self.name)
        self._sink.publish(replace(pending[1], snapshots=tuple(self._snaps)))

    def close(self, deadline: float | None = None) -> None:
        """Write what is queued by `deadline` (the writer's thread exists only after an incident)."""
        if self._sink is not None:
            self._sink.close(deadline)


def _key(issue: Any) -> tuple[str, str]:
    # non-finite values spread from layer to layer: one incident whatever layer the issue names
    return (issue.kind, "" if issue.kind == "nonfinite" else issue.layer)


# -- writer thread ----------------------------------------------------------------------------------------
def _num(x: float, missing: bool = False) -> float | str | None:
    """JSON number with 6 significant digits; non-finite as "nan"/"inf"/"-inf" (a real NaN loss is news);
    `missing` (no value at all) as null."""
    if missing or x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return float(f"{x:.6g}")
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _norm(x: float) -> float | None:
    """A gradient norm: NaN in the ring means "no gradient read", written null."""
    return None if not math.isfinite(x) else float(f"{x:.6g}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:64] or "default"


class BundleWriter:
    """Serialises an Incident into one bounded JSON file, atomically; runs inside a BackgroundSink."""

    def __init__(self, directory: Path, run: str, rank: int, labels: dict[str, str], max_bytes: int,
                 steps: int, snapshots: int) -> None:
        self.directory = directory
        self.run, self.rank, self.labels = run, rank, labels
        self.max_bytes, self.steps, self.snapshots = max_bytes, steps, snapshots
        self.written: list[Path] = []

    def publish(self, incident: Incident) -> None:
        """Build, bound and write one bundle; log one line naming the file."""
        from .. import __version__

        text = encode(incident, run=self.run, rank=self.rank, labels=self.labels, version=__version__,
                      max_bytes=self.max_bytes, steps=self.steps, snapshots=self.snapshots)
        t = incident.trigger
        step = t.first_step if t.first_step is not None else t.step
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"gradflow-flight-{_safe(self.run)}-rank{self.rank}-step{step}-{_safe(t.kind)}"
        path, k = self.directory / f"{stem}.json", 1
        while path.exists():  # a restarted run with the same name: never overwrite a bundle
            k += 1
            path = self.directory / f"{stem}-{k}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(text.encode("ascii"))
        os.replace(tmp, path)  # a bundle is whole or absent
        self.written.append(path)
        # the path on a line of its own: the line fits a terminal (the demo's 80 columns)
        log.warning("gradflow_agent: flight recorder: %s at %s (step %d), %d bytes:\n  %s",
                    t.kind, t.layer, step, len(text), path)

    def close(self, deadline: float | None = None) -> None:
        """Nothing stays open between bundles."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


def encode(incident: Incident, *, run: str, rank: int, labels: dict[str, str], version: str, max_bytes: int,
           steps: int, snapshots: int) -> str:
    """The bundle's JSON text, at most `max_bytes` bytes: the oldest snapshots are left out first, then the
    oldest history rows (halving), then the snapshots, then the history; the trigger always stays."""
    t = incident.trigger
    L = len(incident.layers)
    layer_types = dict(zip(incident.layers, incident.layer_types))
    origin = incident.origin
    head: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "run": run, "rank": rank, "labels": labels,
        "agent_version": version, "written": time.time(),
        "trigger": {"kind": t.kind, "layer": t.layer, "layer_type": layer_types.get(t.layer, ""),
                    "severity": t.severity, "value": _num(t.value), "threshold": _num(t.threshold),
                    "step": t.first_step if t.first_step is not None else t.step,
                    "snapshot_step": incident.snapshot_step, "message": t.message,
                    "recommendation": t.recommendation},
        "origin": None if origin is None else {
            "step": int(origin[0]), "layer": incident.layers[origin[1]] if 0 <= origin[1] < L else None,
            "tensor": origin[2]},
        "issues": [i.to_dict() for i in incident.new],
    }
    rows = len(incident.steps)

    def history(keep: int) -> dict[str, Any]:
        sl = slice(rows - keep, rows)
        norms = incident.norms[sl]
        with np.errstate(invalid="ignore"):
            total = np.sqrt(np.nansum(np.square(norms), axis=1)) if norms.size else np.zeros(0)
        total = np.where(np.isnan(norms).all(axis=1), np.nan, total) if norms.size else total
        return {"steps": incident.steps[sl].tolist(), "layers": list(incident.layers),
                "loss": [_num(v, not h) for v, h in zip(incident.loss[sl], incident.has_loss[sl])],
                "grad_norm": [_norm(v) for v in total],
                "layer_grad_norm": [[_norm(v) for v in row[:L]] for row in norms]}

    snap_texts = [_dumps({**s.to_dict(), "labels": labels}) for s in incident.snapshots]
    keep_rows, with_history, with_snaps = rows, True, True
    while True:
        kept = len(snap_texts) if with_snaps else 0
        while True:  # the newest snapshots that fit beside the head
            body = dict(head, history=history(keep_rows) if with_history else None,
                        bounds={"steps": steps, "snapshots": snapshots, "max_bytes": max_bytes,
                                "history_rows_left_out": rows - (keep_rows if with_history else 0),
                                "snapshots_left_out": len(snap_texts) - kept})
            text = _dumps(body)[:-1] + ',"snapshots":[' + ",".join(snap_texts[len(snap_texts) - kept:]) + "]}"
            if len(text) <= max_bytes or kept <= 1:
                break
            kept -= 1
        if len(text) <= max_bytes:
            return text
        if with_history and keep_rows > 1:
            keep_rows //= 2  # the oldest half of the history goes
        elif with_snaps and snap_texts:
            with_snaps, keep_rows = False, rows  # no snapshot fits: the whole history, without them
        elif with_history and rows:
            with_history = False
        else:
            raise ValueError(f"flight recorder: even the trigger alone is {len(text)} bytes, over "
                             f"flight_recorder.max_bytes={max_bytes}")


def is_bundle(path: str | os.PathLike) -> bool:
    """Is `path` a flight-recorder bundle (its first bytes say so)?"""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded bundle; ValueError when the file is not one."""
    with open(path, "rb") as fh:
        data = json.loads(fh.read().decode("utf-8"))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a flight-recorder bundle")
    return data
