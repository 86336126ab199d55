"""The agent's numbers equal a direct torch computation on known tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradflow_agent
from tests.conftest import config


def _collect(model, inputs_per_step, robust=None, device_path=False, **cfg):
    agent = gradflow_agent.attach(model, config(**cfg))
    if robust is not None:
        agent.act.robust = robust
        agent.grad.robust = robust
    if device_path:  # what CUDA runs: pending reductions folded into device buffers once per step
        agent.act.on_host = False
    with torch.no_grad():
        for inputs in inputs_per_step:
            for x in inputs:
                model(x)
            agent.step()
    snap = agent.snapshot()
    agent.detach()
    return snap


@pytest.mark.parametrize("robust,device_path", [(False, False), (True, False), (True, True)],
                         ids=["cpu-fast-path", "masked-path", "accelerator-path"])
def test_activation_statistics_match_torch(robust, device_path):
    model = nn.Sequential(nn.Identity(), nn.Tanh(), nn.ReLU())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 5, generator=g) * 3 for _ in range(4)]
    xs[0][0, 0] = 0.0
    xs[1][2, 3] = float("nan")
    xs[2][1, 1] = float("inf")
    snap = _collect(model, [xs[:2], xs[2:]], robust=robust, device_path=device_path,  # 2 steps x 2 calls
                    modules={"exclude_types": []})

    allx = torch.cat([x.reshape(-1) for x in xs])
    finite = allx[torch.isfinite(allx)]
    ident = snap.layer("0")
    assert ident["nonfinite_activation"] == 2
    assert ident["activation_mean"] == pytest.approx(finite.mean().item(), rel=1e-5)
    assert ident["activation_std"] == pytest.approx(finite.std(unbiased=False).item(), rel=1e-5)
    assert ident["activation_absmax"] == pytest.approx(finite.abs().max().item(), rel=1e-6)
    assert math.isnan(ident["activation_zero_ratio"])  # exact zeros are only counted where they mean something
    assert math.isnan(ident["activation_saturation_ratio"])  # not a bounded activation

    t = torch.tanh(allx)
    tanh = snap.layer("1")
    margin = 0.02
    assert tanh["activation_saturation_ratio"] == pytest.approx(
        (t.abs() > 1 - margin).sum().item() / t.numel())
    assert tanh["nonfinite_activation"] == 1  # tanh(inf) = 1 is finite, tanh(nan) is not

    r = torch.relu(t)
    relu = snap.layer("2")
    fin = r[torch.isfinite(r)]
    assert relu["activation_zero_ratio"] == pytest.approx((fin == 0).sum().item() / r.numel())
    assert relu["activation_mean"] == pytest.approx(fin.mean().item(), rel=1e-5)


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu", "accelerator-path"])
def test_large_outputs_are_summarised_from_a_strided_view(device_path):
    model = nn.Sequential(nn.ReLU())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, 48, generator=g)
    x[5, 3, 7] = float("nan")  # outside or inside the view, it is counted exactly
    snap = _collect(model, [[x]], robust=device_path or None, device_path=device_path,
                    stats={"activations": {"sample_elements": 4096}})
    r = torch.relu(x)
    fin = r[torch.isfinite(r)]
    relu = snap.layer("0")
    assert relu["nonfinite_activation"] == 1
    assert relu["activation_mean"] == pytest.approx(fin.mean().item(), rel=1e-5)  # the mean is exact
    assert relu["activation_std"] == pytest.approx(fin.std().item(), rel=0.1)
    assert relu["activation_zero_ratio"] == pytest.approx(0.5, abs=0.05)
    assert 0.5 * fin.max().item() < relu["activation_absmax"] <= fin.max().item()


def test_dead_unit_ratio_counts_units_that_never_fired_over_the_window():
    model = nn.Sequential(nn.ReLU())
    steps = []
    for k in range(10):
        x = torch.randn(8, 6).abs() + 0.1
        x[:, :2] = -1.0  # units 0 and 1 never fire
        if k == 3:
            x[0, 2] = -5.0  # unit 2 is silent once, not always: it is alive
        steps.append([x])
    snap = _collect(model, steps, sampling={"window": 10})
    assert snap.layer("0")["activation_dead_unit_ratio"] == pytest.approx(2 / 6)


def test_dead_units_use_the_channel_dimension_after_a_convolution():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with torch.no_grad():
        model[0].bias[:] = torch.tensor([-100.0, -100.0, -100.0, 100.0])
    snap = _collect(model, [[torch.randn(2, 3, 5, 5)]] * 10, sampling={"window": 10})
    assert snap.layer("1")["activation_dead_unit_ratio"] == pytest.approx(0.75)


def test_softmax_saturation_is_judged_per_row():
    model = nn.Sequential(nn.Softmax(dim=-1))
    x = torch.zeros(4, 10)
    x[:2, 0] = 50.0  # two one-hot rows out of four
    snap = _collect(model, [[x]])
    assert snap.layer("0")["activation_saturation_ratio"] == pytest.approx(0.5)


def test_gradient_pressure_turbulence_and_global_norm_match_torch():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = gradflow_agent.attach(model, config(sampling={"window": 10}), optimizer=opt)
    per_step = {"0": [], "2": []}
    zeros = {"0": [0, 0], "2": [0, 0]}
    global_norms = []
    for _ in range(6):
        x = torch.randn(5, 4)
        model(x).pow(2).sum().backward()
        for name in per_step:
            layer = dict(model.named_children())[name]
            w, b = layer.weight.grad, layer.bias.grad
            per_step[name].append(torch.sqrt(w.pow(2).sum() + b.pow(2).sum()).item())
            zeros[name][0] += (w == 0).sum().item() + (b == 0).sum().item()
            zeros[name][1] += w.numel() + b.numel()
        global_norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item())
        opt.step()
        opt.zero_grad()
    snap = agent.snapshot()
    agent.detach()
    assert snap.step == 6
    for name, values in per_step.items():
        v = np.array(values)
        stats = snap.layer(name)
        assert stats["grad_pressure"] == pytest.approx(v.mean(), rel=1e-5)
        assert stats["grad_pressure_max"] == pytest.approx(v.max(), rel=1e-5)
        assert stats["grad_turbulence"] == pytest.approx(v.std(ddof=1) / v.mean(), rel=1e-4)
        assert stats["grad_zero_ratio"] == pytest.approx(zeros[name][0] / zeros[name][1])
    assert snap.grad_norm == pytest.approx(global_norms[-1], rel=1e-5)
    assert math.isnan(snap.layer("1")["grad_pressure"])  # ReLU has no parameters: no data


def test_velocity_is_relative_change_between_intervals():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    x = torch.ones(1, 3)
    for scale, n in ((1.0, 3), (3.0, 3)):
        for _ in range(n):
            (model(x) * scale).sum().backward()
            opt.step()
            opt.zero_grad()
        snap = agent.snapshot()
    agent.detach()
    assert snap.layer("0")["grad_velocity"] == pytest.approx(2.0, rel=1e-5)  # 3x the pressure


@pytest.mark.parametrize("mode,sample,rel", [("exact", 1024, 1e-6), ("sampled", 100_000, 1e-6),
                                             ("sampled", 256, 0.25)])
def test_update_ratio_matches_the_real_update(mode, sample, rel):
    model = nn.Sequential(nn.Linear(64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = gradflow_agent.attach(model, config(stats={"parameters": {"update_ratio": mode,
                                                                      "sample_size": sample}}), optimizer=opt)
    ratios = []
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(16, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        after = list(model.parameters())
        d = math.sqrt(sum((a - b).pow(2).sum().item() for a, b in zip(after, before)))
        w = math.sqrt(sum(b.pow(2).sum().item() for b in before))
        ratios.append(d / w)
    snap = agent.snapshot()
    agent.detach()
    assert snap.layer("0")["update_ratio"] == pytest.approx(np.mean(ratios), rel=rel)
    norm = math.sqrt(sum(p.pow(2).sum().item() for p in model.parameters()))
    assert snap.layer("0")["param_norm"] == pytest.approx(norm, rel=1e-5)


def test_gradient_accumulation_gives_one_reading_per_optimizer_step():
    model = nn.Sequential(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    expected = []
    for _ in range(3):
        for _ in range(4):  # four micro-batches
            model(torch.randn(2, 4)).sum().backward()
        expected.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item())
        opt.step()
        opt.zero_grad()
        agent.step()  # counted once with the optimizer step
    snap = agent.snapshot()
    agent.detach()
    assert snap.step == 3
    assert snap.layer("0")["grad_pressure"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert snap.layer("0")["grad_pressure_max"] == pytest.approx(max(expected), rel=1e-5)


@pytest.mark.parametrize("kind", ["float32", "float64", "bfloat16", "float16", "channels_last", "expanded", "nan",
                                  "inf", "missing", "frozen", "zero_counts"])
def test_the_cpu_gradient_norms_read_by_numpy_equal_torch_and_odd_gradients_fall_back(kind):
    """The CPU ring row is filled by numpy's dot straight from each `p.grad`; a gradient numpy cannot
    read exactly as it is (bfloat16, float16, non-contiguous, expanded), a missing or frozen one sends
    the row through torch, a non-finite one through the masked path. Every case equals torch."""
    from gradflow_agent.stats.gradients import GradientStats
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(kind, torch.float32)
    params = [nn.Parameter(torch.randn(*shape, dtype=dtype)) for shape in ((8, 3, 3, 3), (8,), (5, 7))]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    if kind == "channels_last":
        params[0].grad = params[0].grad.contiguous(memory_format=torch.channels_last)
    if kind == "expanded":
        params[1].grad = torch.randn(1).expand(8)
    if kind in ("nan", "inf"):
        params[2].grad[1, 2] = float(kind)
    if kind == "missing":
        params[1].grad = None
    if kind == "frozen":  # frozen mid-run: a stale gradient left in .grad is not this step's
        params[1].requires_grad_(False)
    if kind == "zero_counts":
        params[2].grad[0] = 0.0
    stats = GradientStats(params, [0, 0, 1], 2, torch.device("cpu"), rows=4, window=4)
    stats.read(count_zeros=kind == "zero_counts", step=1)
    got = stats.ring[stats.pos].double().numpy()
    absent = kind in ("missing", "frozen")
    want = np.array([math.nan if absent and k == 1 else float(torch.nan_to_num(p.grad.double(), 0.0, 0.0, 0.0).norm())
                     for k, p in enumerate(params)])
    assert got == pytest.approx(want, rel=1e-2 if kind in ("bfloat16", "float16") else 1e-6, nan_ok=True)
    assert stats.nonfinite.tolist() == [0, 0, 1 if kind in ("nan", "inf") else 0]
    if kind == "zero_counts":  # the exact zeros of this step: 7 in the last parameter, none elsewhere
        assert stats.nonzero.tolist() == [216, 8, 28]
        assert stats.counted.tolist() == [216, 8, 35]


def _plant_nonfinite(model, opt) -> torch.Tensor:
    """One step whose weight gradient holds a NaN and an Inf; returns its finite part."""
    model(torch.ones(1, 2)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    model[0].weight.grad[1, 1] = float("inf")
    finite = model[0].weight.grad.clone()
    finite[~torch.isfinite(finite)] = 0
    opt.step()
    opt.zero_grad()
    return finite


def test_nonfinite_gradients_are_counted_and_the_finite_part_summarised():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    finite = _plant_nonfinite(model, opt)
    snap = agent.snapshot()
    agent.detach()
    assert snap.layer("0")["nonfinite_grad"] == 2
    assert snap.layer("0")["grad_pressure"] == pytest.approx(finite.norm().item())
    assert [i.kind for i in snap.issues] == ["nonfinite"]


def test_the_accelerator_watch_flags_the_first_nonfinite_gradient_then_measures_exactly():
    """On an accelerator one fused norm per step is the watch: the first non-finite gradient is flagged
    on its step and parameter (a lower-bound count, no reading), and from then on the run is measured
    exactly - element counts and the finite part."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    agent.grad.robust = True  # the accelerator path, on the CPU
    _plant_nonfinite(model, opt)
    first = agent.snapshot()
    assert first.layer("0")["nonfinite_grad"] == 1  # one parameter flagged at one step
    assert math.isnan(first.layer("0")["grad_pressure"])  # no reading: never a made-up norm
    assert [i.kind for i in first.issues] == ["nonfinite"]
    assert first.nonfinite_origin == (1, 0, "grad")  # step 1, layer "0" (index 0), its gradient
    finite = _plant_nonfinite(model, opt)
    second = agent.snapshot()
    agent.detach()
    assert agent.grad.exact
    assert second.layer("0")["nonfinite_grad"] == 1 + 2  # exact from the second step
    assert second.layer("0")["grad_pressure"] == pytest.approx(finite.norm().item())


