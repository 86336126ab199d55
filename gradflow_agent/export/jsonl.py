"""JSONL recorder: one snapshot per line, appended (a flight record `gradflow-agent report` reads)."""

from __future__ import annotations

import json
from pathlib import Path


class JsonlRecorder:
    def __init__(self, path: str, labels: dict[str, str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.labels = labels
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def publish(self, snap) -> None:
        record = snap.to_dict()
        record["labels"] = self.labels
        self._fh.write(json.dumps(record, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_snapshots(path: str | Path) -> list[dict]:
    """The records of a JSONL file written by the recorder."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
