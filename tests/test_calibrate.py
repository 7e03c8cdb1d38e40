"""Data-aware conversion: Gram statistics, whitened SVD optimality, robustness, errors."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import Budget, ErrorBound, SVDLinear, TuckerLinear, factorize_
from factorized_layers.calibrate import calibrate
from factorized_layers.decompose import relative_output_error, svd_tail_error
from factorized_layers.ranks import select_rank


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
        tensors = {k for k, v in vars(stats[name]).items() if isinstance(v, torch.Tensor)}
        assert tensors == {"gram"}  # no activation is kept; the rest are scalar counts
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
    from_data = factorize_(model, rank=6, calibration=data, sequential=False)
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


# --------------------------------------------------------------------------- TuckerLinear


def _forward_output_error(layer, dense, x):
    """Independent oracle: the converted layer's own forward against ``F.linear``."""
    with torch.no_grad():
        reference = F.linear(x, dense.weight)
        return float((layer(x) - dense(x)).norm() / reference.norm())


def _tucker_source(out_features=40, in_features=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_features, out_features, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out_features, in_features, generator=g, dtype=torch.float64))
        dense.bias.copy_(torch.randn(out_features, generator=g, dtype=torch.float64))
    return dense


@pytest.mark.parametrize(
    "rank, factor",
    [(0.5, 1e-3), (0.3, 1e-3), (0.15, 0.7), ((5, 4, 2, 2, 2, 2), 1e-3), (3, 0.75)],
)
def test_calibrated_tucker_beats_plain_on_subspace_inputs(rank, factor):
    dense = _tucker_source()
    x = _subspace_inputs(400, 48, dim=6)
    stats = calibrate(nn.Sequential(dense), [x[:250], x[250:]])["0"]
    calibrated = TuckerLinear.from_dense(dense, rank, calibration=stats)
    plain = TuckerLinear.from_dense(dense, rank)
    assert calibrated.rank == plain.rank or isinstance(rank, float)
    parameters = sum(p.numel() for p in (calibrated.core, *calibrated.factors()))
    if isinstance(rank, float):
        assert parameters <= rank * 48 * 40
    error = _forward_output_error(calibrated, dense, x)
    assert error < factor * _forward_output_error(plain, dense, x)
    report = calibrated.tensorization_report
    chosen = report.candidates[report.chosen]
    assert chosen.output_error == pytest.approx(error, rel=1e-6, abs=1e-9)
    # Kept: the lowest rms of output and weight error among the candidates no worse on
    # the data than the two-mode form (whose error the rank profile promises).
    two_mode = [c for c in report.candidates if len(c.out_shape) == len(c.in_shape) == 1]
    bound = two_mode[0].output_error if two_mode else math.inf
    eligible = [c for c in report.candidates if c.output_error <= bound]
    assert chosen in eligible
    assert math.hypot(chosen.output_error, chosen.error) == min(
        math.hypot(c.output_error, c.error) for c in eligible
    )
    assert "output_error=" in str(report) and "output_error=" not in str(plain.tensorization_report)


