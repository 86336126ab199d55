"""FSDP2 (`fully_shard`) on two gloo ranks: the statistics of the whole tensors, attached before or after.

Each rank trains on half of every batch; the reference is one unsharded process on the whole batch
(FSDP averages the gradients, so they equal the full batch's). Every per-layer gradient and parameter
statistic and the global norm must match on every rank, to float32 reduction error.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradflow_agent
from tests.conftest import config
from tests.support.prometheus import free_port

STEPS = 8  # one interval: the first agreed snapshot of a sharded run comes after 10 steps
STATS = ("grad_pressure", "grad_pressure_max", "grad_turbulence", "grad_zero_ratio", "param_norm", "update_ratio")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 15), nn.Tanh(), nn.Linear(15, 1))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) for _ in range(STEPS)]


def _cfg():
    return config(stats={"parameters": {"update_ratio": "exact", "every_n_steps": 1}},
                  sampling={"window": 6, "export_every_n_steps": 1000})


def _train(model, opt, agent, batches, part=None):
    for x in batches:
        x = x if part is None else x[part * 8:(part + 1) * 8]
        (model(x) - x[:, :1]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        agent.step()


def _worker(rank: int, world: int, port: int, mode: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard
        model = _model()

        def shard():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(model)

        if mode == "after":
            shard()
            agent = gradflow_agent.attach(model, _cfg())
        else:
            agent = gradflow_agent.attach(model, _cfg())
            shard()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        _train(model, opt, agent, _batches(), part=rank)
        snap = agent.snapshot()
        out = {k: [snap.layer(n)[k] for n in ("0", "2", "4")] for k in STATS}
        out.update(grad_norm=snap.grad_norm, step=snap.step, errors=dict(snap.errors),
                   health=[snap.layer(n)["health_score"] for n in ("0", "2", "4")])
        with open(os.path.join(out_dir, f"{mode}{rank}.json"), "w") as fh:
            json.dump(out, fh)
        agent.detach()
    finally:
        dist.barrier()  # no rank tears gloo down while the other still talks to it
        dist.destroy_process_group()


def _reference() -> dict:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = gradflow_agent.attach(model, _cfg(), optimizer=opt)
    _train(model, opt, agent, _batches())
    snap = agent.snapshot()
    agent.detach()
    out = {k: [snap.layer(n)[k] for n in ("0", "2", "4")] for k in STATS}
    out["grad_norm"] = snap.grad_norm
    return out


@pytest.mark.parametrize("mode", ["after", "before"])
def test_fsdp2_statistics_are_those_of_the_whole_tensors_on_every_rank(tmp_path, mode):
    mp.spawn(_worker, args=(2, free_port(), mode, str(tmp_path)), nprocs=2, join=True)
    want = _reference()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{mode}{rank}.json").read_text())
        assert got["step"] == STEPS and not got["errors"], got["errors"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        for k in STATS:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-9), (k, rank)
        assert all(h == 100.0 for h in got["health"])


def _uneven_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import time
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard
        model = _model()
        fully_shard(model)
        agent = gradflow_agent.attach(model, config(sampling={"export_every_seconds": 0.05,
                                                              "export_every_n_steps": 1000}))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        published = []
        for x in _batches() * 4:
            if rank == 1:
                time.sleep(0.02)  # a slower rank: its clock says "publish" at other steps than rank 0's
            (model(x[:8]) - x[:8, :1]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            published.append(agent.latest.step)
        with open(os.path.join(out_dir, f"uneven{rank}.json"), "w") as fh:
            json.dump({"published": sorted(set(published)), "errors": dict(agent.latest.errors)}, fh)
        agent.detach()
    finally:
        dist.barrier()  # no rank tears gloo down while the other still talks to it
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_time_based_publishing_never_lets_sharded_ranks_disagree(tmp_path):
    """With a 50 ms publish interval and one rank 20 ms slower per step, both ranks snapshot (and so
    enter the collective) at the same steps: no deadlock, the same publish steps on both."""
    mp.spawn(_uneven_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"uneven{r}.json").read_text()) for r in (0, 1))
    assert r0["published"] == r1["published"] and len(r0["published"]) >= 4
    assert not r0["errors"] and not r1["errors"]


def _agent_tensor_bytes(agent) -> int:
    seen, total = set(), 0

    def walk(x, depth=0):
        nonlocal total
        if depth > 4:
            return
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
        elif isinstance(x, (list, tuple)) or type(x).__name__ == "deque":
            for v in x:
                walk(v, depth + 1)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)
    for part in (agent.act, agent.grad, agent.param, agent.out_grad, agent.origin):
        for value in vars(part).values():
            if not isinstance(value, nn.Parameter) and not (isinstance(value, list) and value and
                                                             isinstance(value[0], nn.Parameter)):
                walk(value)
    return total


def test_the_agent_holds_at_most_one_percent_of_the_model_plus_per_layer_buffers():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384), nn.LayerNorm(384))
              for _ in range(6)]
    model = nn.Sequential(nn.Embedding(8000, 384), *blocks, nn.Linear(384, 8000))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(stats={"parameters": {"every_n_steps": 1}}), optimizer=opt)
    for _ in range(3):
        model(torch.randint(0, 8000, (4, 16))).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    agent.snapshot()
    held = _agent_tensor_bytes(agent)
    agent.detach()
    layers = len(agent.layers)
    assert held <= 0.01 * param_bytes + 64 * 1024 * layers, (held, param_bytes, layers)
