"""The overhead budget (gradflow_agent/overhead.py): its judgments on a synthetic clock, and in the agent
the stretched parameter cadence still measures one-step updates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradflow_agent
from gradflow_agent.overhead import MAX_ACTIVATION_STRETCH, MAX_PARAMETER_STRETCH, OverheadBudget
from tests.conftest import config


def _run(budget: OverheadBudget, steps: int, share: float, *, clock: list[float], spent: list[float],
         step_seconds: float = 0.01) -> list[tuple[int, int]]:
    """Feed `steps` step ends where the agent took `share` of each step; the cadences after each."""
    seen = []
    for _ in range(steps):
        clock[0] += step_seconds
        spent[0] += share * step_seconds
        budget.step_ended(clock[0], spent[0])
        seen.append((budget.activations, budget.parameters))
    return seen


def test_a_share_far_over_the_budget_settles_within_two_windows_after_32_full_steps():
    b = OverheadBudget(0.03)
    clock, spent = [0.0], [0.0]
    seen = _run(b, 1 + 32, 0.5, clock=clock, spent=spent)
    assert seen[31] == (1, 1) and seen[32] == (32, 1)  # 0.5 / 0.03 = 17x over: one jump of 2^5, not x2
    _run(b, 32, 0.5, clock=clock, spent=spent)  # the window is one stretched period (32 steps) now
    assert b.activations == MAX_ACTIVATION_STRETCH
    assert math.isclose(b.share, 0.5)


def test_parameters_stretch_only_after_activations_are_sparsest_and_come_back_first():
    b = OverheadBudget(0.03, parameter_period=10)
    clock, spent = [0.0], [0.0]
    _run(b, 2000, 0.5, clock=clock, spent=spent)
    assert (b.activations, b.parameters) == (MAX_ACTIVATION_STRETCH, MAX_PARAMETER_STRETCH)
    # well under a quarter of the budget: parameters halve first, then activations
    order = []
    for _ in range(4000):
        before = (b.activations, b.parameters)
        _run(b, 1, 0.001, clock=clock, spent=spent)
        if (b.activations, b.parameters) != before:
            order.append("p" if b.parameters != before[1] else "a")
    assert (b.activations, b.parameters) == (1, 1)
    assert order == ["p"] * 4 + ["a"] * 6


def test_a_share_between_a_quarter_of_the_budget_and_the_budget_holds_the_cadence():
    b = OverheadBudget(0.04)
    clock, spent = [0.0], [0.0]
    _run(b, 33, 0.2, clock=clock, spent=spent)
    k = b.activations
    _run(b, 500, 0.02, clock=clock, spent=spent)
    assert b.activations == k


def test_no_budget_measures_the_share_and_changes_nothing():
    b = OverheadBudget(0.0, parameter_period=1)
    clock, spent = [0.0], [0.0]
    assert b.current_share == 0.0
    _run(b, 20, 0.9, clock=clock, spent=spent)
    assert math.isclose(b.current_share, 0.9)  # before the first window ends: the share so far
    _run(b, 200, 0.9, clock=clock, spent=spent)
    assert (b.activations, b.parameters) == (1, 1) and math.isclose(b.share, 0.9)


def test_ranks_that_must_agree_never_stretch_the_parameter_cadence():
    b = OverheadBudget(0.03, parameter_period=10, stretch_parameters=False)
    _run(b, 2000, 0.5, clock=[0.0], spent=[0.0])
    assert (b.activations, b.parameters) == (MAX_ACTIVATION_STRETCH, 1)
    b = OverheadBudget(0.03, parameter_period=10)
    _run(b, 2000, 0.5, clock=[0.0], spent=[0.0])
    b.stretch_parameters = False  # the job became sharded (fully_shard after attach)
    assert b.parameters == 1


def test_the_window_spans_a_whole_stretched_period():
    b = OverheadBudget(0.03, activation_period=4)
    clock, spent = [0.0], [0.0]
    _run(b, 33, 0.5, clock=clock, spent=spent)  # 32 steps, then the period of 4 steps x 32
    assert b.activations == 32
    seen = _run(b, 4 * 32, 0.5, clock=clock, spent=spent)
    assert seen[-2][0] == 32 and seen[-1][0] == 64  # judged after exactly one period of 4 x 32 steps


def test_a_stretched_parameter_cadence_measures_one_step_updates():
    """However the budget moves the cadence, every measured ratio is of one update, not of several."""
    torch.manual_seed(0)
    model = nn.Linear(64, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)  # a tiny step: the one-step ratio is nearly constant
    agent = gradflow_agent.attach(model, config(sampling={"overhead_budget": 1e-9}), optimizer=opt)
    x = torch.randn(64)
    ratios, measured = [], []
    for _ in range(400):
        w = model.weight.detach().clone()
        loss = (model.weight @ x).sum()  # a constant gradient: every update is lr * x
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)
        ratios.append(float((model.weight.detach() - w).norm() / w.norm()))
        snap = agent.snapshot()  # one interval per step: each measurement is seen on its own
        if snap.counters["parameter_every_steps"] and not math.isnan(r := snap.layer("(root)")["update_ratio"]):
            measured.append(r)
    assert agent.budget.parameters > 1 and snap.counters["parameter_every_steps"] == agent.budget.parameters
    agent.detach()
    assert len(measured) >= 10
    lo, hi = min(ratios), max(ratios)
    assert all(lo * 0.99 <= r <= hi * 1.01 for r in measured), (lo, hi, sorted(measured)[-3:])


def test_nested_timed_sections_count_their_time_once(monkeypatch):
    """An optimizer hook runs the step boundary, which runs a snapshot: each second is the agent's once."""
    import threading

    from gradflow_agent import overhead
    now = [0.0]
    monkeypatch.setattr(overhead.time, "perf_counter", lambda: now[0])
    clock = overhead.AgentClock()
    with clock:  # the optimizer hook
        now[0] += 1.0
        with clock:  # the step boundary
            now[0] += 2.0
            with clock:  # the snapshot
                now[0] += 4.0
    assert clock.seconds == 7.0
    with clock:
        now[0] += 1.0
    assert clock.seconds == 8.0
    done = threading.Event()

    def other_thread():  # its own nesting: a section there is counted on its own
        with clock:
            now[0] += 16.0
        done.set()

    with clock:
        threading.Thread(target=other_thread).start()
        done.wait(5)
    assert clock.seconds == 8.0 + 16.0 + 16.0  # the outer section here spanned the other thread's 16 s too


