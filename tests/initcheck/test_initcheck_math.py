"""The numbers against mathematics that is known independently of this package."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradflow_agent.initcheck import AnalysisRunner
from gradflow_agent.initcheck.analyses.linalg import (
    condition_number,
    effective_rank,
    moments,
    operator_norm,
    rank_tolerance,
    singular_values,
)


def by_name(results):
    return {r.name: r for r in results}


def sigma_max(weight: torch.Tensor) -> float:
    return float(np.linalg.svd(weight.detach().double().numpy(), compute_uv=False)[0])


# -- pure linear algebra ----------------------------------------------------------------------------


def test_operator_norm_is_largest_singular_value_and_l2_for_vectors():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(7, 5, generator=gen)
    assert operator_norm(w) == pytest.approx(sigma_max(w), rel=1e-12)
    v = torch.randn(9, generator=gen)
    assert operator_norm(v) == pytest.approx(float(np.linalg.norm(v.numpy())), rel=1e-6)
    conv = torch.randn(4, 3, 3, 3, generator=gen)  # out x (in*kh*kw)
    assert operator_norm(conv) == pytest.approx(sigma_max(conv.reshape(4, -1)), rel=1e-12)


def test_rank_tolerance_separates_rounding_noise_from_signal():
    # singular values 1, 1e-3, 1e-9 stored in float32: the last one is below the float32 resolution
    q1, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    w = (q1[:, :3] @ torch.diag(torch.tensor([1.0, 1e-3, 1e-9], dtype=torch.float64)) @ q2.T).float()
    s = singular_values(w)
    tol = rank_tolerance(s, (6, 3), torch.float32)
    assert tol == pytest.approx(float(s[0]) * 6 * torch.finfo(torch.float32).eps)
    assert effective_rank(s, tol) == 2
    assert effective_rank(s, tol) == np.linalg.matrix_rank(w.numpy())


def test_condition_number_of_diagonal():
    assert condition_number(torch.tensor([10.0, 1.0, 0.001], dtype=torch.float64)) == pytest.approx(1e4)
    assert condition_number(torch.tensor([2.0, 0.0], dtype=torch.float64)) == math.inf


def test_moments_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = torch.distributions.Gamma(2.0, 1.0).sample((4000,))
    m = moments(x)
    data = x.double().numpy()
    assert m["mean"] == pytest.approx(data.mean(), rel=1e-9)
    assert m["std"] == pytest.approx(data.std(), rel=1e-9)
    assert m["skewness"] == pytest.approx(stats.skew(data), rel=1e-9)
    assert m["kurtosis"] == pytest.approx(stats.kurtosis(data), rel=1e-9)  # Fisher: 0 for a Gaussian
    assert moments(torch.ones(10))["skewness"] is None


# -- analyses on modules with known answers ----------------------------------------------------------


def test_linear_operator_norm_equals_largest_singular_value(quick):
    layer = nn.Linear(16, 24, bias=False)
    runner = AnalysisRunner(layer, quick((4, 16), n_samples=16, power_iterations=80))
    smax = sigma_max(runner.module.weight)
    results = by_name(runner.run_all())

    assert results["parameter_norms.weight"].value["operator"] == pytest.approx(smax, rel=1e-9)
    assert results["parameter_norms.weight"].value["frobenius"] == pytest.approx(
        float(np.linalg.norm(runner.module.weight.detach().numpy())), rel=1e-6
    )
    spectral = results["spectral.weight"].value
    assert spectral["spectral_radius"] == pytest.approx(smax, rel=1e-9)
    expected = np.linalg.svd(runner.module.weight.detach().double().numpy(), compute_uv=False)
    np.testing.assert_allclose(spectral["singular_values"], expected, rtol=1e-9)
    assert spectral["condition_number"] == pytest.approx(expected[0] / expected[-1], rel=1e-9)

    # The Jacobian of x -> W x is W: power iteration converges to sigma_max from below.
    lip = results["lipschitz"].value
    assert lip["power_iteration"] <= smax * (1 + 1e-6)
    assert lip["power_iteration"] == pytest.approx(smax, rel=1e-3)
    assert lip["weight_bound"] == pytest.approx(smax, rel=1e-9) and lip["is_upper_bound"]
    assert lip["empirical"] <= smax * (1 + 1e-4)
    # ||x W^T||_F <= sigma_max ||x||_F for every input distribution
    for dist in ("normal", "sparse", "large_magnitude", "small_magnitude", "correlated"):
        assert 0 < results[f"operator_norm.{dist}"].value["max"] <= smax * (1 + 1e-5)


def test_orthogonal_square_matrix_has_condition_one_and_full_rank(quick):
    layer = nn.Linear(32, 32)
    nn.init.orthogonal_(layer.weight)
    runner = AnalysisRunner(layer, quick((4, 32), run_lipschitz=False, run_operator_norm=False))
    results = by_name(runner.run_all())
    spectral = results["spectral.weight"]
    assert spectral.passed
    assert spectral.value["condition_number"] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(spectral.value["singular_values"], np.ones(32), atol=1e-5)
    # an orthogonal matrix has its eigenvalues on the unit circle
    assert spectral.value["max_abs_eigenvalue"] == pytest.approx(1.0, abs=1e-5)
    rank = results["rank.weight"]
    assert rank.passed and rank.value["effective_rank"] == 32 and rank.value["rank_ratio"] == 1.0
    assert rank.value["entropy_effective_rank"] == pytest.approx(32.0, rel=1e-4)


def test_rank_deficient_weight_is_reported(quick):
    from examples.initcheck_custom_module import LowRankLinear

    runner = AnalysisRunner(LowRankLinear(in_features=16, out_features=24, rank=3), quick((4, 16)))
    results = by_name(runner.run_all())
    rank = results["rank.weight"]
    assert rank.value["effective_rank"] == 3 == np.linalg.matrix_rank(runner.module.weight.detach().numpy())
    assert rank.value["max_rank"] == 16
    assert rank.value["rank_ratio"] == pytest.approx(3 / 16)
    assert not rank.passed and rank.severity == "warning" and "low rank" in rank.message
    spectral = results["spectral.weight"]
    assert not spectral.passed and spectral.value["condition_number"] > 1000  # sigma_min is rounding noise


def test_half_rank_is_below_healthy_but_not_low(quick):
    layer = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        layer.weight[7:] = 0.0  # rank 7 of 10: between 50 % and 90 %
    rank = by_name(AnalysisRunner(layer, quick((4, 10))).run_one("rank"))["rank.weight"]
    assert rank.value["effective_rank"] == 7 and not rank.passed and "below the healthy 90%" in rank.message


def relu_net(scale: float = 1.0) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return net


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relu_network_lipschitz_never_exceeds_product_of_spectral_norms(quick, seed):
    torch.manual_seed(seed)
    net = relu_net()
    bound = math.prod(sigma_max(m.weight) for m in net if isinstance(m, nn.Linear))
    runner = AnalysisRunner(net, quick((6, 8), n_samples=20, seed=seed, power_iterations=30))
    lip = runner.run_one("lipschitz")[0]
    assert lip.value["is_upper_bound"]
    assert lip.value["weight_bound"] == pytest.approx(bound, rel=1e-9)
    assert 0 < lip.value["empirical"] <= bound * (1 + 1e-5)
    assert 0 < lip.value["power_iteration"] <= bound * (1 + 1e-5)
    assert lip.value["empirical"] <= lip.value["power_iteration"] * 1.05  # local slopes bound the quotients


def test_lipschitz_flags_an_expanding_network(quick):
    runner = AnalysisRunner(relu_net(scale=8.0), quick((6, 8)))
    lip = runner.run_one("lipschitz")[0]
    assert not lip.passed and lip.severity == "warning" and "unstable" in lip.message


def test_operator_norm_of_scaled_identity(quick):
    results = {}
    for scale in (1.0, 3.0, 0.1):
        layer = nn.Linear(8, 8)
        with torch.no_grad():
            layer.weight.copy_(scale * torch.eye(8))
            layer.bias.zero_()
        results[scale] = by_name(AnalysisRunner(layer, quick((3, 8))).run_one("operator_norm"))
    for dist in ("normal", "sparse", "large_magnitude", "small_magnitude", "correlated"):
        for scale, res in results.items():
            value = res[f"operator_norm.{dist}"].value
            assert value["max"] == pytest.approx(scale, rel=1e-5)
            assert value["mean"] == pytest.approx(scale, rel=1e-5)
        assert results[1.0][f"operator_norm.{dist}"].passed
        assert ">> 1" in results[3.0][f"operator_norm.{dist}"].message
        assert "<< 1" in results[0.1][f"operator_norm.{dist}"].message


def test_nan_planted_in_a_weight_is_caught(quick):
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight[3, 5] = float("nan")
        layer.bias[0] = float("inf")
    runner = AnalysisRunner(layer, quick((4, 16)))
    results = runner.run_all()  # completes: no analysis crashes the run
    named = by_name(results)
    params = named["numerical_precision.parameters"]
    assert not params.passed and params.severity == "error"
    assert params.value["nan"] == 1 and params.value["inf"] == 1
    assert params.value["per_parameter"] == {
        "weight": {"nan": 1, "inf": 0, "large": 0, "subnormal": 0},
        "bias": {"nan": 0, "inf": 1, "large": 0, "subnormal": 0},
    }
    assert named["numerical_precision.normal_inputs"].severity == "error"
    assert named["parameter_norms.weight"].severity == "error"
    assert "1 NaN" in named["parameter_norms.weight"].message
    assert named["spectral.weight"].severity == "error"
    assert named["rank.weight"].severity == "error"
    assert runner.report(results)["summary"]["status"] == "error"
    assert not any(r.message.startswith("analysis failed") for r in results)


def test_float16_overflow_under_extreme_inputs(quick):
    layer = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        layer.weight.fill_(100.0)
    runner = AnalysisRunner(layer, quick((2, 16), dtype="float16"))
    named = by_name(runner.run_one("numerical_precision"))
    extreme = named["numerical_precision.extreme_inputs"]
    assert extreme.value["large_scale"] == pytest.approx(math.sqrt(torch.finfo(torch.float16).max))
    assert extreme.value["large"]["inf"] > 0 and not extreme.passed
    assert named["numerical_precision.normal_inputs"].passed
    # the spectrum of a float16 weight is computed in float64: rank 1 (all entries equal)
    rank = by_name(runner.run_one("rank"))["rank.weight"]
    assert rank.value["effective_rank"] == 1


def test_dead_relu_layer_and_zero_gradients(quick):
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every pre-activation negative: the ReLU never fires
    runner = AnalysisRunner(net, quick((4, 16)))
    named = by_name(runner.run_all())
    relu = named["activation_stats.1"]
    assert relu.value["zero_fraction"] == 1.0 and relu.value["dead_unit_fraction"] == 1.0
    assert relu.severity == "error" and "dead" in relu.message
    completeness = named["gradient.completeness[reconstruction]"]
    assert set(completeness.value["dead"]) == {"0.weight", "0.bias", "2.weight"}
    assert named["gradient_ratios"].value["pairs"][0]["ratio"] == 0.0 and not named["gradient_ratios"].passed


def test_healthy_relu_layer_has_no_dead_units(quick):
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    stats = by_name(AnalysisRunner(net, quick((8, 16), n_samples=10)).run_one("activation_stats"))
    relu = stats["activation_stats.1"]
    assert 0.3 < relu.value["zero_fraction"] < 0.7  # about half of a ReLU's outputs are zero at init
    assert relu.value["dead_unit_fraction"] < 0.2 and relu.passed
    out = stats["activation_stats.0"].value
    # moments of the Linear output agree with a direct computation on the same inputs
    assert out["numel"] == 10 * 8 * 32 and out["zero_fraction"] == 0.0


def test_gradient_ratio_scales_with_the_upper_layer(quick):
    """y = W2 W1 x, loss sum(y): grad W2 = 1 h^T is free of W2; grad W1 = W2^T 1 x^T scales with W2."""
    ratios = {}
    for scale in (1.0, 1e-3):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        with torch.no_grad():
            net[1].weight.mul_(scale)
        result = AnalysisRunner(net, quick((4, 8), loss_fns=["sum"])).run_one("gradient_ratios")[0]
        ratios[scale] = result
    assert ratios[1e-3].value["pairs"][0]["ratio"] == pytest.approx(
        1e-3 * ratios[1.0].value["pairs"][0]["ratio"], rel=1e-4
    )
    assert ratios[1.0].passed
    assert not ratios[1e-3].passed and "vanishing" in ratios[1e-3].message


def test_unused_parameter_gets_no_gradient(quick):
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    named = by_name(
        AnalysisRunner(Partial(), quick((2, 8), loss_fns=["sum", "variance"])).run_one("gradient")
    )
    for loss in ("sum", "variance"):
        existence = named[f"gradient.existence[{loss}]"]
        assert not existence.passed and existence.severity == "error"
        assert existence.value["missing"] == ["unused.weight", "unused.bias"]
        norms = named[f"gradient.norms[{loss}]"].value["per_parameter"]
        assert norms["unused.weight"] is None and norms["used.weight"] > 0


def test_sum_loss_gradient_of_linear_is_analytic(quick):
    """For loss = sum(W x + b): dL/db = batch size per output, dL/dx = column sums of W for every row."""
    layer = nn.Linear(6, 5)
    runner = AnalysisRunner(layer, quick((3, 6), loss_fns=["sum"]))
    named = by_name(runner.run_one("gradient"))
    per = named["gradient.norms[sum]"].value["per_parameter"]
    assert per["bias"] == pytest.approx(math.sqrt(5 * 3**2), rel=1e-6)
    col_sums = runner.module.weight.detach().sum(0)
    expected = math.sqrt(3) * float(col_sums.norm())
    assert named["gradient.input[sum]"].value["per_input"]["x"] == pytest.approx(expected, rel=1e-5)


def test_weight_distribution_of_uniform_init(quick):
    layer = nn.Linear(64, 64)  # kaiming_uniform: U(-1/8, 1/8), excess kurtosis -1.2, skewness 0
    named = by_name(AnalysisRunner(layer, quick((2, 64))).run_one("weight_distribution"))
    w = named["weight_distribution.weight"]
    assert w.passed
    assert w.value["kurtosis"] == pytest.approx(-1.2, abs=0.1)
    assert abs(w.value["skewness"]) < 0.1
    assert w.value["std"] == pytest.approx((1 / 8) / math.sqrt(3), rel=0.05)

    heavy = nn.Linear(64, 64)
    with torch.no_grad():
        heavy.weight.copy_(torch.distributions.StudentT(2.5).sample((64, 64)))
    w = by_name(AnalysisRunner(heavy, quick((2, 64))).run_one("weight_distribution"))[
        "weight_distribution.weight"
    ]
    assert not w.passed and "heavy tails" in w.message
