"""Small models built to have one gradient-flow problem each, and healthy twins (tests, docs, demos).

Every builder is seeded and CPU-sized (milliseconds per step). Each pathology names the issue type the
analyzers must raise on it; the healthy builders must raise nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .scale import gradient_scale


def mlp(widths: list[int], act: type[nn.Module] = nn.ReLU, gain: float | None = None, seed: int = 0) -> nn.Sequential:
    """Linear layers of `widths` with `act` between them; `gain`: weights ~ N(0, gain^2 / fan_in), zero biases."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    model = nn.Sequential(*layers)
    if gain is not None:
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, gain / math.sqrt(m.in_features))
                    m.bias.zero_()
    return model


def classification_data(n: int = 128, d: int = 32, classes: int = 10, seed: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


# -- feedforward -----------------------------------------------------------------------------------------------
def healthy_mlp() -> nn.Sequential:
    """Kaiming-scaled ReLU MLP 32-64-64-32-10: no issue."""
    return mlp([32, 64, 64, 32, 10], nn.ReLU, gain=math.sqrt(2.0))


def deep_sigmoid() -> nn.Sequential:
    """12 sigmoid layers at the default initialisation: VANISHING in the first layers, DECAY through depth."""
    return mlp([32] + [32] * 12 + [10], nn.Sigmoid)


def large_gain() -> nn.Sequential:
    """ReLU MLP initialised with gain 4 (vs sqrt(2)): EXPLODING."""
    return mlp([32, 64, 64, 64, 64, 64, 10], nn.ReLU, gain=4.0)


def dead_relu() -> nn.Sequential:
    """The second ReLU's pre-activation bias is -20 on 56 of 64 units: DEAD."""
    model = mlp([32, 64, 64, 64, 10], nn.ReLU, gain=math.sqrt(2.0))
    with torch.no_grad():
        model[2].bias[:56] = -20.0
    return model


def hourglass() -> nn.Sequential:
    """32-64-64-2-64-64-10: a 2-unit waist, BOTTLENECK at layer "4"."""
    return mlp([32, 64, 64, 2, 64, 64, 10], nn.ReLU, gain=math.sqrt(2.0))


def layer_outlier() -> nn.Sequential:
    """A layer with 1000x weights followed by LayerNorm: its own gradient is 1000x smaller than its
    neighbours' (LayerNorm divides the backward signal by the scale), the rest unchanged: LAYER_VARIANCE."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.LayerNorm(64, elementwise_affine=False),
                          nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight.mul_(1000.0)
    return model


class BilinearGame(nn.Module):
    """min over p0, max over p1 of p0 * p1 (p1's gradient reversed): the gradient field rotates (CIRCULATION)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p[0] * gradient_scale(self.p[1], -1.0) + 0.0 * x.sum()


# -- recurrent --------------------------------------------------------------------------------------------------
class SequenceModel(nn.Module):
    """A recurrent layer read at its last timestep by a linear head."""

    def __init__(self, cell: str = "rnn", hidden: int = 32, inputs: int = 4, recurrent_scale: float | None = None,
                 orthogonal: bool = False, weight_scale: float | None = None, forget_bias: float | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3)
        with torch.no_grad():
            if orthogonal:
                nn.init.orthogonal_(self.rnn.weight_hh_l0)
            if recurrent_scale is not None:
                self.rnn.weight_hh_l0.mul_(recurrent_scale)
            if weight_scale is not None:
                self.rnn.weight_ih_l0.mul_(weight_scale)
                self.rnn.weight_hh_l0.mul_(weight_scale)
            if forget_bias is not None and cell == "lstm":
                for b in (self.rnn.bias_ih_l0, self.rnn.bias_hh_l0):
                    b[hidden:2 * hidden] = forget_bias / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def short_memory_rnn() -> SequenceModel:
    """tanh RNN with recurrent weights scaled by 0.1: SHORT_MEMORY, VANISHING_TEMPORAL, SPECTRAL_LOW."""
    return SequenceModel("rnn", recurrent_scale=0.1)


def healthy_rnn() -> SequenceModel:
    """tanh RNN with orthogonal recurrent weights (spectral radius 1) and zero biases (a constant bias drive
    would push the state into tanh saturation): no temporal issue."""
    model = SequenceModel("rnn", orthogonal=True)
    with torch.no_grad():
        model.rnn.bias_ih_l0.zero_()
        model.rnn.bias_hh_l0.zero_()
    return model


def saturated_lstm() -> SequenceModel:
    """LSTM with all weights x50: gates stuck open/closed (GATE_SATURATION)."""
    return SequenceModel("lstm", weight_scale=50.0)


# -- attention ----------------------------------------------------------------------------------------------------
class TinyEncoder(nn.Module):
    """Embedding + nn.TransformerEncoder (batch first) + mean-pool classifier, with optional faults."""

    def __init__(self, layers: int = 2, d: int = 32, heads: int = 4, ff: int = 64, norm_first: bool = True,
                 qk_scale: float = 1.0, vocab: int = 50, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)
        if qk_scale != 1.0:
            with torch.no_grad():
                for enc in self.encoder.layers:
                    enc.self_attn.in_proj_weight[:2 * d].mul_(qk_scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class Block(nn.Module):
    """A pre-norm block x + attn(norm(x)) then x + mlp(x), with a residual factor `alpha` (or none)."""

    def __init__(self, d: int, heads: int, alpha: float = 1.0, residual: bool = True, branch_scale: float = 1.0
                 ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.alpha, self.residual = alpha, residual
        with torch.no_grad():
            self.attn.out_proj.weight.mul_(branch_scale)
            self.mlp[2].weight.mul_(branch_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a, _ = self.attn(h, h, h)
        if not self.residual:
            return self.mlp(a)
        x = self.alpha * x + a
        return self.alpha * x + self.mlp(x)


class BlockStack(nn.Module):
    def __init__(self, n: int = 4, d: int = 32, heads: int = 4, vocab: int = 50, classes: int = 5, seed: int = 0,
                 **block_kw: float) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d, heads, **block_kw) for _ in range(n)])
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)).mean(1))