def test_the_agent_never_counts_more_of_its_own_time_than_has_passed():
    """Optimizer hook -> step boundary -> snapshot nest on every step here (a snapshot per step): the
    agent's time, counted once, cannot exceed the wall time of the loop (counted at each level it
    would be about three times the snapshots' time)."""
    import time

    from tests.conftest import train
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(sampling={"export_every_n_steps": 1, "overhead_budget": 0.0}),
                                  optimizer=opt)
    before = agent.clock.seconds
    t0 = time.perf_counter()
    train(model, opt, 60, agent)
    wall = time.perf_counter() - t0
    own = agent.clock.seconds - before
    agent.detach()
    assert 0 < own <= wall, (own, wall)


@pytest.mark.parametrize("every,param_every", [(1, 5), (3, 2)])
def test_the_boundary_follows_every_cadence_on_every_step_though_it_only_works_at_their_turns(every, param_every):
    """The step boundary only counts between the turns of the cadences (`_next_event`): on every step the
    flags it leaves - next step computed, its activations measured, on the parameter cadence - and the
    parameter statistics taken are still exactly those of the cadences, also after the budget changes
    them mid-run."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = gradflow_agent.attach(model, config(sampling={"every_n_steps": every, "overhead_budget": 0},
                                                stats={"parameters": {"every_n_steps": param_every}}),
                                  optimizer=opt)
    stretch_at = {20: (8, 2), 45: (2, 1), 58: (1, 4)}  # step -> the budget's new (activation, parameter) stretch
    judged = agent.budget.step_ended

    def step_ended(now, spent):
        judged(now, spent)
        new = stretch_at.get(agent.steps)
        if new:
            agent.budget.activations, agent.budget.parameters = new
        return bool(new)

    agent.budget.step_ended = step_ended
    measured = []
    real_measure = agent.param.measure
    agent.param.measure = lambda **kw: (measured.append(agent.steps), real_measure(**kw))[1]
    act, par = 1, 1
    for step in range(1, 90):
        x = torch.randn(8, 4)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        act, par = stretch_at.get(step, (act, par))
        params = every * param_every * par
        assert agent.steps == step
        assert agent._computed == (step % every == 0), step
        assert agent.hooks.active == (step % (every * act) == 0), step
        assert agent._parameters_next == ((step + 1) % params == 0), step
    agent.detach()
    want, act, par = [], 1, 1  # measured where the step is on the cadence in force at its boundary
    for step in range(1, 90):
        if step % (every * param_every * par) == 0:
            want.append(step)
        act, par = stretch_at.get(step, (act, par))
    assert measured == want


def test_every_entry_to_the_step_boundary_is_on_the_agents_clock():
    """The boundary is not timed itself: each way into it is - the optimizer post-hook, `agent.step()`
    without an optimizer, and `end_optimizer_step()` (trainer integrations). A slow boundary shows in
    the agent's own seconds whichever way it came."""
    import time as _time

    model = nn.Sequential(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = gradflow_agent.attach(model, config())
    real = agent._boundary

    def slow():
        _time.sleep(0.02)
        real()

    agent._boundary = slow
    for way in ("optimizer hook", "end_optimizer_step"):
        before = agent.clock.seconds
        model(torch.randn(2, 4)).sum().backward()
        if way == "optimizer hook":
            opt.step()  # found through the process-wide optimizer hooks
        else:
            agent.read_gradients()
            agent.end_optimizer_step()
        opt.zero_grad()
        assert agent.clock.seconds - before >= 0.02, way
    agent.detach()
    model = nn.Sequential(nn.Linear(4, 1))
    agent = gradflow_agent.attach(model, config())
    real = agent._boundary
    agent._boundary = slow
    before = agent.clock.seconds
    model(torch.randn(2, 4)).sum().backward()
    agent.step()  # no optimizer at all: this is the boundary
    assert agent.clock.seconds - before >= 0.02
    agent.detach()
