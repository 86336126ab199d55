"""Tracker bridges (TensorBoard, MLflow, W&B): real training runs, read back with each tracker's own reader.

The reference values are the JSONL recorder's records of the same run (Snapshot.to_dict: NaN -> None).
Each bridge's package is a `test` extra; a missing one fails with the line that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import gradflow_agent
from gradflow_agent.export.jsonl import read_snapshots
from gradflow_agent.export.tensorboard import LAYER_KEYS
from tests.conftest import config, train

ROOT = Path(__file__).resolve().parents[1]
MAX = 64
WIDE = 300
STALLED = 250  # the one layer left out of the optimizer: its updates are 0 (a "stalled" issue)


def _need(module: str, extra: str) -> None:
    """Fail (never skip) when a bridge's package is absent, saying how to install it."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install -e '.[test]' (or 'gradflow-agent[{extra}]')")


def _small():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1))


class Wide(torch.nn.Module):
    """WIDE parallel heads summed: many layers, each with its own gradient, fast on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(WIDE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(x) for h in self.heads]).mean(0)


# only "stalled" can fire: the wide test knows which layer has an issue
ONLY_STALLED = {"vanishing": 0.0, "exploding": 1.0e9, "dead_ratio": 1.0, "dead_unit_ratio": 1.0,
                "unstable_cv": 1.0e9, "saturation_ratio": 1.0}


def _run(tmp_path: Path, bridges: dict, wide: bool = False) -> list[dict]:
    """A training run with `bridges` and the JSONL recorder on; the recorder's records."""
    jsonl = tmp_path / "snapshots.jsonl"
    exporters = {"jsonl": {"enabled": True, "path": str(jsonl)}, **bridges}
    if wide:
        model = Wide()
        params = [p for i, h in enumerate(model.heads) if i != STALLED for p in h.parameters()]
        cfg = config(sampling={"export_every_n_steps": 4}, thresholds=ONLY_STALLED, exporters=exporters)
    else:
        model, cfg = _small(), config(sampling={"export_every_n_steps": 5}, exporters=exporters)
        params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    agent = gradflow_agent.attach(model, cfg, optimizer=opt)
    train(model, opt, 12 if wide else 20, agent)
    agent.detach()
    assert not agent.errors.counts, dict(agent.errors.counts)
    records = read_snapshots(jsonl)
    assert len(records) >= 3
    return records


def _expected(records: list[dict]) -> dict[str, dict[int, list[float]]]:
    """name -> step -> values, from the records, with the bridges' names (None = NaN: never written)."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for row in record["layers"]:
            for key in LAYER_KEYS:
                if row.get(key) is not None:
                    out[f"{key}/{row['layer']}"][record["step"]].append(row[key])
        for key in ("grad_norm", "loss"):
            if record[key] is not None:
                out[f"run/{key}"][record["step"]].append(record[key])
        out["run/issues"][record["step"]].append(float(len(record["issues"])))
    return out


def _check(expected, read, exact: bool) -> None:
    """Every expected series was written with the same values at the same steps (TensorBoard: float32)."""
    for name, by_step in expected.items():
        assert name in read, f"{name} was not written"
        for step, values in by_step.items():
            got = sorted(read[name].get(step, []))
            want = sorted(values)
            if not exact:  # W&B keeps one value per step: the last written
                got, want = got[-1:], values[-1:]
            assert got == pytest.approx(want, rel=1e-6, abs=1e-30), (name, step)


def _layer_names(read: dict, key: str) -> set[str]:
    return {name.split("/", 1)[1] for name in read if name.startswith(f"{key}/")}


def _check_wide(records: list[dict], read: dict, last: dict[str, float]) -> None:
    """At most MAX layers per statistic; the layer with the issue among them; the rest counted."""
    stalled = f"heads.{STALLED}"
    final = records[-1]
    assert [(i["kind"], i["layer"]) for i in final["issues"]] == [("stalled", stalled)]
    for key in ("grad_pressure", "param_norm", "health_score"):
        names = _layer_names(read, key)
        assert 0 < len(names) <= MAX, (key, len(names))
        assert stalled in names, key
    # documented order: the layer with the issue, then (all equally healthy) model order
    assert _layer_names(read, "grad_pressure") == {stalled} | {f"heads.{i}" for i in range(MAX - 1)}
    assert last["run/layers_not_shown"] == WIDE - MAX
    assert last["run/layers"] == WIDE
    assert last["run/issue_layers_not_shown"] == 0
    assert last["issues/stalled"] == 1


# -- TensorBoard ---------------------------------------------------------------------------------------------------

def _tensorboard(log_dir: Path) -> tuple[dict, dict[str, float], list[tuple[int, str]]]:
    """(name -> step -> values, last values, issue texts) read with TensorBoard's EventAccumulator."""
    _need("tensorboard", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    read: dict = defaultdict(lambda: defaultdict(list))
    last = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            read[tag][event.step].append(event.value)
        last[tag] = acc.Scalars(tag)[-1].value
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("issues")] \
        if "issues" in acc.Tags()["tensors"] else []
    return read, last, texts


