"""Each detector catches its fault on the right layer; standard healthy practice raises nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradflow_agent
from gradflow_agent import demo
from gradflow_agent.config import load_default, merge

# Default thresholds; a short window and frequent snapshots so the tests stay quick.
FAST = {"exporters": {"prometheus": {"enabled": False}},
        "sampling": {"export_every_n_steps": 10, "window": 20}, "stats": {"parameters": {"every_n_steps": 1}}}

EXPECTED = {  # pathology -> the layers that must be flagged with it (and nothing else may be flagged)
    "vanishing": {"0", "2"},
    "exploding": {"0", "2", "4"},
    "dead": {"3"},
    "nonfinite": {"0"},
    "saturated": {"1"},
    "stalled": {"0", "2", "4", "6"},
    "unstable": {"0"},
}


@pytest.mark.parametrize("pathology", demo.PATHOLOGIES)
def test_each_pathology_is_caught_on_its_layer_and_nothing_else(pathology):
    w = demo.build(pathology)
    agent = gradflow_agent.attach(w.model, merge(load_default(), FAST, "test"), optimizer=w.optimizer)
    for step in range(120):
        demo.train_step(w, step, agent)
    issues = agent.issues()
    agent.detach()
    assert {i.kind for i in issues} == {pathology}, [str(i) for i in issues]
    flagged = {i.layer for i in issues}
    assert EXPECTED[pathology] <= flagged, [str(i) for i in issues]
    for issue in issues:
        # optimizer steps: the nonfinite workload skips the step of each corrupt batch, as AMP does
        assert issue.recommendation and issue.message and issue.step == agent.steps
        assert issue.severity in ("warning", "critical")
    assert agent.steps == (109 if pathology == "nonfinite" else 120)


def test_healthy_demo_model_raises_nothing():
    w = demo.build(None)
    agent = gradflow_agent.attach(w.model, merge(load_default(), FAST, "test"), optimizer=w.optimizer)
    for step in range(120):
        demo.train_step(w, step, agent)
    assert agent.issues() == []
    agent.detach()


class LoRALinear(nn.Module):
    """A frozen base layer with a rank-8 adapter; B starts at zero, so A's first gradient is exactly 0."""

    def __init__(self, d: int, r: int = 8):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


class Residual(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.fc(self.norm(x)))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(8, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


class EmbeddingBag(nn.Module):
    def __init__(self, vocab: int = 50_000):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.head = nn.Linear(32, 1)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def _healthy_models():
    g = torch.Generator().manual_seed(0)

    def regression(d_in):
        def batch():
            x = torch.randn(32, d_in, generator=g)
            return x, x[:, :1].sin()
        return batch

    def seq(steps=10):
        def batch():
            x = torch.randn(16, steps, 8, generator=g)
            return x, x[:, :, :1].mean(1)
        return batch

    def tokens():
        t = torch.randint(0, 50_000, (32, 12), generator=g)
        return t, (t[:, :1] % 7).float() / 7

    def image():
        x = torch.randn(16, 3, 16, 16, generator=g)
        return x, x.mean((1, 2, 3)).unsqueeze(1)

    frozen = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    frozen[0].requires_grad_(False)
    return {
        "large-vocab embedding": (EmbeddingBag(), tokens),
        "LoRA adapters at init": (nn.Sequential(LoRALinear(32), nn.ReLU(), nn.Linear(32, 1)), regression(32)),
        "frozen layers": (frozen, regression(16)),
        "batchnorm cnn": (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1)), image),
        "residual layernorm net": (nn.Sequential(*[Residual(32) for _ in range(12)], nn.Linear(32, 1)),
                                   regression(32)),
        "shallow sigmoid net": (nn.Sequential(nn.Linear(16, 32), nn.Sigmoid(), nn.Linear(32, 1)), regression(16)),
        "lstm short sequences": (Recurrent(nn.LSTM), seq()),
        "gru short sequences": (Recurrent(nn.GRU), seq()),
        "transformer encoder": (nn.Sequential(
            nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 32, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False), nn.Flatten(), nn.Linear(80, 1)), seq()),
    }


@pytest.mark.parametrize("name", list(_healthy_models()))
def test_healthy_practice_stays_silent(name):
    model, batch = _healthy_models()[name]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    agent = gradflow_agent.attach(model, merge(load_default(), FAST, "test"), optimizer=opt)
    for _ in range(80):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)
    issues = agent.issues()
    snap = agent.latest
    agent.detach()
    assert issues == [], [str(i) for i in issues]
    assert snap.step == 80 and snap.errors == {}
