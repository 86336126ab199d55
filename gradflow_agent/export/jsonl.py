"""JSONL recorder: one snapshot per line, appended (a flight record `gradflow-agent report` reads).

A process killed mid-write leaves a torn last line. The recorder, appending to such a file, first ends
that line, so the torn tail stays one bad line and the resumed run's records are intact; the reader
skips undecodable lines, counts them and warns once (file name and line numbers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("gradflow_agent")


class JsonlPathError(OSError):
    """The recorder's path cannot be opened for appending (a configuration problem)."""


class JsonlRecorder:
    """Appends each published snapshot as one JSON line; meant to run inside a BackgroundSink."""

    def __init__(self, path: str, labels: dict[str, str]) -> None:
        self.path = Path(path)
        self.labels = labels
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the run
        except OSError as exc:
            raise JsonlPathError(exc.errno, f"exporters.jsonl.path {str(path)!r} cannot be opened for appending: "
                                            f"{exc.strerror or exc}", str(path)) from exc
        try:
            if self._fh.tell() > 0 and not _ends_with_newline(self.path):
                self._fh.write(b"\n")  # end a torn last line (a run killed mid-write) before appending
                self._fh.flush()
        except OSError as exc:
            self._fh.close()
            raise JsonlPathError(exc.errno, f"exporters.jsonl.path {str(path)!r} cannot be appended to: "
                                            f"{exc.strerror or exc}", str(path)) from exc

    def publish(self, snap) -> None:
        """One line per snapshot, written with one call and flushed (a crash tears at most the last line)."""
        record = snap.to_dict()
        record["labels"] = self.labels
        self._fh.write((json.dumps(record, allow_nan=False) + "\n").encode("utf-8"))
        self._fh.flush()

    def close(self, deadline: float | None = None) -> None:
        """Close the file (writes are flushed as they happen; nothing here waits on the deadline)."""
        self._fh.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


class SnapshotFile(NamedTuple):
    """The records of a JSONL flight record and the (1-based) numbers of the lines that were skipped."""

    records: list[dict]
    skipped_lines: list[int]


def scan_snapshots(path: str | Path) -> SnapshotFile:
    """Decode every line; blank lines are ignored, undecodable ones (a torn last line) are skipped and listed."""
    records: list[dict] = []
    skipped: list[int] = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                skipped.append(number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped.append(number)
    return SnapshotFile(records, skipped)


def describe_skipped(path: str | Path, skipped: list[int]) -> str:
    """'FILE: skipped N undecodable line(s): 3, 9' (the first ten numbers), for warnings and the CLI."""
    shown = ", ".join(str(n) for n in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
    return f"{path}: skipped {len(skipped)} undecodable line(s) (line {shown}; a torn line is what a run " \
           f"killed mid-write leaves)"


def read_snapshots(path: str | Path) -> list[dict]:
    """The records of a JSONL file written by the recorder; undecodable lines are skipped with one warning."""
    result = scan_snapshots(path)
    if result.skipped_lines:
        log.warning("gradflow_agent: %s", describe_skipped(path, result.skipped_lines))
    return result.records
