"""ParameterSnapshot and ParameterDelta: known deltas give known statistics; snapshots are immutable copies."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradflow_agent.dynamics import (
    AnalysisConfig,
    ParameterChangeMetrics,
    ParameterDelta,
    ParameterMismatchError,
    ParameterSnapshot,
)

HAND_MADE = {
    "model.layers.0.self_attn.q_proj.weight": [0.0, 1e-7, -3e-5, 2e-3],
    "model.layers.0.mlp.down_proj.weight": [[0.5, -0.5], [0.0, 1e-9]],
    "model.layers.1.self_attn.q_proj.weight": [-0.25, 4e-7],
}


def _hand_made() -> tuple[ParameterDelta, np.ndarray]:
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in HAND_MADE.items()}
    flat = np.concatenate([t.double().numpy().ravel() for t in tensors.values()])
    return ParameterDelta.from_tensors(tensors), flat


def test_a_hand_made_delta_gives_the_expected_norms_and_sparsities():
    delta, d = _hand_made()
    out = ParameterChangeMetrics(thresholds=(1e-8, 1e-6, 1e-4)).compute(delta=delta)
    assert out["param_change/norm_l2"] == pytest.approx(math.sqrt(0.5**2 * 2 + 0.25**2 + 2e-3**2 + 3e-5**2
                                                                  + 4e-7**2 + 1e-7**2 + 1e-9**2), rel=1e-6)
    assert out["param_change/norm_l1"] == pytest.approx(1.25 + 2e-3 + 3e-5 + 4e-7 + 1e-7 + 1e-9, rel=1e-6)
    assert out["param_change/norm_max"] == pytest.approx(0.5)
    assert out["param_change/mean"] == pytest.approx(d.mean(), rel=1e-6)
    assert out["param_change/std"] == pytest.approx(d.std(), rel=1e-6)
    # |d| <= 1e-8: the two zeros and 1e-9 (3 of 10); <= 1e-6: also 1e-7 and 4e-7; <= 1e-4: also 3e-5
    assert out["param_change/sparsity_at_1e-08"] == pytest.approx(0.3)
    assert out["param_change/sparsity_at_1e-06"] == pytest.approx(0.5)
    assert out["param_change/sparsity_at_0.0001"] == pytest.approx(0.6)
    assert out["param_change/changed_ratio_at_1e-06"] == pytest.approx(0.5)
    # the built-in statistics agree
    assert delta.norm_max == pytest.approx(0.5) and delta.sparsity(1e-6) == pytest.approx(0.5)
    assert delta.changed_ratio(1e-4) == pytest.approx(0.4) and delta.numel == 10


def test_per_layer_and_per_component_statistics_of_a_hand_made_delta():
    delta, _ = _hand_made()
    out = ParameterChangeMetrics(thresholds=(1e-6,), per_layer=True, track_components=True).compute(delta=delta)
    # layer 0 = q_proj (4) + down_proj (4); q_proj = layer 0's 4 + layer 1's 2
    assert out["param_change/layer/model.layers.0/mean_abs_delta"] == pytest.approx((1.0 + 2e-3 + 3e-5 + 1e-7
                                                                                     + 1e-9) / 8, rel=1e-6)
    assert out["param_change/layer/model.layers.1/norm_l2"] == pytest.approx(math.hypot(0.25, 4e-7), rel=1e-6)
    assert out["param_change/layer/model.layers.1/sparsity_at_1e-06"] == pytest.approx(0.5)
    assert out["param_change/component/q_proj/sparsity_at_1e-06"] == pytest.approx(3 / 6)
    assert out["param_change/component/down_proj/sparsity_at_1e-06"] == pytest.approx(2 / 4)
    assert out["param_change/component/down_proj/mean_abs_delta"] == pytest.approx((1.0 + 1e-9) / 4, rel=1e-6)
    assert not any("/v_proj/" in k for k in out)  # only components that exist


def test_streaming_in_small_chunks_matches_whole_tensor_statistics():
    g = torch.Generator().manual_seed(1)
    tensors = {f"p{i}": torch.randn(n, generator=g) * 10 ** -(i + 3) + 0.01 * i for i, n in enumerate((257, 64, 1000))}
    whole = ParameterDelta.from_tensors(tensors).statistics((1e-4, 1e-3))
    chunked = ParameterDelta.from_tensors(tensors, chunk_elements=7).statistics((1e-4, 1e-3))
    ref = torch.cat([t.double() for t in tensors.values()])
    for s in (whole.total, chunked.total):
        assert s.numel == ref.numel()
        assert s.mean == pytest.approx(ref.mean().item(), rel=1e-6)
        assert s.std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-5)
        assert s.norm_l2 == pytest.approx(ref.norm().item(), rel=1e-6)
        assert s.at_or_below == ((ref.abs() <= 1e-4).sum().item(), (ref.abs() <= 1e-3).sum().item())
    for name in tensors:
        assert chunked.per_param[name].max_abs == pytest.approx(tensors[name].abs().max().item())


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_a_snapshot_is_an_immutable_cpu_copy_of_the_trainable_parameters():
    model = _mlp()
    model[2].bias.requires_grad_(False)
    snap = ParameterSnapshot.capture(model, step=7)
    assert snap.step == 7 and set(snap.names) == {"0.weight", "0.bias", "2.weight"}
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in snap.tensors.values())
    assert snap.nbytes == 4 * snap.numel == 4 * (32 + 8 + 24)
    with pytest.raises(TypeError):
        snap.tensors["0.weight"] = torch.zeros(1)  # read-only mapping
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.step = 8
    before = snap["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(snap["0.weight"], before)  # a copy, not a view of the live weight
    assert not snap["0.weight"].requires_grad
    everything = ParameterSnapshot.capture(model, trainable_only=False)
    assert "2.bias" in everything
    chunked = ParameterSnapshot.capture(model, chunk_elements=5, dtype=torch.bfloat16)
    whole = ParameterSnapshot.capture(model, dtype=torch.bfloat16)
    assert all(torch.equal(chunked[n], whole[n]) for n in whole.names)


@pytest.mark.parametrize(("dtype", "size"), [("float16", 2), ("bfloat16", 2), ("native", 4)])
def test_low_precision_snapshots_halve_the_memory_and_read_unchanged_weights_as_zero(dtype, size):
    model = _mlp()
    snap = ParameterSnapshot.capture(model, dtype=AnalysisConfig(snapshot_dtype=dtype).torch_dtype)
    assert snap.nbytes == size * snap.numel
    delta = ParameterDelta.from_model(snap, model)
    assert delta.sparsity(0.0) == 1.0 and delta.norm_l2 == 0.0  # rounding error does not read as change
    with torch.no_grad():
        model[0].weight[0, 0] += 0.5
    delta = ParameterDelta.from_model(snap, model)
    assert delta.numel - delta.statistics((0.0,)).total.at_or_below[0] == 1
    assert delta.norm_max == pytest.approx(0.5, rel=1e-2)


def test_delta_from_the_live_model_equals_delta_between_snapshots():
    model = _mlp()
    old = ParameterSnapshot.capture(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01).add_(1e-3)
    live = ParameterDelta.from_model(old, model)
    frozen = ParameterDelta.between(old, ParameterSnapshot.capture(model))
    for name in old.names:
        assert torch.equal(live.tensor(name), frozen.tensor(name))
        assert torch.equal(live.tensor(name), (dict(model.named_parameters())[name].detach() - old[name]))
    assert live.statistics((1e-3,)) == frozen.statistics((1e-3,))


def test_a_changed_architecture_gives_an_error_that_names_the_parameters_and_the_fix():
    model = _mlp()
    snap = ParameterSnapshot.capture(model, step=3)
    model.append(nn.Linear(3, 2))
    model[0] = nn.Linear(4, 5)
    with pytest.raises(ParameterMismatchError) as info:
        ParameterDelta.from_model(snap, model)
    msg = str(info.value)
    assert "step 3" in msg and "added: 3.bias, 3.weight" in msg and "reshaped: 0.bias, 0.weight" in msg
    assert "reset()" in msg
