"""No host synchronisation in any hook or step-boundary path on CUDA (issue 11).

`torch.cuda.set_sync_debug_mode("error")` makes every blocking device<->host copy or stream
synchronisation raise. The agent catches its own exceptions, so a sync inside it shows up as an error
it counted: each test trains under that mode with no snapshot due, asserts the agent counted no error,
then takes a snapshot outside it (the snapshot is the one synchronisation the agent makes) and checks
that the statistics are there. A control run of the same loop without the agent proves the loop itself
is sync-free. Needs a CUDA GPU (the device machine); skipped elsewhere.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import gradflow_agent
from tests.conftest import config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: run on a machine with one (torch with CUDA)")

QUIET_SCHEDULE = {"export_every_n_steps": 100000, "export_every_seconds": 86400.0}


def _model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 7 * 7, 64), nn.Tanh(), nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(),
        nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10), nn.Softmax(dim=-1))
    model[7].requires_grad_(False)  # a frozen layer: some parameters have no gradient
    return model.cuda()


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _loop(model, steps: int, *, opt=None, agent=None, manual_lr: float = 0.0) -> None:
    x = torch.randn(16, 3, 16, 16, device="cuda")
    target = torch.rand(16, 10, device="cuda")
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        elif manual_lr:  # weights moved by hand: the boundary is the end of each backward pass
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= manual_lr * p.grad
                        p.grad = None
        if agent is not None and opt is not None:
            agent.step(loss=loss)


CONFIGS = {
    "default": config(sampling=QUIET_SCHEDULE),
    # every statistic on every step, the overhead budget off so that every hook runs on every step
    "every statistic": config(sampling={**QUIET_SCHEDULE, "overhead_budget": 0.0},
                              stats={"activations": {"dead_units": True}, "gradients": {"output_grads": True},
                                     "parameters": {"every_n_steps": 1}}),
    "whole outputs": config(sampling={**QUIET_SCHEDULE, "overhead_budget": 0.0},
                            stats={"activations": {"sample_elements": 0}}),
}


def test_the_training_loop_itself_is_sync_free():
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    _loop(model, 3, opt=opt)
    with _sync_is_an_error():
        _loop(model, 5, opt=opt)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_hook_or_step_boundary_synchronises(name):
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    agent = gradflow_agent.attach(model, CONFIGS[name], optimizer=opt)
    try:
        _loop(model, 3, opt=opt, agent=agent)  # first calls: allocations, the first-forward checks
        with _sync_is_an_error():
            _loop(model, 40, opt=opt, agent=agent)  # past the overhead budget's first judgment (32 steps)
        assert agent.errors.total == 0, agent.errors.counts
        snap = agent.snapshot()
    finally:
        agent.detach()
    assert snap.step == 43
    assert snap.layer("5")["grad_pressure"] > 0 and snap.layer("6")["act_std"] > 0


def test_the_backward_boundary_of_hand_updated_weights_is_found_without_a_sync():
    model = _model()
    agent = gradflow_agent.attach(model, config(sampling=QUIET_SCHEDULE))
    try:
        with _sync_is_an_error():
            _loop(model, 20, manual_lr=0.01)
        assert agent.errors.total == 0, agent.errors.counts
        assert agent.boundary == "backward"
        snap = agent.snapshot()
    finally:
        agent.detach()
    assert snap.step >= 15 and snap.layer("5")["grad_pressure"] > 0
