"""SparseQualityMetrics: identities, the random baseline on a trained model, and leaving the model exactly as found."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.dynamics import (
    AnalysisContext,
    ParameterDelta,
    ParameterSnapshot,
    SparseQualityMetrics,
    compare_outputs,
)
from gradflow_agent.dynamics.sparse_quality import ModelCall, bits_equal


def _classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 6))


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    w = torch.randn(10, 6, generator=g)
    return x, (x @ w).argmax(1)


def _train(model: nn.Module, steps: int, lr: float = 3e-3) -> None:
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(steps):
        xb, yb = x[(i * 32) % 256:(i * 32) % 256 + 32], y[(i * 32) % 256:(i * 32) % 256 + 32]
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()


def _state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _measure(model, snapshot, inputs, thresholds, **kwargs):
    computer = SparseQualityMetrics(thresholds=thresholds, **kwargs)
    delta = ParameterDelta.from_model(snapshot, model)
    return computer.compute(delta=delta, snapshot=snapshot,
                            context=AnalysisContext(model=model, inputs=inputs, step=5, snapshot_step=0))


def test_zeroing_nothing_gives_kl_0_cosine_1_top1_1():
    model = _classifier()
    snap = ParameterSnapshot.capture(model)
    model[0].weight.requires_grad_(False)  # an unchanged parameter: its zero updates are the ones dropped
    _train(model, 5)
    model[0].weight.requires_grad_(True)
    x, _ = _data(16, seed=1)
    out = _measure(model, snap, x, thresholds=(0.0,), include_random=False)
    assert out["sparse/kl_at_0"] == 0.0
    assert out["sparse/mse_at_0"] == 0.0
    assert out["sparse/top1_agree_at_0"] == 1.0
    assert out["sparse/cosine_at_0"] == pytest.approx(1.0, abs=1e-12)
    frozen = model[0].weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert out["sparse/unchanged_ratio_at_0"] == pytest.approx(frozen / total)  # dropped, yet no effect
    assert out["sparse/kept_ratio_at_0"] == pytest.approx(1 - frozen / total)


def test_kept_ratio_equals_the_delta_changed_ratio_and_dropping_everything_reverts_the_model():
    model = _classifier()
    old = copy.deepcopy(model)
    snap = ParameterSnapshot.capture(model)
    _train(model, 10)
    x, _ = _data(16, seed=2)
    delta = ParameterDelta.from_model(snap, model)
    out = _measure(model, snap, x, thresholds=(1e-4, 1e9), include_random=False, max_samples=0)
    assert out["sparse/kept_ratio_at_0.0001"] == pytest.approx(delta.changed_ratio(1e-4))
    assert out["sparse/kept_ratio_at_1e+09"] == 0.0
    # dropping every update = the old model: compare with its outputs directly
    old.eval()
    model.eval()
    with torch.no_grad():
        expected = compare_outputs(model(x), old(x))
    model.train()
    assert out["sparse/kl_at_1e+09"] == pytest.approx(expected["kl"], rel=1e-6)
    assert out["sparse/top1_agree_at_1e+09"] == pytest.approx(expected["top1_agree"])
    assert out["sparse/kl_at_1e+09"] > out["sparse/kl_at_0.0001"] > 0


def test_the_random_baseline_at_the_same_sparsity_is_worse_than_magnitude_pruning_on_a_trained_model():
    model = _classifier()
    _train(model, 60)  # a trained model ...
    snap = ParameterSnapshot.capture(model)
    _train(model, 20, lr=1e-3)  # ... and its update over 20 more steps
    delta = ParameterDelta.from_model(snap, model)
    mags = torch.cat([d.abs().reshape(-1) for _, d in delta.items()])
    t50, t90 = (float(mags.quantile(q)) for q in (0.5, 0.9))
    x, _ = _data(128, seed=3)
    out = _measure(model, snap, x, thresholds=(t50, t90), max_samples=0)
    for t, factor in ((t50, 5.0), (t90, 1.3)):  # half the updates kept: random is ~10-20x worse; 10%: ~2x
        tag = f"{t:g}"
        assert out[f"sparse/kept_ratio_at_{tag}"] == pytest.approx(1 - delta.sparsity(t))
        assert out[f"sparse/kl_at_{tag}_random"] > factor * out[f"sparse/kl_at_{tag}"]
        assert out[f"sparse/mse_at_{tag}_random"] > factor * out[f"sparse/mse_at_{tag}"]
        assert out[f"sparse/cosine_at_{tag}_random"] < out[f"sparse/cosine_at_{tag}"]
    tag = f"{t50:g}"
    assert out[f"sparse/top1_agree_at_{tag}_random"] <= out[f"sparse/top1_agree_at_{tag}"]
    assert out[f"sparse/kl_at_{t90:g}"] > out[f"sparse/kl_at_{t50:g}"]  # dropping more hurts more


def test_the_model_is_left_bit_exactly_as_found_modes_and_rng_included():
    model = _classifier()
    snap = ParameterSnapshot.capture(model, dtype=torch.bfloat16)  # dropped updates revert to rounded values
    _train(model, 10)
    model.train()
    model[2].eval()  # a submodule in its own mode
    before = _state_bits(model)
    rng = torch.get_rng_state()
    x, _ = _data(16, seed=4)
    out = _measure(model, snap, x, thresholds=(1e-5, 1e-3))
    assert out["sparse/kl_at_0.001"] > 0  # the weights really were changed in between
    assert all(bits_equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model[2].training and model[4].training
    assert torch.equal(torch.get_rng_state(), rng)  # the random baseline used its own generator


def test_weights_are_restored_even_when_the_forward_fails_midway():
    model = _classifier()
    snap = ParameterSnapshot.capture(model)
    _train(model, 5)
    before = _state_bits(model)
    calls = []

    def flaky(m, inputs):
        calls.append(1)
        if len(calls) == 3:  # after the first sparse forward: the weights are sparse right now
            raise RuntimeError("out of memory (simulated)")
        return m(inputs)

    with pytest.raises(RuntimeError, match="simulated"):
        _measure(model, snap, _data(8)[0], thresholds=(1e-4,), forward_fn=flaky)
    assert len(calls) == 3
    assert all(bits_equal(v, before[k]) for k, v in model.state_dict().items())


def test_bit_comparison_sees_what_torch_equal_misses():
    assert torch.equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not bits_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    nan = torch.tensor([float("nan")])
    assert not torch.equal(nan, nan) and bits_equal(nan, nan.clone())
    a = torch.randn(100)
    assert bits_equal(a, a.clone(), chunk_elements=7)
    b = a.clone()
    b[99] = torch.nextafter(b[99], torch.tensor(1e9))
    assert not bits_equal(a, b, chunk_elements=7)


def test_output_comparison_definitions():
    full = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    other = torch.tensor([[1.0, 0.5, -1.0], [1.0, 0.0, 0.0]])
    got = compare_outputs(full, other)
    p = F.log_softmax(full, -1)
    q = F.log_softmax(other, -1)
    kl = F.kl_div(q, p, log_target=True, reduction="batchmean").item()
    assert got["kl"] == pytest.approx(kl, rel=1e-6)
    assert got["cosine"] == pytest.approx(F.cosine_similarity(full, other, dim=-1).mean().item(), rel=1e-6)
    assert got["mse"] == pytest.approx(F.mse_loss(full, other).item(), rel=1e-6)
    assert got["top1_agree"] == 0.5
    only_first = compare_outputs(full, other, rows=torch.tensor([True, False]))
    assert only_first["top1_agree"] == 1.0


def test_dict_inputs_with_an_attention_mask_compare_only_real_positions():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20)

        def forward(self, input_ids, attention_mask=None):
            return {"logits": self.head(self.emb(input_ids))}

    model = Tiny()
    snap = ParameterSnapshot.capture(model)
    with torch.no_grad():
        model.emb.weight[5] += 3.0  # only token 5 changed
    ids = torch.tensor([[1, 2, 5, 5], [3, 4, 6, 7]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # token 5 only at padded positions
    out = _measure(model, snap, ModelCall((), {"input_ids": ids, "attention_mask": mask}), thresholds=(1e9,),
                   include_random=False)
    assert out["sparse/kl_at_1e+09"] == 0.0 and out["sparse/top1_agree_at_1e+09"] == 1.0
    unmasked = _measure(model, snap, {"input_ids": ids}, thresholds=(1e9,), include_random=False)
    assert unmasked["sparse/kl_at_1e+09"] > 0


def test_max_samples_limits_the_rows_run():
    model = _classifier()
    snap = ParameterSnapshot.capture(model)
    _train(model, 3)
    seen = []

    def record(m, inputs):
        seen.append(inputs.shape[0])
        return m(inputs)

    _measure(model, snap, _data(40)[0], thresholds=(1e-4,), max_samples=8, forward_fn=record)
    assert seen == [8, 8, 8]


def test_a_dataloader_batch_x_y_calls_a_one_input_model_with_x(caplog):
    import logging

    import torch
    from torch import nn

    from gradflow_agent.dynamics.sparse_quality import call_model

    model = nn.Linear(4, 2)
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    with caplog.at_level(logging.INFO, logger="gradflow_agent"):
        out = call_model(model, (x, y))
        call_model(model, (x, y))
    assert torch.equal(out, model(x))
    assert sum("DataLoader batch" in r.getMessage() for r in caplog.records) == 1

    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    assert torch.equal(call_model(Two(), (x, x)), x + x)  # a model that takes two inputs gets both
