"""Two DDP ranks (gloo, CPU): per-rank series on their own ports, and the single-process global norm."""

from __future__ import annotations

import copy
import json
import os
import urllib.request

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradflow_agent
from tests.conftest import config
from tests.support.prometheus import free_port, free_port_run

STEPS = 3


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 8, generator=g) for _ in range(STEPS)]
    return model, batches


def _loss(model, x):
    return (model(x) - x[:, :1]).pow(2).mean()


def _worker(rank: int, world: int, port: int, metrics_port: int, out_dir: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, batches = _setup()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        agent = gradflow_agent.attach(ddp, config(exporters={"prometheus": {
            "enabled": True, "port": metrics_port, "addr": "127.0.0.1"}}), optimizer=opt)
        for x in batches:
            half = x[rank * 8:(rank + 1) * 8]  # each rank sees half of the batch
            _loss(ddp, half).backward()
            opt.step()
            opt.zero_grad()
            agent.step()
        snap = agent.snapshot()
        text = urllib.request.urlopen(agent.prometheus_url, timeout=5).read().decode()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"grad_norm": snap.grad_norm, "url": agent.prometheus_url, "metrics": text,
                       "step": snap.step, "pressure": snap.layer("module.0")["grad_pressure"]}, fh)
        agent.detach()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_export_their_own_series_and_the_global_norm(tmp_path):
    base = free_port_run(2)  # rank r serves on base + r
    mp.spawn(_worker, args=(2, free_port(), base, str(tmp_path)), nprocs=2, join=True)
    model, batches = _setup()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    pressures = []
    for x in batches:
        _loss(reference, x).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters())).item()
        first = reference[0]
        pressures.append(torch.sqrt(first.weight.grad.pow(2).sum() + first.bias.grad.pow(2).sum()).item())
        opt.step()
        opt.zero_grad()
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["step"] == STEPS
        assert result["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the averaged, global gradient
        assert result["pressure"] == pytest.approx(sum(pressures) / STEPS, rel=1e-5)
        assert result["url"].endswith(f":{base + rank}/metrics")  # base port + local rank
        lines = [line for line in result["metrics"].splitlines() if line.startswith("gradflow_steps_total")]
        assert lines == [f'gradflow_steps_total{{rank="{rank}",run="default"}} 3.0']


# -- a combined data-parallel job: activations reduced over the ranks, per-layer series exported once ----

ACT_KEYS = ("activation_mean", "activation_std", "activation_absmax", "activation_zero_ratio",
            "activation_saturation_ratio", "activation_dead_unit_ratio", "grad_pressure", "update_ratio")
COMBINED = {"stats": {"activations": {"sample_elements": 0, "dead_units": True}},
            "sampling": {"window": 4}}


def _act_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _act_batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(16, 8, generator=g) * 3 for _ in range(6)]


def _combined_worker(rank: int, world: int, port: int, metrics_port: int, out_dir: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _act_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        agent = gradflow_agent.attach(model, config(**COMBINED, exporters={"prometheus": {
            "enabled": True, "port": metrics_port, "addr": "127.0.0.1", "per_rank": "false"}}), optimizer=opt)
        for x in _act_batches():
            _loss(ddp, x[rank * 8:(rank + 1) * 8]).backward()  # each rank: its half of the batch
            opt.step()
            opt.zero_grad()
            agent.step()
        snap = agent.snapshot()
        text = urllib.request.urlopen(agent.prometheus_url, timeout=5).read().decode()
        with open(os.path.join(out_dir, f"combined{rank}.json"), "w") as fh:
            json.dump({"stats": {k: snap.stats[k].tolist() for k in ACT_KEYS}, "metrics": text,
                       "combined": agent.combined}, fh)
        agent.detach()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_combined_ddp_job_has_the_single_process_activation_statistics_exported_once(tmp_path):
    mp.spawn(_combined_worker, args=(2, free_port(), free_port(), str(tmp_path)), nprocs=2, join=True)
    model = _act_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = gradflow_agent.attach(model, config(**COMBINED), optimizer=opt)
    for x in _act_batches():  # one process, the whole batch
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()
        agent.step()
    reference = agent.snapshot()
    agent.detach()
    results = [json.loads((tmp_path / f"combined{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert result["combined"]
        for key in ACT_KEYS:
            assert result["stats"][key] == pytest.approx(reference.stats[key].tolist(), rel=1e-5, abs=1e-7,
                                                         nan_ok=True), key
    # the dead-unit and zero statistics really combine: a rank alone would see other values
    assert any(v == v for v in results[0]["stats"]["activation_dead_unit_ratio"])
    rank0 = [line for line in results[0]["metrics"].splitlines() if 'layer="' in line and not line.startswith("#")]
    rank1 = [line for line in results[1]["metrics"].splitlines() if 'layer="' in line and not line.startswith("#")]
    assert rank0 and not rank1, rank1[:3]  # per-layer series once per job, by rank 0
    assert any(line.startswith("gradflow_steps_total") for line in results[1]["metrics"].splitlines())
