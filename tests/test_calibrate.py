"""Data-aware conversion: Gram statistics, whitened SVD optimality, robustness, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from factorized_layers import Budget, SVDLinear, factorize_
from factorized_layers.calibrate import calibrate
from factorized_layers.decompose import relative_output_error, svd_tail_error


def _output_error(layer, dense, x):
    with torch.no_grad():
        approx = x @ layer.dense_weight().T
        exact = x @ dense.weight.T
        return float((approx - exact).norm() / exact.norm())


def _subspace_inputs(rows, features, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, features, generator=g, dtype=torch.float64)
    return torch.randn(rows, dim, generator=g, dtype=torch.float64) @ basis


@pytest.mark.parametrize("rank", [2, 5, 9])
def test_whitened_svd_reaches_the_output_optimum_on_a_subspace(rank):
    torch.manual_seed(0)
    dense = nn.Linear(48, 32, dtype=torch.float64)
    x = _subspace_inputs(400, 48, dim=12)
    stats = calibrate(nn.Sequential(dense), [x[:150], x[150:]])["0"]
    calibrated = SVDLinear.from_dense(dense, rank, calibration=stats)
    plain = SVDLinear.from_dense(dense, rank)
    with torch.no_grad():
        optimum = svd_tail_error(torch.linalg.svdvals(dense.weight @ x.T), rank)
    error = _output_error(calibrated, dense, x)
    assert error == pytest.approx(optimum, rel=1e-4, abs=1e-9)
    assert error < _output_error(plain, dense, x)


def test_isotropic_inputs_match_plain_svd():
    torch.manual_seed(0)
    dense = nn.Linear(24, 16, dtype=torch.float64)
    orthonormal = torch.linalg.qr(torch.randn(200, 24, dtype=torch.float64)).Q
    x = 3.0 * orthonormal  # x.T @ x = 9 I exactly
    stats = calibrate(nn.Sequential(dense), [x])["0"]
    calibrated = SVDLinear.from_dense(dense, 6, calibration=stats)
    plain = SVDLinear.from_dense(dense, 6)
    torch.testing.assert_close(
        calibrated.dense_weight(), plain.dense_weight(), rtol=1e-8, atol=1e-8
    )


@pytest.mark.parametrize(
    "batch",
    [
        torch.zeros(5, 20),  # all-zero Gram
        torch.randn(1, 20),  # a single row: rank-1 Gram
        torch.randn(3, 20) * torch.tensor([1e30] + [0.0] * 19),  # huge dynamic range
    ],
)
def test_singular_gram_matrices_give_finite_factors(batch):
    torch.manual_seed(0)
    dense = nn.Linear(20, 12)
    stats = calibrate(nn.Sequential(dense), [batch])
    layer = SVDLinear.from_dense(dense, 4, calibration=stats["0"])
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    x = torch.randn(7, 20)
    assert torch.isfinite(layer(x)).all()


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 2)

    def forward(self, x):
        h = self.first(x)
        if x.shape[0] > 3:
            raise RuntimeError("boom")
        return self.second(h)


def test_hooks_are_removed_even_when_the_model_raises():
    model = Exploding()
    with pytest.raises(ValueError, match="calibration batch 1 failed in the model: boom") as info:
        calibrate(model, [torch.randn(2, 6), torch.randn(5, 6)])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not model.first._forward_pre_hooks and not model.second._forward_pre_hooks
    calibrate(model, [torch.randn(2, 6)])
    assert not model.first._forward_pre_hooks


def test_statistics_hold_only_the_gram_matrix():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [torch.randn(64, 10) for _ in range(20)]
    stats = calibrate(model, batches)
    assert set(stats) == {"0", "2"}
    for name, features in (("0", 10), ("2", 8)):
        assert set(vars(stats[name])) == {"gram", "rows"}
        assert stats[name].gram.shape == (features, features)
        assert stats[name].gram.dtype == torch.float64
        assert stats[name].rows == 64 * 20
    x = torch.cat(batches).double()
    torch.testing.assert_close(stats["0"].gram, x.T @ x)


def test_batch_forms_tensor_tuple_dict():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x, scale=1.0):
            return self.proj(x * scale)

    model = TwoInputs()
    x = torch.randn(3, 4)
    grams = [
        calibrate(model, [batch])["proj"].gram
        for batch in (x, (x,), [x, 1.0], {"x": x, "scale": 1.0})
    ]
    for gram in grams[1:]:
        torch.testing.assert_close(gram, grams[0])


def test_bad_calibration_input():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="calibration data is empty"):
        calibrate(model, [])
    with pytest.raises(TypeError, match="calibration batch 0 is a str"):
        calibrate(model, ["not a tensor"])
    with pytest.raises(ValueError, match="calibration batch 0 failed in the model"):
        calibrate(model, [torch.randn(3, 5)])
    with pytest.raises(TypeError, match="calibrate expects an nn.Module"):
        calibrate(lambda x: x, [torch.randn(2, 4)])
    dense = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"gram must be the \(4, 4\)"):
        SVDLinear.from_dense(dense, 1, calibration=torch.eye(3))
    with pytest.raises(TypeError, match="calibration must be InputStats"):
        SVDLinear.from_dense(dense, 1, calibration=[[1.0]])
    with pytest.raises(TypeError, match=r"calibration\['0'\] must be InputStats"):
        factorize_(nn.Sequential(nn.Linear(8, 8)), 2, calibration={"0": torch.eye(8)})


def _correlated_model_and_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 48, dtype=torch.float64),
        nn.Tanh(),
        nn.Linear(48, 32, dtype=torch.float64),
    )
    mixing = torch.randn(32, 32, generator=g, dtype=torch.float64) * torch.logspace(
        0, -3, 32, dtype=torch.float64
    )
    data = [torch.randn(64, 32, generator=g, dtype=torch.float64) @ mixing for _ in range(4)]
    return model, data


def test_factorize_with_data_or_precomputed_stats_agree_and_report_output_error():
    model, data = _correlated_model_and_data()
    twin, _ = _correlated_model_and_data()
    twin.load_state_dict(model.state_dict())
    stats = calibrate(model, data)
    from_data = factorize_(model, rank=6, calibration=data)
    from_stats = factorize_(twin, rank=6, calibration=stats)
    assert all(row.output_error is not None for row in from_data.layers)
    assert "output err" in str(from_data)
    for a, b in zip(from_data.layers, from_stats.layers):
        assert a.output_error == pytest.approx(b.output_error, rel=1e-9)
    uncalibrated = factorize_(nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32)), rank=6)
    assert all(row.output_error is None for row in uncalibrated.layers)
    assert "output err" not in str(uncalibrated)


def test_calibrated_beats_plain_on_output_error():
    model, data = _correlated_model_and_data()
    stats = calibrate(model, data)
    x = torch.cat(data)
    calibrated = SVDLinear.from_dense(model[0], 5, calibration=stats["0"])
    plain = SVDLinear.from_dense(model[0], 5)
    assert _output_error(calibrated, model[0], x) < 0.5 * _output_error(plain, model[0], x)


def test_budget_with_calibration_allocates_by_output_error():
    model, data = _correlated_model_and_data()
    twin, _ = _correlated_model_and_data()
    twin.load_state_dict(model.state_dict())
    originals = {
        name: module.weight.detach().clone()
        for name, module in model.named_children()
        if isinstance(module, nn.Linear)
    }
    stats = calibrate(model, data)
    with_data = factorize_(model, rank=Budget(params=0.3), calibration=stats)
    without = factorize_(twin, rank=Budget(params=0.3))
    for report in (with_data, without):
        weights_after = sum(r.params_after - r.shape[0] for r in report.layers)
        assert weights_after <= 0.3 * sum(w.numel() for w in originals.values())

    def total_output_error(converted):
        return sum(
            relative_output_error(
                originals[name], converted[int(name)].dense_weight(), stats[name].gram
            )
            ** 2
            for name in originals
        )

    assert total_output_error(model) < total_output_error(twin)