@pytest.mark.parametrize("rank", [3, 9, 20])
def test_two_mode_calibrated_tucker_reaches_the_whitened_svd_optimum(rank):
    dense = _tucker_source()
    x = _subspace_inputs(300, 48, dim=24)
    stats = calibrate(nn.Sequential(dense), [x])["0"]
    layer = TuckerLinear.from_dense(
        dense, (40, rank), out_shape=(40,), in_shape=(48,), calibration=stats
    )
    with torch.no_grad():
        optimum = svd_tail_error(torch.linalg.svdvals(dense.weight @ x.T), rank)
    assert _forward_output_error(layer, dense, x) == pytest.approx(optimum, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("rank", [0.4, 4, (4, 3, 2, 3, 3, 2)])
def test_isotropic_inputs_give_plain_tucker(rank):
    dense = _tucker_source()
    orthonormal = torch.linalg.qr(torch.randn(300, 48, dtype=torch.float64)).Q
    x = 2.0 * orthonormal  # x.T @ x = 4 I exactly
    stats = calibrate(nn.Sequential(dense), [x])["0"]
    calibrated = TuckerLinear.from_dense(dense, rank, calibration=stats)
    plain = TuckerLinear.from_dense(dense, rank)
    assert calibrated.rank == plain.rank and calibrated.in_shape == plain.in_shape
    torch.testing.assert_close(
        calibrated.dense_weight(), plain.dense_weight(), rtol=1e-7, atol=1e-7
    )


@pytest.mark.parametrize("ridge", [1e-6, 0.0])
@pytest.mark.parametrize(
    "batch",
    [
        torch.zeros(5, 24),  # all-zero Gram
        torch.randn(1, 24),  # a single row: rank-1 Gram
        torch.randn(3, 24) * torch.tensor([1e30] + [0.0] * 23),  # huge dynamic range
    ],
)
@pytest.mark.parametrize("rank", [0.3, 2])
def test_tucker_singular_gram_matrices_give_finite_factors(batch, ridge, rank):
    torch.manual_seed(0)
    dense = nn.Linear(24, 18)
    stats = calibrate(nn.Sequential(dense), [batch])
    layer = TuckerLinear.from_dense(dense, rank, calibration=stats["0"], ridge=ridge)
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert torch.isfinite(layer(torch.randn(7, 24))).all()
    report = layer.tensorization_report
    assert all(math.isfinite(c.output_error) for c in report.candidates)
    if not batch.any():
        # No data carries no information: the plain decomposition.
        plain = TuckerLinear.from_dense(dense, rank)
        torch.testing.assert_close(layer.dense_weight(), plain.dense_weight())


def test_tucker_rank_profile_uses_output_error_spectrum_and_ridge():
    dense = _tucker_source()
    x = _subspace_inputs(300, 48, dim=12)
    gram = x.T @ x
    profiles = {}
    for ridge in (1e-6, 1e-2):
        profile = TuckerLinear.rank_profile(dense, calibration=gram, ridge=ridge)
        svd = SVDLinear.rank_profile(dense, calibration=gram, ridge=ridge)
        kept = len(profile.ranks) - 1  # the last candidate is the exact budget 1.0
        assert profile.ranks[:kept] == tuple(p / (48 * 40) for p in svd.params[:kept])
        assert profile.errors[:kept] == svd.errors[:kept]
        profiles[ridge] = profile
    plain = TuckerLinear.rank_profile(dense)
    assert plain.ranks == profiles[1e-6].ranks
    # Budget 12 * (48 + 40) sees all the data: only the calibrated profile knows it.
    assert profiles[1e-6].errors[11] < 1e-3 < profiles[1e-2].errors[11] < plain.errors[11]


@pytest.mark.parametrize("bound", [0.05, 0.2])
def test_tucker_error_bound_policy_meets_the_output_error_target(bound):
    dense = _tucker_source()
    x = _subspace_inputs(300, 48, dim=16) + 0.05 * torch.randn(300, 48, dtype=torch.float64)
    stats = calibrate(nn.Sequential(dense), [x])["0"]
    calibrated = TuckerLinear.from_dense(dense, ErrorBound(bound), calibration=stats)
    plain = TuckerLinear.from_dense(dense, ErrorBound(bound))
    assert _forward_output_error(calibrated, dense, x) <= bound + 1e-6

    def size(layer):
        return sum(p.numel() for p in (layer.core, *layer.factors()))

    assert size(calibrated) < size(plain)


def test_tucker_calibration_on_meta_builds_a_meta_layer():
    with torch.device("meta"):
        dense = nn.Linear(48, 40)
    layer = TuckerLinear.from_dense(dense, 0.3, calibration=torch.eye(48))
    assert layer.core.device.type == "meta"
    with pytest.raises(ValueError, match=r"gram must be the \(48, 48\)"):
        TuckerLinear.from_dense(dense, 0.3, calibration=torch.eye(40))
    with pytest.raises(ValueError, match="ridge must be a finite non-negative float, got -1"):
        TuckerLinear.from_dense(dense, 0.3, calibration=torch.eye(48), ridge=-1.0)


def test_factorize_uses_tucker_calibration_and_reports_output_error():
    model, data = _correlated_model_and_data()
    plain_model, _ = _correlated_model_and_data()
    plain_model.load_state_dict(model.state_dict())
    originals = [copy.deepcopy(model[0]), copy.deepcopy(model[2])]
    x = torch.cat(data)
    inputs = [x, torch.tanh(originals[0](x))]
    report = factorize_(
        model, rank=0.3, layers={nn.Linear: TuckerLinear}, calibration=data, sequential=False
    )
    plain = factorize_(plain_model, rank=0.3, layers={nn.Linear: TuckerLinear})
    assert {row.target_type for row in report.replaced} == {"TuckerLinear"}
    assert "output err" in str(report)
    for row, plain_row, layer, plain_layer, dense, inp in zip(
        report.layers, plain.layers, (model[0], model[2]), (plain_model[0], plain_model[2]),
        originals, inputs,
    ):  # fmt: skip
        assert row.note is None and plain_row.output_error is None
        assert row.params_after <= 0.3 * dense.weight.numel() + dense.out_features
        error = _forward_output_error(layer, dense, inp)
        assert row.output_error == pytest.approx(error, rel=1e-6)
        assert error < 0.7 * _forward_output_error(plain_layer, dense, inp)


def test_factorize_budget_with_tucker_calibration():
    model, data = _correlated_model_and_data()
    stats = calibrate(model, data)
    report = factorize_(
        model, rank=Budget(params=0.4), layers={nn.Linear: TuckerLinear}, calibration=stats
    )
    assert report.replaced and all(row.output_error is not None for row in report.replaced)
    weights_after = sum(row.params_after - row.shape[0] for row in report.layers)
    assert weights_after <= 0.4 * (32 * 48 + 48 * 32)


# --------------------------------------------------------------------------- ridge


def test_ridge_reaches_the_rank_profile_in_from_dense_and_factorize():
    dense = _tucker_source(24, 24)
    x = _subspace_inputs(200, 24, dim=6) + 1e-3 * torch.randn(200, 24, dtype=torch.float64)
    stats = calibrate(nn.Sequential(dense), [x])["0"]
    policy = ErrorBound(0.01)
    choices = {}
    for ridge in (1e-6, 10.0):
        profile = SVDLinear.rank_profile(dense, calibration=stats, ridge=ridge)
        choices[ridge] = select_rank(policy, profile)
        layer = SVDLinear.from_dense(dense, policy, calibration=stats, ridge=ridge)
        assert layer.rank == choices[ridge]
        model = nn.Sequential(copy.deepcopy(dense))
        report = factorize_(
            model,
            policy,
            calibration={"0": stats},
            layer_options={SVDLinear: {"ridge": ridge}},
            allow_larger=True,
        )
        assert report.layers[0].rank == choices[ridge]
    assert choices[1e-6] < choices[10.0]


# --------------------------------------------------------------------------- convolutions


def test_convolution_statistics_are_input_channel_grams():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1))
    batches = [torch.randn(2, 3, 9, 7), torch.randn(3, 3, 9, 7)]
    stats = calibrate(model, batches)
    assert set(stats) == {"0", "2"}
    x = torch.cat(batches).double()
    torch.testing.assert_close(stats["0"].gram, torch.einsum("nchw,ndhw->cd", x, x))
    assert stats["0"].rows == 5 * 9 * 7 and stats["2"].rows == 5 * 7 * 5
    assert stats["2"].gram.shape == (4, 4)
    unbatched = calibrate(model, [x[0].float()])["0"]
    torch.testing.assert_close(unbatched.gram, torch.einsum("chw,dhw->cd", x[0], x[0]))


