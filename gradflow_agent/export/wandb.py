"""Weights & Biases bridge: per-layer statistics as W&B history (step = the snapshot's step), active issues
and their changes in the run summary. Offline by default: nothing leaves the machine until `wandb sync`.

Needs the `wandb` extra. Names are the shared bridge names (export/tensorboard.py `BridgeView`).
"""

from __future__ import annotations

from pathlib import Path

from .._optional import require
from ..snapshot import Snapshot
from .tensorboard import LAYER_KEYS, BridgeView
from .worker import call_by_deadline

MAX_EVENTS = 200  # issue changes kept in the summary (the newest)
MAX_ACTIVE = 100  # active issues listed in the summary (all are counted in run/issues)
STEP_METRIC = "gradflow/step"  # the bridge's own x-axis inside a run that the user opened


class WandbBridgeError(RuntimeError):
    """The W&B bridge cannot start: the message names the config key."""


class WandbSink:
    """Logs each snapshot with `run.log(..., step=)`; runs inside a BackgroundSink.

    When a run is already open in the process (`wandb.run`), the bridge logs into it instead of opening a
    second one (which, by W&B's default, would finish the user's run): there its values carry their own
    x-axis `gradflow/step` (W&B steps belong to the user) and the run is left open at close.
    """

    def __init__(self, cfg, labels: dict[str, str], default_run_name: str) -> None:
        wandb = require("wandb", "wandb", "exporters.wandb")
        self.view = BridgeView(cfg.max_layers)
        self.events: list[dict] = []
        if wandb.run is not None:
            self.run, self.owned = wandb.run, False
            self.run.define_metric(STEP_METRIC)
            for prefix in (*LAYER_KEYS, "run", "issues"):
                self.run.define_metric(f"{prefix}/*", step_metric=STEP_METRIC)
            return
        try:
            if cfg.dir:
                Path(cfg.dir).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=cfg.project, mode=cfg.mode, dir=cfg.dir or None,
                                  name=cfg.run_name or default_run_name, config={"gradflow": dict(labels)},
                                  reinit="create_new", settings=wandb.Settings(console="off", quiet=True))
        except Exception as exc:
            raise WandbBridgeError(f"exporters.wandb (mode {cfg.mode!r}, project {cfg.project!r}): cannot start "
                                   f"a W&B run: {type(exc).__name__}: {exc}") from exc
        self.owned = True
        self.dir = getattr(self.run, "dir", None)

    def publish(self, snap: Snapshot) -> None:
        """One history row per snapshot; the summary's issue entries when issues appear or clear."""
        values = self.view.scalars(snap)
        if self.owned:
            self.run.log(values, step=snap.step)
        else:
            self.run.log({**values, STEP_METRIC: snap.step})
        changes = self.view.issue_changes(snap)
        if not changes:
            return
        self.events = [*self.events,
                       *({"step": snap.step, "event": "appeared", "kind": i.kind, "layer": i.layer,
                          "severity": i.severity, "message": i.message} for i in changes.appeared),
                       *({"step": snap.step, "event": "cleared", "kind": kind, "layer": layer}
                         for layer, kind in changes.cleared)][-MAX_EVENTS:]
        active = [{"kind": i.kind, "layer": i.layer, "severity": i.severity, "step": i.step, "message": i.message}
                  for i in self.view.active_issues()]
        self.run.summary.update({"gradflow/active_issues": active[:MAX_ACTIVE],
                                 "gradflow/issue_events": list(self.events)})

    def close(self, deadline: float | None = None) -> None:
        """Finish the bridge's own run by `deadline` (offline: the local run files); a user's run stays open."""
        if not self.owned:
            return
        call_by_deadline(self.run.finish, deadline, "gradflow-wandb-close", "wandb: the run did not finish")
