"""TensorBoard bridge: event files with per-layer scalars and issue text, for the TensorBoard already open.

Written with the `tensorboard` package's own event-file writer and summary protos (the `tensorboard` extra);
`torch.utils.tensorboard` needs the same package and costs a third of a second more to import.

This module also holds what the three tracker bridges (TensorBoard, MLflow, W&B) share, so that the three
write the same names: `BridgeView` turns a snapshot into bounded scalars and issue changes.

Names (the same in every bridge; `<layer>` is the module's qualified name):

* `<statistic>/<layer>`: each per-layer gauge of export/metrics.py (`grad_pressure/<layer>`, ...) and
  `health_score/<layer>`; NaN ("no data") is never written.
* `run/grad_norm`, `run/loss`, `run/health_min`, `run/issues`, `run/layers`, `run/layers_not_shown`,
  `run/issue_layers_not_shown` and the run counters (`run/steps_total`, `run/overhead_ratio`, ...);
  `issues/<kind>`: layers with an active issue of that kind.

At most `max_layers` layers are written per statistic and snapshot: the layers with active issues first
(critical before warning), then the lowest health scores, then the layers written last time (so the set
changes only when something gets worse), then model order. `run/layers_not_shown` counts the rest, so a
layer left out never reads as healthy. This is deliberately not the Prometheus series budget's choice
(export/budget.py): a tracker keeps every name it was ever sent, so the set written must stay stable
from one snapshot to the next, where the budget follows the worst layers of each snapshot.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .._optional import require
from ..detect.spec import severity_rank
from ..snapshot import Snapshot
from .metrics import LAYER_GAUGES

# Run counters written as run/<key>: bounded, and what a person on call compares with the loss curve.
RUN_COUNTERS = ("steps_total", "overhead_seconds_total", "layers", "layers_skipped", "optimizer_steps_skipped_total",
                "activation_every_steps", "parameter_every_steps", "overhead_ratio", "grad_scale")
LAYER_KEYS = (*LAYER_GAUGES, "health_score")
MAX_ISSUE_LINES = 50  # lines of one issue text before "... and N more"
_UNSAFE = re.compile(r"[^\w./\- :]")  # characters MLflow refuses in a metric name; TensorBoard and W&B accept these


def series_name(statistic: str, layer: str) -> str:
    """`<statistic>/<layer>`, with characters no tracker accepts replaced by `_`."""
    return f"{statistic}/{_UNSAFE.sub('_', layer)}"


@dataclass(frozen=True)
class IssueChanges:
    """Issues (layer, kind) that appeared since the previous snapshot and those that cleared."""

    appeared: tuple = ()  # detect.Issue
    cleared: tuple[tuple[str, str], ...] = ()  # (layer, kind)

    def __bool__(self) -> bool:
        return bool(self.appeared or self.cleared)

    def lines(self, step: int) -> list[str]:
        """One Markdown line per change (at most MAX_ISSUE_LINES, then a count of the rest)."""
        out = [f"- **{i.severity}** `{i.kind}` at `{i.layer}` (step {step}): {i.message}" for i in self.appeared]
        out += [f"- cleared: `{kind}` at `{layer}` (step {step})" for layer, kind in self.cleared]
        if len(out) > MAX_ISSUE_LINES:
            out = [*out[:MAX_ISSUE_LINES], f"- ... and {len(out) - MAX_ISSUE_LINES} more"]
        return out


@dataclass
class BridgeView:
    """What one bridge writes for each snapshot: bounded scalars and issue changes (one per bridge: it
    remembers the layers and issues it wrote last)."""

    max_layers: int
    shown: frozenset[str] = field(default_factory=frozenset)
    active: dict[tuple[str, str], object] = field(default_factory=dict)

    def select(self, snap: Snapshot) -> list[int]:
        """Indices of the layers to write, in model order (see the module docstring for the ranking)."""
        n = len(snap.layers)
        if n <= self.max_layers:
            return list(range(n))
        severity: dict[str, int] = {}  # layer -> its worst issue, most severe lowest
        for issue in snap.issues:
            rank = -severity_rank(issue.severity)
            severity[issue.layer] = min(rank, severity.get(issue.layer, rank))
        health = snap.health if snap.health is not None else np.full(n, np.nan)
        none = 1  # no issue: after every severity

        def rank(i: int) -> tuple:
            name = snap.layers[i]
            score = float(health[i])
            return (severity.get(name, none), score if not math.isnan(score) else 100.0,
                    name not in self.shown, i)

        return sorted(sorted(range(n), key=rank)[: self.max_layers])

    def scalars(self, snap: Snapshot) -> dict[str, float]:
        """Every name -> value to write for `snap` (NaN and missing values left out)."""
        chosen = self.select(snap)
        self.shown = frozenset(snap.layers[i] for i in chosen)
        values: dict[str, float] = {}
        for key in LAYER_KEYS:
            column = snap.health if key == "health_score" else snap.stats.get(key)
            if column is None:
                continue
            for i in chosen:
                value = float(column[i])
                if not math.isnan(value):
                    values[series_name(key, snap.layers[i])] = value
        issue_layers = {issue.layer for issue in snap.issues}
        run = {"grad_norm": snap.grad_norm, "loss": snap.loss, "issues": len(snap.issues),
               "layers": len(snap.layers), "layers_not_shown": len(snap.layers) - len(chosen),
               "issue_layers_not_shown": len(issue_layers - self.shown)}
        if snap.health is not None and np.isfinite(snap.health).any():
            run["health_min"] = float(np.nanmin(snap.health))
        for key in RUN_COUNTERS:
            if key in snap.counters:
                run[key] = snap.counters[key]
        for key, value in run.items():
            if value is not None and not math.isnan(float(value)):
                values[f"run/{key}"] = float(value)
        kinds: dict[str, set[str]] = {}
        for issue in snap.issues:
            kinds.setdefault(issue.kind, set()).add(issue.layer)
        for kind in sorted(kinds):
            values[f"issues/{kind}"] = float(len(kinds[kind]))
        for (_, kind) in self.active:  # a kind that cleared reads 0, not its last count
            values.setdefault(f"issues/{kind}", 0.0)
        return values

    def issue_changes(self, snap: Snapshot) -> IssueChanges:
        """The issues that appeared or cleared since the previous call; remembers the current set."""
        current = {(i.layer, i.kind): i for i in snap.issues}
        appeared = tuple(i for key, i in current.items() if key not in self.active)
        cleared = tuple(key for key in self.active if key not in current)
        self.active = current
        return IssueChanges(appeared, cleared)

    def active_issues(self) -> Iterable:
        """The issues active at the last issue_changes() call."""
        return self.active.values()


class TensorBoardSink:
    """Writes each snapshot as TensorBoard scalars (step = the snapshot's step) and issue changes as text
    (tag `issues`); runs inside a BackgroundSink."""

    def __init__(self, log_dir: str, max_layers: int, labels: dict[str, str]) -> None:
        require("tensorboard", "tensorboard", "exporters.tensorboard")
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
        from tensorboard.plugins.text import plugin_data_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._pb = (event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, plugin_data_pb2)
        self.view = BridgeView(max_layers)
        self.labels = labels
        suffix = "".join(f".{_UNSAFE.sub('_', v)}" for v in (labels.get("run", ""), labels.get("rank", "")) if v)
        try:
            self._writer = EventFileWriter(log_dir, max_queue_size=1024, flush_secs=10, filename_suffix=suffix)
        except Exception as exc:
            raise OSError(f"exporters.tensorboard.log_dir {log_dir!r} cannot be written: {exc}") from exc
        self.log_dir = self._writer.get_logdir()

    def publish(self, snap: Snapshot) -> None:
        """One event per snapshot with every scalar; one text event when issues appear or clear."""
        event_pb2, summary_pb2 = self._pb[0], self._pb[1]
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=value)
                  for tag, value in self.view.scalars(snap).items()]
        self._writer.add_event(event_pb2.Event(wall_time=snap.time, step=snap.step,
                                               summary=summary_pb2.Summary(value=values)))
        changes = self.view.issue_changes(snap)
        if changes:
            self._writer.add_event(event_pb2.Event(wall_time=snap.time, step=snap.step,
                                                   summary=summary_pb2.Summary(value=[self._text(changes, snap)])))
        self._writer.flush()  # a reader (TensorBoard, the person on call) sees each snapshot at once

    def _text(self, changes: IssueChanges, snap: Snapshot):
        """A text-plugin summary value (what TensorBoard's TEXT tab shows) listing the changes."""
        _, summary_pb2, tensor_pb2, tensor_shape_pb2, plugin_data_pb2 = self._pb
        active = len(self.view.active)
        body = "\n".join([f"{active} active issue(s) at step {snap.step}", "", *changes.lines(snap.step)])
        metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name="text", content=plugin_data_pb2.TextPluginData(version=0).SerializeToString()))
        tensor = tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[body.encode("utf-8")],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        return summary_pb2.Summary.Value(tag="issues", metadata=metadata, tensor=tensor)

    def close(self, deadline: float | None = None) -> None:
        """Flush and close the event file (a local write; it does not wait on the network)."""
        self._writer.close()
