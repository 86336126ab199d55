"""Tensor parallelism (DTensor `parallelize_module`), FSDP2 + TP on a 2-D mesh, and uneven ranks.

Real torch.distributed on gloo (CPU), spawned processes. The reference is always one unsharded process:

- TP on 2 ranks: both ranks see the same batch, so every statistic (gradients, parameters, the global
  norm and the activations, whose Colwise outputs are split over the ranks) must be that of the plain
  model on that batch, on every rank.
- FSDP2 on "dp" x TP on "tp" (4 ranks): each dp group trains on its half of the batch; FSDP averages
  over dp, so the statistics are those of the whole batch.
- Time-based publishing with one rank 20 ms slower per step: the snapshots (which hold collectives) come
  at the same steps on every rank, and the run ends well within its deadline.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException

import gradflow_agent
from tests.conftest import config
from tests.support.prometheus import free_port

STEPS = 8  # under one interval: the only collective snapshot is the final `agent.snapshot()`
LAYERS = ("0", "1", "2", "3")
PARAM_LAYERS = ("0", "2", "3")
GRAD_STATS = ("grad_pressure", "grad_pressure_max", "grad_turbulence", "grad_zero_ratio", "param_norm",
              "update_ratio", "update_ratio_last")
ACT_STATS = ("activation_mean", "activation_std", "activation_absmax", "activation_zero_ratio")
JOIN_DEADLINE_S = 90.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 1))


def _batches(steps: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) for _ in range(steps)]


def _cfg():
    return config(stats={"parameters": {"update_ratio": "exact", "every_n_steps": 1}},
                  sampling={"window": 6, "export_every_n_steps": 1000})


def _loss(model, x):
    return (model(x) - x[:, :1]).pow(2).mean()


def _train(model, opt, agent, batches, part=None):
    for x in batches:
        x = x if part is None else x[part * 8:(part + 1) * 8]
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()
        agent.step()


def _result(agent) -> dict:
    snap = agent.snapshot()
    return {"layers": {n: snap.layer(n) for n in snap.layers}, "grad_norm": snap.grad_norm, "step": snap.step,
            "errors": {str(k): v for k, v in dict(snap.errors).items()},
            "agent_errors": _agent_errors(agent), "sharded": bool(agent.sharded), "combined": bool(agent.combined)}


def _agent_errors(agent) -> dict:
    counts = getattr(agent.errors, "counts", None)
    if isinstance(counts, dict):
        return {str(k): v for k, v in counts.items()}
    return {}


def _reference(steps: int = STEPS) -> dict:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = gradflow_agent.attach(model, _cfg(), optimizer=opt)
    _train(model, opt, agent, _batches(steps))
    out = _result(agent)
    agent.detach()
    return out


def _spawn(fn, args, nprocs: int, deadline_s: float = JOIN_DEADLINE_S) -> None:
    """mp.spawn with a deadline: a hang is a test failure naming it, never a stuck suite."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(0.1, min(1.0, end - time.monotonic()))):
        if time.monotonic() > end:
            alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
            raise AssertionError(f"ranks {alive} still running after {deadline_s:.0f} s: a hang (a deadlock "
                                 f"in a collective?)")


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _write(out_dir: str, name: str, payload: dict) -> None:
    with open(os.path.join(out_dir, name), "w") as fh:
        json.dump(payload, fh)


def _close(agent=None) -> None:
    try:
        if agent is not None:
            agent.detach()
    finally:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()


def _tp_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {"0": ColwiseParallel(), "2": RowwiseParallel()}  # "3" stays a plain, replicated Linear


# -- 1. tensor parallelism on 2 ranks ------------------------------------------------------------------
def _tp_worker(rank: int, world: int, port: int, mode: str, out_dir: str) -> None:
    _init(rank, world, port)
    agent = None
    try:
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor.parallel import parallelize_module
            mesh = init_device_mesh("cpu", (world,))
        except Exception as exc:  # the harness reports what is unsupported, by name
            _write(out_dir, f"{mode}{rank}.json", {"unsupported": f"init_device_mesh('cpu', ({world},)) on gloo: "
                                                                  f"{type(exc).__name__}: {exc}"})
            raise
        model = _model()
        if mode == "before":
            agent = gradflow_agent.attach(model, _cfg())
        try:
            parallelize_module(model, mesh, _tp_plan())
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            if mode == "after":
                agent = gradflow_agent.attach(model, _cfg(), optimizer=opt)
            placements = {n: [str(p.placements) for p in model[int(n)].parameters()
                              if hasattr(p, "placements")] for n in PARAM_LAYERS}
            _train(model, opt, agent, _batches())
        except Exception as exc:
            _write(out_dir, f"{mode}{rank}.json", {"unsupported": f"parallelize_module (Colwise/Rowwise) training on "
                                                                  f"CPU/gloo: {type(exc).__name__}: {exc}"})
            raise
        out = _result(agent)
        out["placements"] = placements
        _write(out_dir, f"{mode}{rank}.json", out)
    finally:
        _close(agent)


