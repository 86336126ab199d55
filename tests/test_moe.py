"""Mixture-of-experts router statistics (stats/moe.py, integrations/moe.py) on real tiny transformers MoE
models built from configs (no download), and the rule-table rows that judge them."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradflow_agent
from gradflow_agent.config import ConfigError, load_config
from gradflow_agent.detect import diagnose
from gradflow_agent.integrations import moe as M
from gradflow_agent.snapshot import LAYER_STATS, NONFINITE_TENSORS, Snapshot
from gradflow_agent.stats.moe import MoEStats, summarise

from .conftest import config

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402

GATES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
MOE_KINDS = {"expert_imbalance", "dead_experts", "attention_collapse"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mixtral(experts: int = 4, top_k: int = 2, seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                            num_local_experts=experts, num_experts_per_tok=top_k,
                                            max_position_embeddings=64, attn_implementation="sdpa"))


def qwen2_moe(seed: int = 0) -> Qwen2MoeForCausalLM:
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                              num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                                              attn_implementation="sdpa"))


def batches(steps: int, batch: int = 4, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (batch, length), generator=g) for _ in range(steps)]


def run(model, agent=None, steps: int = 4, lr: float = 1e-2) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # found by the agent's process-wide optimizer hooks
    losses = []
    for ids in batches(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if agent is not None:
            agent.step(loss=loss)
        losses.append(loss.detach())
    return losses


def attach(model, **stats):
    return gradflow_agent.attach(model, config(stats=stats))


def issues_of(snap, kinds=MOE_KINDS):
    return [(i.kind, i.layer, i.severity) for i in snap.issues if i.kind in kinds]


class Capture:
    """The router logits of every call, read by a plain hook of the test (the reference)."""

    def __init__(self, model, names):
        self.logits = {n: [] for n in names}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            self.logits[name].append(output[0].detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# -- finding routers ------------------------------------------------------------------------------------------
def test_transformers_routers_are_found_with_their_experts_and_top_k():
    routers = M.find_routers(mixtral(experts=4, top_k=2))
    assert [(r.name, r.num_experts, r.top_k, r.type_name) for r in routers] == \
        [(n, 4, 2, "MixtralTopKRouter") for n in GATES]
    routers = M.find_routers(qwen2_moe())  # the shared expert's sigmoid gate is not a router
    assert [(r.name, r.num_experts, r.top_k) for r in routers] == [(n, 8, 2) for n in GATES]


class HandMoE(nn.Module):
    """A hand-written MoE block: an nn.Linear gate returning logits, top-k in the block."""

    def __init__(self, d=8, experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x):
        logits = self.gate(x)
        w, idx = torch.softmax(logits, -1).topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = (idx == e).any(-1)
            out = out + torch.where(sel[:, None], expert(x) * (w * (idx == e)).sum(-1, keepdim=True), 0.0)
        return out


def test_a_hand_written_linear_gate_is_found_and_its_top_k_taken_from_the_logits():
    torch.manual_seed(0)
    model = nn.Sequential(HandMoE(), nn.Linear(8, 1))
    routers = M.find_routers(model)
    assert [(r.name, r.num_experts, r.top_k) for r in routers] == [("0.gate", 4, 2)]
    agent = attach(model)
    x = torch.randn(256, 8)
    model(x).sum().backward()
    snap = agent.snapshot()
    agent.detach()
    load = {labels["expert"]: v for m, labels, v in snap.extra if m.name == "gradflow_moe_expert_load_ratio"}
    ref = torch.zeros(4).index_add_(0, model[0].gate(x).topk(2, -1).indices.reshape(-1), torch.ones(512)) / 256
    assert [load[str(e)] for e in range(4)] == pytest.approx(ref.tolist())
    assert sum(load.values()) == pytest.approx(2.0)


# -- the statistics -------------------------------------------------------------------------------------------
def test_loads_sum_to_top_k_and_imbalance_matches_a_hand_computation_from_the_router_logits():
    model = mixtral(experts=4, top_k=2)
    agent = attach(model)
    capture = Capture(model, GATES)
    run(model, agent, steps=3)
    snap = agent.snapshot()
    capture.remove()
    agent.detach()
    rows = {(m.name, tuple(sorted(labels.items()))): v for m, labels, v in snap.extra}
    for name in GATES:
        logits = torch.cat(capture.logits[name])  # (tokens, experts), 3 steps x 64 tokens
        N, E = logits.shape
        chosen = torch.softmax(logits.float(), -1).topk(2, -1).indices  # what the router computes
        counts = np.bincount(chosen.reshape(-1).numpy(), minlength=E).astype(float)
        load = [rows[("gradflow_moe_expert_load_ratio", (("expert", str(e)), ("layer", name)))] for e in range(E)]
        assert load == pytest.approx(counts / N) and sum(load) == pytest.approx(2.0)
        share = counts / counts.sum()
        imbalance = (E * share.max() - 1) / (E / 2 - 1)  # the busiest expert's excess over the largest possible
        p = torch.softmax(logits.double(), -1)
        entropy = float((-(p * p.log()).sum(-1) / math.log(E)).mean())
        i = snap.layers.index(name)
        assert snap.stats["moe_load_imbalance_ratio"][i] == pytest.approx(imbalance)
        assert rows[("gradflow_moe_load_imbalance_ratio", (("layer", name),))] == pytest.approx(imbalance)
        assert rows[("gradflow_moe_router_entropy_ratio", (("layer", name),))] == pytest.approx(entropy, abs=1e-6)
        assert rows[("gradflow_moe_dead_experts", (("layer", name),))] == float((counts == 0).sum())
        assert rows[("gradflow_moe_experts", (("layer", name),))] == 4.0
    assert not issues_of(snap)  # a freshly initialised router is healthy


def test_a_short_window_is_not_judged_and_carries_over():
    stats = MoEStats("cpu", min_assignments_per_expert=4)
    stats.add_layer("r", 4, 1)
    stats.observe("r", None, torch.tensor([[0], [0], [1]]))  # 3 assignments < 4 x 4
    first = stats.finish([t.numpy() for t in stats.device_parts()])[0]
    assert math.isnan(first["moe_dead_expert_ratio"]) and math.isnan(first["moe_load_imbalance_ratio"])
    stats.observe("r", None, torch.tensor([[0]] * 13))  # 16 in all: judged over both calls
    done = stats.finish([t.numpy() for t in stats.device_parts()])[0]
    assert done["moe_dead_expert_ratio"] == 0.5 and done["dead"] == 2.0
    assert list(done["load"]) == [15 / 16, 1 / 16, 0.0, 0.0]
    assert done["moe_load_imbalance_ratio"] == pytest.approx((4 * 15 / 16 - 1) / 3)
    assert summarise(np.array([4.0, 4.0, 4.0, 4.0]), 8.0, 0.0, 2)["moe_load_imbalance_ratio"] == 0.0
    stats.observe("r", None, torch.tensor([[7], [-1]]))  # outside [0, E): no expert's
    assert stats.device_parts()[0][:4].sum() == 0


def forced(gate: nn.Module, experts: list[int]) -> None:
    """The router of `gate` biased so that every token goes to `experts` (the model still trains)."""
    bias = torch.zeros(gate.num_experts)
    bias[experts] = 30.0

    def forward(hidden_states):
        h = hidden_states.reshape(-1, gate.hidden_dim)
        logits = F.linear(h, gate.weight) + bias
        top, idx = torch.topk(torch.softmax(logits.float(), -1), gate.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx
    gate.forward = forward


def test_a_router_sending_everything_to_one_expert_is_imbalanced_and_has_dead_experts():
    model = mixtral(experts=4, top_k=1)
    forced(model.model.layers[1].mlp.gate, [0])
    agent = attach(model)
    run(model, agent, steps=3)
    snap = agent.snapshot()
    agent.detach()
    i = snap.layers.index(GATES[1])
    assert snap.stats["moe_load_imbalance_ratio"][i] == 1.0 and snap.stats["moe_dead_expert_ratio"][i] == 0.75
    assert issues_of(snap) == [("expert_imbalance", GATES[1], "critical"), ("dead_experts", GATES[1], "critical")]
    assert snap.health[i] == 0.0
    rows = {(m.name, labels.get("expert")): v for m, labels, v in snap.extra if labels.get("layer") == GATES[1]}
    assert rows[("gradflow_moe_dead_experts", None)] == 3.0
    assert [rows[("gradflow_moe_expert_load_ratio", str(e))] for e in range(4)] == [1.0, 0.0, 0.0, 0.0]
    assert rows[("gradflow_moe_router_entropy_ratio", None)] < 0.01


def test_qwen2_moe_two_experts_taking_all_tokens():
    model = qwen2_moe()
    forced(model.model.layers[0].mlp.gate, [3, 5])
    agent = attach(model)
    run(model, agent, steps=2)
    snap = agent.snapshot()
    agent.detach()
    i = snap.layers.index(GATES[0])
    assert snap.stats["moe_dead_expert_ratio"][i] == 0.75 and snap.stats["moe_load_imbalance_ratio"][i] == 1.0
    assert ("dead_experts", GATES[0], "critical") in issues_of(snap)
    assert not [x for x in issues_of(snap) if x[1] == GATES[1]]


def test_loss_is_bit_identical_with_the_agent_on():
    plain = run(mixtral(seed=3), steps=3)
    model = mixtral(seed=3)
    agent = attach(model, attention={"enabled": True})
    watched = run(model, agent, steps=3)
    agent.detach()
    assert [p.item() for p in plain] == [w.item() for w in watched]
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))


def test_hooks_go_through_the_agents_mechanism_copies_carry_none_and_detach_removes_them():
    model = mixtral()
    gate = model.model.layers[0].mlp.gate
    before = len(gate._forward_hooks)
    agent = attach(model)
    assert any(isinstance(p, M.MoEPlugin) for p in agent.plugins)
    assert len(gate._forward_hooks) > before
    clone = copy.deepcopy(model)
    assert len(clone.model.layers[0].mlp.gate._forward_hooks) == before
    torch.save(model, io.BytesIO())  # no local closure is pickled
    agent.detach()
    assert len(gate._forward_hooks) == before


def test_a_model_without_routers_gets_no_plugin_and_the_cap_drops_per_expert_series():
    agent = attach(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)))
    assert not any(isinstance(p, M.MoEPlugin) for p in agent.plugins)
    agent.detach()
    model = mixtral(experts=4, top_k=2)
    agent = attach(model, moe={"max_experts": 2})
    run(model, agent, steps=2)
    snap = agent.snapshot()
    agent.detach()
    names = {m.name for m, _, _ in snap.extra}
    assert "gradflow_moe_load_imbalance_ratio" in names and "gradflow_moe_expert_load_ratio" not in names
    agent = attach(mixtral(), moe={"enabled": False})
    assert not any(isinstance(p, M.MoEPlugin) for p in agent.plugins)
    agent.detach()


def test_observe_router_for_a_hand_written_router_adds_its_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    router = nn.Linear(8, 4, bias=False)
    agent = attach(model)
    assert agent.plugin_layers == []
    x = torch.randn(64, 8)
    model(x).sum().backward()
    logits = router(x)
    agent.observe_router("blocks.0.router", logits, top_k=1)
    agent.observe_router("blocks.0.router", logits, indices=torch.zeros(64, 1, dtype=torch.long))
    snap = agent.snapshot()
    agent.detach()
    assert snap.layers[-1] == "blocks.0.router" and agent.plugin_layers == [("blocks.0.router", "Router")]
    i = snap.layers.index("blocks.0.router")
    counts = torch.bincount(logits.argmax(-1), minlength=4).double()
    counts[0] += 64
    share = counts / counts.sum()
    assert snap.stats["moe_load_imbalance_ratio"][i] == pytest.approx(float((4 * share.max() - 1) / 3))
    assert math.isnan(snap.stats["grad_pressure"][i]) and snap.nonfinite["grad"][i] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_in_the_router_hooks_on_cuda():
    model = mixtral().cuda()
    agent = attach(model)
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    model(input_ids=ids)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(input_ids=ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    snap = agent.snapshot()
    agent.detach()
    assert np.isfinite(snap.stats["moe_router_entropy_ratio"][snap.layers.index(GATES[0])])


# -- the rule-table rows, on synthetic snapshots -----------------------------------------------------------------
TH = load_config(None, environ={}).thresholds


def _snap(**columns) -> Snapshot:
    n = max(len(v) for v in columns.values())
    stats = {k: np.array(columns.get(k, [math.nan] * n), dtype=np.float64) for k in LAYER_STATS}
    return Snapshot(step=100, time=0.0, interval_steps=10, layers=tuple(f"l{i}" for i in range(n)),
                    layer_types=("Router",) * n, stats=stats, nonfinite={t: np.zeros(n) for t in NONFINITE_TENSORS},
                    grad_norm=math.nan, loss=None, counters={})


def test_moe_and_attention_rows_are_strict_escalate_and_nan_is_unknown():
    snap = diagnose(_snap(moe_load_imbalance_ratio=[0.5, 0.6, 0.95, math.nan],
                          moe_dead_expert_ratio=[0.0, 0.125, 0.5, math.nan]), TH)
    assert [(i.kind, i.layer, i.severity) for i in snap.issues] == [
        ("expert_imbalance", "l2", "critical"), ("dead_experts", "l2", "critical"),
        ("expert_imbalance", "l1", "warning"), ("dead_experts", "l1", "warning")]
    assert snap.health[0] == 100.0 and math.isnan(snap.health[3])
    assert all(i.recommendation for i in snap.issues)
    snap = diagnose(_snap(attention_entropy=[0.5, 0.05, 0.01, math.nan, 0.5],
                          attention_max_prob=[0.5, 0.5, 0.5, math.nan, 0.97]), TH)
    assert sorted((i.layer, i.severity) for i in snap.issues) == [("l1", "warning"), ("l2", "critical"),
                                                                  ("l4", "warning")]
    assert math.isnan(snap.health[3]) and snap.health[0] == 100.0


def test_the_new_config_keys_are_checked():
    with pytest.raises(ConfigError, match="thresholds.expert_imbalance"):
        load_config({"thresholds": {"expert_imbalance": 1.5}}, environ={})
    with pytest.raises(ConfigError, match="stats.moe.min_assignments_per_expert"):
        load_config({"stats": {"moe": {"min_assignments_per_expert": 0}}}, environ={})
    with pytest.raises(ConfigError, match="stats.moe.routers"):
        load_config({"stats": {"moe": {"routers": ["layers.[0-9"]}}}, environ={})


def test_the_router_statistics_are_timed_on_the_agents_clock():
    """The overhead budget sees the routers' statistics as the agent's own time: each router hook enters
    the agent's clock (once the plug-in has met the agent, at its first step)."""
    import sys

    from gradflow_agent.overhead import AgentClock

    class Recording(AgentClock):
        def __init__(self):
            super().__init__()
            self.callers = []

        def __enter__(self):
            self.callers.append(sys._getframe(1).f_globals["__name__"])
            return super().__enter__()

    model = mixtral()
    agent = attach(model)
    agent.clock = clock = Recording()  # read by the plug-in (and the agent's own timed methods)
    run(model, agent, steps=3)
    agent.detach()
    # two routers, forwards of steps 2 and 3 (step 1's hooks ran before the plug-in met the agent)
    assert clock.callers.count("gradflow_agent.integrations.moe") == 4, clock.callers
    assert agent.errors.total == 0