def test_activation_checkpointing_counts_each_forward_once():
    from torch.utils.checkpoint import checkpoint

    inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    outer = nn.ModuleDict({"inner": inner})
    opt = torch.optim.SGD(inner.parameters(), lr=0.0)
    agent = gradflow_agent.attach(outer, config(), optimizer=opt)
    x = torch.randn(3, 4, requires_grad=True)
    checkpoint(inner, x, use_reentrant=True).sum().backward()
    opt.step()
    assert agent.act.calls == [1, 1]  # the re-run inside backward is not counted
    snap = agent.snapshot()
    agent.detach()
    direct = inner[0](x).detach()
    assert snap.layer("inner.0")["activation_mean"] == pytest.approx(direct.mean().item(), rel=1e-5)


def test_shared_and_frozen_parameters():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied weights: owned by the first layer that has them
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    model = nn.Sequential(emb, frozen, head)
    opt = torch.optim.SGD([emb.weight], lr=0.1)
    agent = gradflow_agent.attach(model, config(), optimizer=opt)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    snap = agent.snapshot()
    agent.detach()
    assert snap.layer("0")["grad_pressure"] == pytest.approx(emb.weight.grad.norm().item(), rel=1e-5)
    assert math.isnan(snap.layer("1")["grad_pressure"])  # frozen: no gradient, no data
    assert math.isnan(snap.layer("2")["grad_pressure"])


