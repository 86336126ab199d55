"""A straggler in lockstep: two DDP ranks (gloo, CPU), rank 1 sleeping 40 ms in every forward.

Both ranks' step times are equal (rank 0 waits for rank 1 in the gradient all-reduce), so only the
forward time (stats/pace.py) can name the slow rank. A real Prometheus scrapes both ranks with the
shipped rules (`for:` -> 0s) and fires TrainingStraggler naming rank 1.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradflow_agent
from tests.conftest import config
from tests.support.prometheus import PrometheusServer, free_port, require_binary, rules_without_delay

ROOT = Path(__file__).resolve().parents[1]
SLEEP = 0.04
STEPS = 40


def _worker(rank: int, world: int, port: int, metrics_port: int, out_dir: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        if rank == 1:
            model.register_forward_pre_hook(lambda m, i: time.sleep(SLEEP))  # the straggler
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        agent = gradflow_agent.attach(ddp, config(
            run={"name": "straggle"},
            exporters={"prometheus": {"enabled": True, "port": metrics_port, "addr": "127.0.0.1"}},
            sampling={"export_every_n_steps": 5}), optimizer=opt)
        steps = []
        g = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            t0 = time.perf_counter()
            x = torch.randn(8, 8, generator=g)
            (ddp(x) - x[:, :1]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            agent.step()
            steps.append(time.perf_counter() - t0)
        snap = agent.snapshot()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"forward": snap.counters.get("forward_seconds"), "step": sorted(steps)[len(steps) // 2]}, fh)
        deadline = time.monotonic() + 60  # serve until the test has seen the alert
        while not os.path.exists(os.path.join(out_dir, "done")) and time.monotonic() < deadline:
            time.sleep(0.1)
        agent.detach()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_rank_that_sleeps_in_its_forward_is_named_although_step_times_are_equal(tmp_path: Path) -> None:
    require_binary("prometheus", "prometheus")
    base = free_port()
    targets = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    ctx = mp.get_context("spawn")
    rendezvous = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, rendezvous, base, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    cfg = {"scrape_configs": [{"job_name": "gradflow", "static_configs": [{"targets": targets}]}]}
    try:
        with PrometheusServer(cfg, rule_files=[rules_without_delay(tmp_path, only=["TrainingStraggler"])]) as prom:
            for rank in (0, 1):
                deadline = time.monotonic() + 90
                while not (tmp_path / f"rank{rank}.json").exists():
                    assert all(p.exitcode in (None, 0) for p in procs), "a rank failed"
                    assert time.monotonic() < deadline, f"rank {rank} did not finish training"
                    time.sleep(0.2)
            result = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
            # lockstep: the step times agree within a fraction of the sleep; the forward times do not
            assert abs(result[0]["step"] - result[1]["step"]) < SLEEP / 2, result
            assert result[1]["forward"] - result[0]["forward"] > 0.75 * SLEEP, result
            alerts = prom.wait_until(
                lambda: [a for a in prom.alerts("firing") if a["labels"]["alertname"] == "TrainingStraggler"],
                timeout=40, what="TrainingStraggler")
            assert alerts[0]["labels"]["run"] == "straggle"
            assert alerts[0]["annotations"]["summary"].startswith("Rank 1 of run straggle"), alerts[0]
    finally:
        (tmp_path / "done").write_text("", encoding="utf-8")
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

