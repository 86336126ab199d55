"""MLflow bridge: per-layer statistics as MLflow metrics (step = the snapshot's step), issues as tags and a
text artifact, through `MlflowClient` (thread-safe, unlike the fluent API's thread-local active run).

Needs the `mlflow` extra (`mlflow-skinny`: the tracking client, file store included, without the server's
pandas/scikit-learn). Names are the shared bridge names (export/tensorboard.py `BridgeView`).

MLflow 3 refuses its file store unless `MLFLOW_ALLOW_FILE_STORE=true`: a `file:` URI (or a plain path) set
in `exporters.mlflow.tracking_uri` is an explicit choice of that store, so the bridge sets the variable
(unless the environment already sets it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .._optional import require
from ..snapshot import Snapshot
from .tensorboard import BridgeView
from .worker import call_by_deadline

BATCH = 1000  # MLflow's limit of metrics per log_batch call
MAX_EVENTS = 1000  # issue events kept for the artifact (the newest)
TAG_CHARS = 5000  # MLflow tag values are capped (5000 characters in older servers)
ARTIFACT = "gradflow/issues.md"


class MlflowBridgeError(RuntimeError):
    """The MLflow bridge cannot start: the message names the config key."""


def _tracking_uri(uri: str) -> str:
    """A plain path becomes a file: URI; the file store is allowed when the user chose it here."""
    if uri and "://" not in uri and not uri.startswith("file:") and ":" not in uri.split("/", 1)[0]:
        uri = Path(uri).resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


class MlflowSink:
    """Logs each snapshot with `log_batch` into an MLflow run; runs inside a BackgroundSink.

    With `tracking_uri` and `run_name` both empty and a run active in the attaching thread
    (`mlflow.start_run()`), the metrics go into that run and the bridge leaves it open; otherwise the
    bridge starts its own run in `experiment` and ends it at close.
    """

    def __init__(self, cfg, labels: dict[str, str], default_run_name: str) -> None:
        mlflow = require("mlflow", "mlflow", "exporters.mlflow")
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.view = BridgeView(cfg.max_layers)
        self.events: list[str] = []
        uri = _tracking_uri(cfg.tracking_uri)
        active = mlflow.active_run() if not cfg.tracking_uri and not cfg.run_name else None
        try:
            self.client = MlflowClient(tracking_uri=uri or None)
            if active is not None:
                self.run_id, self.owned = active.info.run_id, False
            else:
                experiment = self.client.get_experiment_by_name(cfg.experiment)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else self.client.create_experiment(cfg.experiment))
                tags = {f"gradflow.{k}": v for k, v in labels.items()}
                run = self.client.create_run(experiment_id, run_name=cfg.run_name or default_run_name, tags=tags)
                self.run_id, self.owned = run.info.run_id, True
        except Exception as exc:
            where = uri or mlflow.get_tracking_uri()
            raise MlflowBridgeError(f"exporters.mlflow.tracking_uri {where!r}: cannot start an MLflow run in "
                                    f"experiment {cfg.experiment!r}: {type(exc).__name__}: {exc}") from exc
        self.tracking_uri = self.client.tracking_uri

    def publish(self, snap: Snapshot) -> None:
        """One log_batch per 1000 metrics, all at the snapshot's step; issue tags and artifact on change."""
        stamp = int(snap.time * 1000)
        metrics = [self._metric(key, value, stamp, snap.step) for key, value in self.view.scalars(snap).items()]
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH], synchronous=True)
        changes = self.view.issue_changes(snap)
        if not changes:
            return
        self.events = [*self.events, *changes.lines(snap.step)][-MAX_EVENTS:]
        active = [f"[{i.severity}] {i.kind} at {i.layer}: {i.message}" for i in self.view.active_issues()]
        summary = "; ".join(active) or "none"
        self.client.set_tag(self.run_id, "gradflow.active_issues", str(len(active)))
        self.client.set_tag(self.run_id, "gradflow.issues", summary[:TAG_CHARS])
        text = "\n".join([f"# gradflow issues (step {snap.step})", "", "## Active", "",
                          *(f"- {line}" for line in active or ["none"]), "", "## Changes", "", *self.events, ""])
        self.client.log_text(self.run_id, text, ARTIFACT)

    def close(self, deadline: float | None = None) -> None:
        """End the bridge's own run (FINISHED) by `deadline`; a run it did not start is left open."""
        if not self.owned:
            return
        call_by_deadline(
            lambda: self.client.set_terminated(self.run_id, "FINISHED", end_time=int(time.time() * 1000)),
            deadline, "gradflow-mlflow-close", f"mlflow: run {self.run_id} was not ended")