def test_factorize_cnn_with_calibration_whitens_convolutions_and_passes_their_options():
    from factorized_layers import CPConv2d, Energy

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )
    with torch.no_grad():
        model[0].bias[2:] = -100.0  # six channels the ReLU leaves dead
    data = [torch.randn(16, 3, 6, 6) for _ in range(2)]
    stats = calibrate(model, data)
    original = copy.deepcopy(model[2])
    policy = Energy(0.8)
    options = {CPConv2d: {"ridge": 0.0, "whitening_ridge": 1.0, "n_iter": 20}}
    report = factorize_(model, policy, include=["2", "5"], calibration=stats, layer_options=options)
    rows = {row.name: row for row in report.layers}
    assert rows["2"].target_type == "CPConv2d" and rows["2"].note is None
    assert rows["2"].output_error is None  # a channel Gram does not give a conv's output error
    assert rows["5"].output_error is not None
    assert "weighted_error" in model[2].fit_info and model[2].fit_info["ridge"] == 0.0
    # The whitening ridge reached the rank profile (CP-ALS's ridge= did not).
    ranks = {
        ridge: select_rank(
            policy, CPConv2d.rank_profile(original, calibration=stats["2"], whitening_ridge=ridge)
        )
        for ridge in (1.0, 1e-6)
    }
    assert rows["2"].rank == ranks[1.0] != ranks[1e-6]


def test_gram_accumulates_in_bounded_float64_chunks(monkeypatch):
    # The package exports the function calibrate under the submodule's name.
    calibrate_module = importlib.import_module("factorized_layers.calibrate")
    monkeypatch.setattr(calibrate_module, "_CHUNK_ENTRIES", 25)  # 2 rows of 10 per chunk
    x = torch.randn(3, 7, 10)
    stats = calibrate_module.InputStats(torch.zeros(10, 10, dtype=torch.float64))
    stats.add(x)
    flat = x.reshape(-1, 10).double()
    torch.testing.assert_close(stats.gram, flat.T @ flat)
    assert stats.rows == 21
