"""Between measured steps the forward hooks come off (a hooked module takes PyTorch's slow call path even
when the hook returns at once), with the statistics unchanged; never once torch.compile has compiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradflow_agent
from tests.conftest import config, train


@pytest.fixture(autouse=True)
def _nothing_compiled():
    """Earlier tests of the session compiled code; dynamo's reset drops it (and its record of it)."""
    import torch._dynamo
    torch._dynamo.reset()
    yield


KEYS = ("activation_mean", "activation_std", "activation_absmax", "activation_zero_ratio", "grad_pressure")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def _run(idle: bool):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = gradflow_agent.attach(model, config(sampling={"every_n_steps": 4}), optimizer=opt)
    agent.hooks._never_idle = not idle
    hooked = []
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        x = torch.randn(16, 8, generator=g)
        (model(x) - x[:, :1]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        agent.step()
        hooked.append((len(model[0]._forward_hooks), len(model._forward_hooks), len(model._forward_pre_hooks)))
    snap = agent.snapshot()
    agent.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks and not model[0]._forward_hooks
    return snap, hooked


def test_hooks_are_off_between_measured_steps_and_the_statistics_are_the_same():
    snap, hooked = _run(idle=True)
    reference, always = _run(idle=False)
    # after step k the next step is measured iff (k) % 4 == 0: hooks only then - the layers' and the
    # forward clock's two on the root module
    assert hooked == [(1, 1, 1) if (k + 1) % 4 == 0 else (0, 0, 0) for k in range(12)], hooked
    assert all(n == (1, 1, 1) for n in always)
    for key in KEYS:
        assert np.array_equal(snap.stats[key], reference.stats[key], equal_nan=True), key
    assert snap.counters["forward_seconds"] > 0  # timed on the measured steps


def test_no_idling_once_something_was_compiled():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = gradflow_agent.attach(model, config(sampling={"every_n_steps": 4}), optimizer=opt)
    try:
        train(model, opt, steps=2, agent=agent)
        assert len(model[0]._forward_hooks) == 0  # idle between measurements
        torch.compile(lambda t: t * 2)(torch.ones(2))  # the process compiled something
        train(model, opt, steps=1, agent=agent)
        assert agent.hooks._never_idle and len(model[0]._forward_hooks) == 1
        train(model, opt, steps=3, agent=agent)
        assert len(model[0]._forward_hooks) == 1  # stays on: compiled graphs do not see hook changes
    finally:
        agent.detach()
    assert len(model[0]._forward_hooks) == 0


def test_hooks_idling_with_the_layer_hooks_come_back_when_the_layer_hooks_are_moved():
    """`reattach_forward` (parameters replaced after attach) while idle: the forward clock's hooks on the
    root module are put back, not lost with the layer hooks' old handles."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config(sampling={"every_n_steps": 4}), optimizer=opt)
    train(model, opt, steps=1, agent=agent)
    assert agent.hooks._idle and not model._forward_hooks and not model._forward_pre_hooks
    agent.hooks.reattach_forward()
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    assert len(model[0]._forward_hooks) == 1
    train(model, opt, steps=8, agent=agent)
    assert agent.errors.total == 0
    agent.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks and not model[0]._forward_hooks


def test_a_hook_removed_by_its_owner_while_idle_is_not_put_back():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config(sampling={"every_n_steps": 4}), optimizer=opt)
    train(model, opt, steps=1, agent=agent)
    assert agent.hooks._idle
    agent.forward_clock.remove()
    seen = []
    for _ in range(8):  # the layer hooks come and go; the clock's stay gone
        train(model, opt, steps=1, agent=agent)
        seen.append((len(model[0]._forward_hooks), len(model._forward_hooks) + len(model._forward_pre_hooks)))
    assert (1, 0) in seen and all(root == 0 for _, root in seen), seen
    assert agent.errors.total == 0
    agent.detach()