class SinkAttention(nn.Module):
    """One attention layer whose queries all match token 0's key best (token 0 carries 8x the shared
    component of every token): ATTN_BOTTLENECK (an attention sink)."""

    def __init__(self, d: int = 16, heads: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, bias=False)
        self.head = nn.Linear(d, 3)
        with torch.no_grad():
            eye = torch.eye(d) * 2.0
            self.attn.in_proj_weight.copy_(torch.cat([eye, eye, torch.randn(d, d) / math.sqrt(d)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x)
        return self.head(a.mean(1))


def sink_inputs(batch: int = 16, tokens: int = 10, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.ones(d) / math.sqrt(d) * 2.0
    x = shared + 0.3 * torch.randn(batch, tokens, d, generator=g)
    x[:, 0] = 8.0 * shared
    return x


# -- policies -----------------------------------------------------------------------------------------------------
class Policy(nn.Module):
    """Actor with discrete logits and a Gaussian head (std = exp(log_std)); `logit_scale` sharpens the logits."""

    def __init__(self, obs: int = 8, actions: int = 4, dims: int = 2, logit_scale: float = 1.0, log_std: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(obs, 32), nn.Tanh())
        self.logits = nn.Linear(32, actions)
        self.mean = nn.Linear(32, dims)
        self.log_std = nn.Parameter(torch.full((dims,), float(log_std)))
        with torch.no_grad():
            self.logits.weight.mul_(logit_scale)
            self.logits.bias.mul_(logit_scale)

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(s)
        return self.logits(h), self.log_std.exp().expand(s.shape[0], -1), self.mean(h)


def policy_loss(actions: torch.Tensor, advantages: torch.Tensor, target: torch.Tensor
                ) -> Callable[[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A policy-gradient loss for Policy outputs: -log pi(a) A for the discrete head plus a Gaussian NLL."""
    def loss(out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits, std, mean = out
        logp = torch.log_softmax(logits, -1).gather(1, actions[:, None]).squeeze(1)
        gauss = (((target - mean) / std) ** 2 / 2 + std.log()).sum(-1)
        return -(logp * advantages).mean() + 0.1 * gauss.mean()
    return loss