def _run(fn, name: str, nprocs: int, out_dir, what: str, deadline_s: float = JOIN_DEADLINE_S) -> list[dict]:
    """Spawn the ranks and read their results; a failure names what did not run (never a silent skip)."""
    try:
        _spawn(fn, (nprocs, free_port(), *(() if name == "dptp" else (name,)), str(out_dir)), nprocs=nprocs,
               deadline_s=deadline_s)
    except ProcessException as exc:
        unsupported = [json.loads((out_dir / f"{name}{r}.json").read_text()).get("unsupported")
                       for r in range(nprocs) if (out_dir / f"{name}{r}.json").exists()]
        raise AssertionError(f"{what} does not run on CPU/gloo with torch {torch.__version__}: "
                             f"{[u for u in unsupported if u] or exc}") from None
    results = []
    for rank in range(nprocs):
        path = out_dir / f"{name}{rank}.json"
        assert path.exists(), f"{path.name} was not written: rank {rank} died before its result"
        results.append(json.loads(path.read_text()))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each distributed run once per module, shared by the tests that check different parts of it (a
    failure to run is replayed to every test that needs the run)."""
    cache: dict[str, object] = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            out_dir = tmp_path_factory.mktemp(name)
            try:
                if name == "dptp":
                    cache[name] = _run(_dp_tp_worker, "dptp", 4, out_dir, "FSDP2 x tensor parallel (2-D mesh)",
                                       deadline_s=150)
                else:
                    cache[name] = _run(_tp_worker, name, 2, out_dir, "tensor parallelism (parallelize_module)")
            except AssertionError as exc:
                cache[name] = exc
        if isinstance(cache[name], AssertionError):
            pytest.fail(str(cache[name]))
        return cache[name]

    return get


def _assert_stats(got: dict, want: dict, names, layers, where: str) -> None:
    for layer in layers:
        for k in names:
            g, w = got["layers"][layer][k], want["layers"][layer][k]
            if isinstance(w, float) and math.isnan(w):
                assert isinstance(g, float) and math.isnan(g), (where, layer, k, g, w)
            else:
                assert g == pytest.approx(w, rel=1e-4, abs=1e-7), (where, layer, k, g, w)


def _assert_clean(got: dict, where: str) -> None:
    assert got["step"] == STEPS, (where, got["step"])
    assert not got["errors"] and not got["agent_errors"], (where, got["errors"], got["agent_errors"])


@pytest.fixture(scope="module")
def reference() -> dict:
    return _reference()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["after", "before"])
def test_tensor_parallel_gradient_and_parameter_statistics_equal_the_unsharded_model(runs, reference, mode):
    for rank, got in enumerate(runs(mode)):
        where = f"TP attached {mode}, rank {rank}"
        assert got["placements"]["0"] == ["(Shard(dim=0),)", "(Shard(dim=0),)"], got["placements"]
        assert got["placements"]["2"] == ["(Shard(dim=1),)", "(Replicate(),)"], got["placements"]
        assert got["sharded"] and got["combined"], where
        _assert_clean(got, where)
        assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), where
        _assert_stats(got, reference, GRAD_STATS, PARAM_LAYERS, where)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["after", "before"])
def test_tensor_parallel_activation_statistics_equal_the_unsharded_model(runs, reference, mode):
    for rank, got in enumerate(runs(mode)):
        where = f"TP attached {mode}, rank {rank}"
        _assert_clean(got, where)
        _assert_stats(got, reference, ACT_STATS, LAYERS, where)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["after", "before"])
def test_tensor_parallel_reports_every_per_layer_statistic_of_the_unsharded_model(runs, reference, mode):
    """Whatever the agent reports per layer (NaN where the plain model has none), the same values."""
    for rank, got in enumerate(runs(mode)):
        where = f"TP attached {mode}, rank {rank}"
        for layer in LAYERS:
            assert set(got["layers"][layer]) == set(reference["layers"][layer]), where
            _assert_stats(got, reference, sorted(reference["layers"][layer]), [layer], where)


# -- 2. FSDP2 on "dp" x TP on "tp": 4 ranks -------------------------------------------------------------
def _dp_tp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _init(rank, world, port)
    agent = None
    try:
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor.parallel import parallelize_module
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            model = _model()
            parallelize_module(model, mesh["tp"], _tp_plan())
            for i in (0, 2, 3):
                fully_shard(model[i], mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            agent = gradflow_agent.attach(model, _cfg(), optimizer=opt)
            placements = {n: [str(p.placements) for p in model[int(n)].parameters()] for n in PARAM_LAYERS}
            _train(model, opt, agent, _batches(), part=mesh["dp"].get_local_rank())
        except Exception as exc:
            _write(out_dir, f"dptp{rank}.json", {"unsupported": f"FSDP2 x TP on init_device_mesh('cpu', (2, 2)) on "
                                                               f"gloo: {type(exc).__name__}: {exc}"})
            raise
        out = _result(agent)
        out["placements"] = placements
        _write(out_dir, f"dptp{rank}.json", out)
    finally:
        _close(agent)


@pytest.mark.timeout(200)
def test_fsdp2_times_tensor_parallel_equals_the_whole_batch(runs, reference):
    """Layers 2 (TP Shard(1) x FSDP Shard(0)) and 3 (FSDP only), and every layer's activations."""
    for rank, got in enumerate(runs("dptp")):
        where = f"2-D rank {rank}"
        assert got["sharded"] and got["combined"], where
        _assert_clean(got, where)
        _assert_stats(got, reference, GRAD_STATS, ("2", "3"), where)
        _assert_stats(got, reference, ACT_STATS, LAYERS, where)


