"""RLPolicyAnalyzer: entropy collapse, action std, exploration adequacy."""

from __future__ import annotations

import math

import pytest
import torch

from gradflow_agent.analyze import RLPolicyAnalyzer
from gradflow_agent.analyze import pathologies as P
from gradflow_agent.analyze.rl import normalized_entropy

g = torch.Generator().manual_seed(0)
OBS = torch.randn(32, 8, generator=g)
ACT = torch.randint(0, 4, (32,), generator=g)
ADV = torch.randn(32, generator=g)
TGT = torch.randn(32, 2, generator=g)
LOSS = P.policy_loss(ACT, ADV, TGT)


def extract(out):
    return out[0], out[1], out[2], None


def test_normalized_entropy():
    assert normalized_entropy(torch.zeros(3, 5)).tolist() == pytest.approx([1.0] * 3)
    masked = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    assert normalized_entropy(masked).item() == pytest.approx(1.0)  # uniform over the 2 allowed actions
    assert normalized_entropy(torch.tensor([[50.0, 0.0, 0.0, 0.0]])).item() < 1e-10
    p = torch.tensor([0.7, 0.2, 0.1])
    assert normalized_entropy(p.log()[None]).item() == pytest.approx(float(-(p * p.log()).sum() / math.log(3)))


def test_healthy_policy_is_silent():
    issues, st = RLPolicyAnalyzer(P.Policy()).analyze(lambda: OBS, LOSS, steps=3, action_extractor=extract)
    assert issues == [], [str(i) for i in issues]
    assert st.entropy_collapse_risk == "LOW" and st.exploration_adequacy == "ADEQUATE"
    assert st.continuous_std_mean == pytest.approx(1.0) and st.action_count == 4 and st.action_dims == 2


def test_near_deterministic_policy_collapses():
    issues, st = RLPolicyAnalyzer(P.Policy(logit_scale=100.0)).analyze(lambda: OBS, LOSS, steps=3,
                                                                       action_extractor=extract)
    collapse = [i for i in issues if i.kind == "entropy_collapse"]
    assert collapse and collapse[0].severity.value == "high" and collapse[0].layer == "(model)"
    assert st.discrete_entropy_normalized < 0.25 and st.entropy_collapse_risk == "HIGH"
    assert st.exploration_adequacy == "TOO_LOW" and "low_exploration" in {i.kind for i in issues}


def test_action_std_bounds():
    issues, st = RLPolicyAnalyzer(P.Policy(log_std=-4.0)).analyze(lambda: OBS, LOSS, steps=2, action_extractor=extract)
    assert "low_action_std" in {i.kind for i in issues}
    assert st.continuous_std_mean == pytest.approx(math.exp(-4.0))
    issues, st = RLPolicyAnalyzer(P.Policy(log_std=1.5)).analyze(lambda: OBS, LOSS, steps=2, action_extractor=extract)
    assert {i.kind for i in issues} == {"excessive_exploration"} and st.exploration_adequacy == "TOO_HIGH"


def test_entropy_falling_during_training_is_medium_risk():
    policy = P.Policy()
    opt = torch.optim.SGD(policy.parameters(), lr=20.0)

    def greedy(out):  # push every state toward action 0
        return -torch.log_softmax(out[0], -1)[:, 0].mean()

    issues, st = RLPolicyAnalyzer(policy, optimizer=opt).analyze(lambda: OBS, greedy, steps=6,
                                                                 action_extractor=lambda o: o[0])
    assert st.entropy_drop > 0.5 and st.entropy_history[0] > 0.9
    assert st.entropy_collapse_risk in ("MEDIUM", "HIGH") and "entropy_collapse" in {i.kind for i in issues}


def test_extractor_forms():
    policy = P.Policy()
    _, st = RLPolicyAnalyzer(policy).analyze(lambda: OBS, LOSS, steps=1,
                                             action_extractor=lambda o: {"logits": o[0], "std": o[1]})
    assert st.action_count == 4 and st.continuous_std_mean == pytest.approx(1.0)
    _, st = RLPolicyAnalyzer(policy).analyze(lambda: OBS, LOSS, steps=1)  # default: a tuple is (logits, std, ...)
    assert st.action_count == 4 and st.continuous_std_mean == pytest.approx(1.0)