def test_tensorboard_bridge_writes_the_snapshot_values(tmp_path):
    _need("tensorboard", "tensorboard")
    records = _run(tmp_path, {"tensorboard": {"enabled": True, "log_dir": str(tmp_path / "tb")}})
    read, last, _ = _tensorboard(tmp_path / "tb")
    _check(_expected(records), read, exact=True)
    assert "grad_pressure/1" not in read  # the ReLU has no parameter gradient: NaN, never written
    assert "activation_mean/1" in read and "grad_pressure/0" in read
    assert last["run/layers_not_shown"] == 0


def test_tensorboard_bounds_names_and_reports_issues_as_text(tmp_path):
    _need("tensorboard", "tensorboard")
    records = _run(tmp_path, {"tensorboard": {"enabled": True, "log_dir": str(tmp_path / "tb"), "max_layers": MAX}},
                   wide=True)
    read, last, texts = _tensorboard(tmp_path / "tb")
    _check_wide(records, read, last)
    first = next(r["step"] for r in records if r["issues"])
    assert texts and texts[0][0] == first  # one text when the issue first appears, not at every snapshot
    assert len(texts) == 1
    assert f"`stalled` at `heads.{STALLED}`" in texts[0][1]


# -- MLflow --------------------------------------------------------------------------------------------------------

def _mlflow(uri: str) -> tuple[dict, dict[str, float], object, object]:
    """(name -> step -> values, last values, run, client) read with MlflowClient."""
    _need("mlflow", "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gradflow-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    read: dict = defaultdict(lambda: defaultdict(list))
    for name in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, name):
            read[name][metric.step].append(metric.value)
    return read, dict(run.data.metrics), run, client


def _mlflow_config(tmp_path: Path, **extra) -> tuple[str, dict]:
    uri = (tmp_path / "mlruns").as_uri()
    return uri, {"mlflow": {"enabled": True, "tracking_uri": uri, "experiment": "gradflow-test",
                            "run_name": "bridge", **extra}}