def test_output_gradients_cover_parameterless_layers_even_before_inplace_ops():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config(stats={"gradients": {"output_grads": True}}), optimizer=opt)
    seen = {}

    def reference(name):
        def hook(module, inputs, output):
            output.register_hook(lambda g: seen.__setitem__(name, g.norm().item()))
        return hook

    for name in ("0", "1"):
        dict(model.named_children())[name].register_forward_hook(reference(name))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    snap = agent.snapshot()
    agent.detach()
    for name in ("0", "1"):
        assert snap.layer(name)["output_grad_norm"] == pytest.approx(seen[name], rel=1e-5)


def test_the_accelerator_gradient_watch_dispatches_the_same_ops_whatever_the_number_of_parameters():
    """One fused norm per step: the ops the watch dispatches do not grow with the parameter count (the
    exact path, after a non-finite gradient, does: four per gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gradflow_agent.stats.gradients import GradientStats

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    def ops(n: int, exact: bool) -> int:
        params = [nn.Parameter(torch.randn(4, 4)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn_like(p)
        stats = GradientStats(params, list(range(n)), n, torch.device("cpu"), rows=4, window=4, robust=True)
        stats.exact = exact
        stats.read(step=1)  # first read: caches (index tensors) made
        with Count() as count:
            stats.read(step=2)
        return count.ops

    assert ops(10, exact=False) == ops(200, exact=False) < 20
    assert ops(200, exact=True) >= 4 * 200


def test_many_cpu_gradients_are_read_by_torchs_fused_norm_and_agree_with_numpys_read():
    """Past NUMPY_READ_MAX gradients the CPU read is torch's fused loop (faster there, bench/hot_path.py);
    each path gives the norms torch computes in float64."""
    from gradflow_agent.stats.gradients import NUMPY_READ_MAX, GradientStats
    for n in (8, NUMPY_READ_MAX + 6):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(5, 3)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn_like(p)
        stats = GradientStats(params, list(range(n)), n, torch.device("cpu"), rows=2, window=2)
        assert stats._numpy_first == (n <= NUMPY_READ_MAX)
        stats.read(step=1)
        want = np.array([float(p.grad.double().norm()) for p in params])
        assert stats.ring[stats.pos].double().numpy() == pytest.approx(want, rel=1e-6)