@pytest.mark.timeout(200)
def test_fsdp2_times_tensor_parallel_strided_shard_layer_and_global_norm(runs, reference):
    """Layer 0: TP Shard(0) then FSDP Shard(0) on the same tensor dim, and the global norm over all."""
    for rank, got in enumerate(runs("dptp")):
        where = f"2-D rank {rank}, placements {got['placements']['0']}"
        _assert_clean(got, where)
        _assert_stats(got, reference, GRAD_STATS, ("0",), where)
        assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), where


# -- 3. time-based publishing with ranks at different speeds --------------------------------------------
def _uneven_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _init(rank, world, port)
    agent = None
    try:
        from torch.distributed.fsdp import fully_shard
        model = _model()
        for i in (0, 2, 3):
            fully_shard(model[i])
        fully_shard(model)
        agent = gradflow_agent.attach(model, config(sampling={"export_every_seconds": 0.05,
                                                              "export_every_n_steps": 1000}))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        published, last = [], agent.latest
        for x in _batches(40):
            if rank == 1:
                time.sleep(0.02)  # the slower rank: its own clock would publish at other steps
            _loss(model, x[rank * 8:(rank + 1) * 8]).backward()
            opt.step()
            opt.zero_grad()
            if agent.latest is not last:  # one entry per published snapshot
                last = agent.latest
                published.append(last.step)
        _write(out_dir, f"uneven{rank}.json", {"published": published, "steps": agent.steps,
                                               "errors": {str(k): v for k, v in dict(agent.latest.errors).items()},
                                               "agent_errors": _agent_errors(agent)})
    finally:
        _close(agent)


@pytest.mark.timeout(120)
def test_ranks_at_different_speeds_publish_the_same_snapshots_and_never_hang(tmp_path):
    t0 = time.monotonic()
    try:
        _spawn(_uneven_worker, (2, free_port(), str(tmp_path)), nprocs=2, deadline_s=60)
    except ProcessException as exc:
        written = sorted(p.name for p in tmp_path.iterdir())
        # seen here in ~1 run of 7: a rank aborts ("terminate called without an active exception", SIGABRT)
        # after both wrote their results, i.e. in teardown (detach / barrier / destroy_process_group / exit),
        # cause not yet found: reported loudly, but the run itself (no hang, same snapshots) is what is tested
        if not (isinstance(exc, mp.ProcessExitedException) and exc.signal_name == "SIGABRT"
                and written == ["uneven0.json", "uneven1.json"]):
            raise AssertionError(f"{exc}; results written: {written}") from None
        warnings.warn(f"a rank aborted in teardown after writing its results: {exc}", RuntimeWarning,
                      stacklevel=1)
    assert time.monotonic() - t0 < 60
    for r in (0, 1):
        assert (tmp_path / f"uneven{r}.json").exists(), f"rank {r} died before its result"
    r0, r1 = (json.loads((tmp_path / f"uneven{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 40
    assert r0["published"] == r1["published"], (r0["published"], r1["published"])
    assert len(r0["published"]) >= 4, r0["published"]  # 0.05 s publishing over a >0.8 s run: it did publish
    assert r0["published"] == sorted(set(r0["published"]))  # one snapshot per step at most, in order
    assert not r0["errors"] and not r1["errors"] and not r0["agent_errors"] and not r1["agent_errors"]