def test_mlflow_bridge_logs_the_snapshot_values_and_ends_its_run(tmp_path, monkeypatch):
    _need("mlflow", "mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the bridge allows the store it was given
    uri, bridges = _mlflow_config(tmp_path)
    records = _run(tmp_path, bridges)
    read, last, run, _ = _mlflow(uri)
    _check(_expected(records), read, exact=True)
    assert "grad_pressure/1" not in read
    assert run.info.status == "FINISHED" and run.info.run_name == "bridge"
    assert run.data.tags["gradflow.run"] == "default" and run.data.tags["gradflow.rank"] == "0"
    assert last["run/layers_not_shown"] == 0


def test_mlflow_bounds_names_and_tags_issues(tmp_path):
    _need("mlflow", "mlflow")
    uri, bridges = _mlflow_config(tmp_path, max_layers=MAX)
    records = _run(tmp_path, bridges, wide=True)
    read, last, run, client = _mlflow(uri)
    _check_wide(records, read, last)
    assert run.data.tags["gradflow.active_issues"] == "1"
    assert f"stalled at heads.{STALLED}" in run.data.tags["gradflow.issues"]
    path = client.download_artifacts(run.info.run_id, "gradflow/issues.md", str(tmp_path))
    text = Path(path).read_text(encoding="utf-8")
    assert f"`stalled` at `heads.{STALLED}`" in text and "## Active" in text


# -- Weights & Biases ----------------------------------------------------------------------------------------------

def _wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`), decoded with wandb's own protobuf schema.

    wandb >= 0.2x has no Python reader of its own (the datastore moved into wandb-core; `wandb sync --view`
    was removed); the file is the LevelDB log format behind a 7-byte ":W&B" header: 32 KiB blocks of
    records, each `crc32 (4) | length (2) | type (1) | data`, type 1 full, 2 first, 3 middle, 4 last.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: bad record at byte {pos}"
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _finished(path: Path) -> bool:
    """Whether the transaction log holds the run's exit record (read whole, every record checked)."""
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path))
    except AssertionError:  # still empty or mid-record
        return False


def _wandb(base: Path) -> tuple[dict, dict[str, float], dict]:
    """(name -> step -> values, last values, summary) of the one offline run under `base`."""
    _need("wandb", "wandb")
    files = list(base.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # finish() returns once wandb-core has the exit record; its writer closes the file just after
    deadline = time.monotonic() + 15
    while not _finished(files[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    read: dict = defaultdict(lambda: defaultdict(list))
    last: dict[str, float] = {}
    summary: dict = {}
    kinds = set()
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            step = row.get("gradflow/step", record.history.step.num)
            for name, value in row.items():
                if not name.startswith("_") and isinstance(value, (int, float)):
                    read[name][step] = [value]  # one row per step: the last logged
                    last[name] = value
        elif kind == "summary":
            for item in record.summary.update:
                summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    assert "exit" in kinds, "the run was not finished"
    return read, last, summary


def _wandb_config(tmp_path: Path, **extra) -> dict:
    return {"wandb": {"enabled": True, "project": "gradflow-test", "dir": str(tmp_path / "wb"), **extra}}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No W&B settings from the outer shell, no network, quiet."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_wandb_bridge_logs_the_snapshot_values_offline(tmp_path, wandb_env):
    _need("wandb", "wandb")
    records = _run(tmp_path, _wandb_config(tmp_path))
    read, last, _ = _wandb(tmp_path / "wb")
    _check(_expected(records), read, exact=False)
    assert "grad_pressure/1" not in read
    assert last["run/layers_not_shown"] == 0


def test_wandb_bounds_names_and_summarises_issues(tmp_path, wandb_env):
    _need("wandb", "wandb")
    records = _run(tmp_path, _wandb_config(tmp_path, max_layers=MAX), wide=True)
    read, last, summary = _wandb(tmp_path / "wb")
    _check_wide(records, read, last)
    active = summary["gradflow/active_issues"]
    assert [(i["kind"], i["layer"]) for i in active] == [("stalled", f"heads.{STALLED}")]
    assert [e["event"] for e in summary["gradflow/issue_events"]] == ["appeared"]


def test_wandb_bridge_logs_into_the_users_open_run(tmp_path, wandb_env):
    _need("wandb", "wandb")
    import wandb

    run = wandb.init(project="user", mode="offline", dir=str(tmp_path / "wb"),
                     settings=wandb.Settings(console="off"))
    try:
        run.log({"user/metric": 1.0}, step=1000)  # the user's steps, far ahead of the optimizer's
        records = _run(tmp_path, _wandb_config(tmp_path))
        assert wandb.run is run  # left open for the user
        run.log({"user/metric": 2.0})  # the user's run goes on after detach
    finally:
        run.finish()
    read, _, _ = _wandb(tmp_path / "wb")
    _check(_expected(records), read, exact=False)  # steps read from gradflow/step
    assert sorted(v for values in read["user/metric"].values() for v in values) == [1.0, 2.0]


# -- a missing package names its extra -----------------------------------------------------------------------------

@pytest.mark.parametrize(("module", "extra", "section"), [
    ("tensorboard", "tensorboard", {"log_dir": "tb"}),
    ("mlflow", "mlflow", {"tracking_uri": "file:./mlruns"}),
    ("wandb", "wandb", {"mode": "offline"}),
])
def test_a_missing_package_names_its_extra(tmp_path, module, extra, section):
    cfg = {"exporters": {"prometheus": {"enabled": False}, extra: {"enabled": True, **section}}}
    code = (f"import sys\nsys.modules[{module!r}] = None\nimport torch, gradflow_agent\n"
            "from gradflow_agent._optional import MissingExtraError\n"
            "try:\n"
            f"    gradflow_agent.attach(torch.nn.Linear(2, 2), {cfg!r})\n"
            "except Exception as exc:\n"
            "    assert isinstance(exc.__cause__, MissingExtraError), repr(exc.__cause__)\n"
            "    print(exc)\n"
            "else:\n    print('attached')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={**_env(), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"exporters.{extra} needs the {extra} extra: pip install 'gradflow-agent[{extra}]'" in out.stdout


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("GRADFLOW_", "WANDB_", "MLFLOW_"))}


def test_bad_bridge_values_are_config_errors():
    from gradflow_agent.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"exporters\.wandb\.mode"):
        load_config(config(exporters={"wandb": {"mode": "cloud"}}))
    for bridge in ("tensorboard", "mlflow", "wandb"):
        with pytest.raises(ConfigError, match=rf"exporters\.{bridge}\.max_layers"):
            load_config(config(exporters={bridge: {"max_layers": 0}}))
