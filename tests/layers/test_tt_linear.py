"""TTLinear-specific tests: forward schedules, TT-SVD fits, tensorization search, truncation."""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from factorized_layers import Budget, Energy, ErrorBound, SVDLinear, TTLinear, factorize_
from factorized_layers.decompose import tt_svd, tt_to_matrix
from factorized_layers.functional import tt_linear, tt_plan, tt_schedule
from factorized_layers.layers.tt import default_tt_shapes, tt_tensorization_candidates
from factorized_layers.ranks import tt_params
from factorized_layers.testing import assert_close_to_reference, leading_shapes


def _einsum_weight(layer: TTLinear) -> torch.Tensor:
    """Independent oracle: the dense weight by one torch.einsum over all cores."""
    d = len(layer.out_shape)
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(d + 1)]
    outs = [next(letters) for _ in range(d)]
    ins = [next(letters) for _ in range(d)]
    terms = [bonds[k] + outs[k] + ins[k] + bonds[k + 1] for k in range(d)]
    equation = ",".join(terms) + "->" + "".join(outs) + "".join(ins)
    weight = torch.einsum(equation, *layer.cores())
    return weight.reshape(layer.out_features, layer.in_features)


def _linear(out_features, in_features, weight=None, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    if weight is not None:
        with torch.no_grad():
            layer.weight.copy_(weight)
    return layer


def _error(layer, dense):
    with torch.no_grad():
        return float((layer.dense_weight() - dense.weight).norm() / dense.weight.norm())


def _tt_weight(outs, ins, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = (1, *ranks, 1)
    cores = [
        torch.randn(full[k], o, i, full[k + 1], generator=g, dtype=torch.float64)
        for k, (o, i) in enumerate(zip(outs, ins))
    ]
    layer = TTLinear(math.prod(ins), math.prod(outs), list(ranks), in_shape=ins, out_shape=outs,
                     dtype=torch.float64)  # fmt: skip
    with torch.no_grad():
        for name, core in zip(layer._names, cores):
            getattr(layer, name).copy_(core)
    return layer.dense_weight().detach()


# --------------------------------------------------------------------------- structure


def test_default_tensorization_and_candidates():
    assert default_tt_shapes(1536, 384) == ((48, 32), (24, 16))
    assert default_tt_shapes(384, 1536, 3) == ((8, 8, 6), (16, 12, 8))
    assert default_tt_shapes(12, 7) == ((4, 3), (1, 7))
    assert default_tt_shapes(7, 5) == ((7, 1), (1, 5))
    assert tt_tensorization_candidates(1536, 384) == [
        ((1536, 1), (1, 384)),
        ((48, 32), (24, 16)),
        ((16, 12, 8), (8, 8, 6)),
    ]
    assert tt_tensorization_candidates(7, 12, 4) == [
        ((7, 1), (1, 12)),
        ((7, 1), (4, 3)),
        ((7, 1, 1), (3, 2, 2)),  # four cores skipped: 12 has three prime factors
    ]


def test_constructor_shapes_ranks_and_parameters():
    layer = TTLinear(384, 1536, rank=8)
    assert layer.in_shape == (24, 16) and layer.out_shape == (48, 32) and layer.rank == (8,)
    assert [tuple(c.shape) for c in layer.cores()] == [(1, 48, 24, 8), (8, 32, 16, 1)]
    assert sorted(layer.state_dict()) == ["bias", "core_0", "core_1"]
    three = TTLinear(384, 1536, rank=(20, 10), n_cores=3, bias=False)
    assert three.out_shape == (16, 12, 8) and three.in_shape == (8, 8, 6)
    assert sum(p.numel() for p in three.parameters()) == tt_params((16, 12, 8), (8, 8, 6), (20, 10))
    clipped = TTLinear(16, 16, rank=1000, in_shape=(4, 4), out_shape=(4, 4))
    assert clipped.rank == (16,)
    uniform = TTLinear(384, 1536, rank=0.25, n_cores=3)
    assert len(set(uniform.rank)) == 1
    assert tt_params(uniform.out_shape, uniform.in_shape, uniform.rank) <= 0.25 * 384 * 1536


def test_bad_constructor_arguments_name_the_values():
    with pytest.raises(ValueError, match=r"in_shape=\(4, 5\) has product 20, but it must equal 24"):
        TTLinear(24, 16, 2, in_shape=(4, 5))
    with pytest.raises(ValueError, match=r"out_shape=\(16,\) \(1 modes\) and in_shape=\(4, 6\)"):
        TTLinear(24, 16, 2, in_shape=(4, 6), out_shape=(16,))
    with pytest.raises(ValueError, match=r"n_cores=3 does not match the given shapes' 2 modes"):
        TTLinear(24, 16, 2, in_shape=(4, 6), n_cores=3)
    with pytest.raises(ValueError, match=r"n_cores must be at least 2 .* got 1"):
        TTLinear(24, 16, 2, n_cores=1)
    with pytest.raises(ValueError, match=r"in_features must be a positive integer, got 0"):
        TTLinear(0, 16, 2)
    with pytest.raises(ValueError, match=r"rank\[0\] \(bond 1\) must be in \[1, 16\].*got 17"):
        TTLinear(16, 16, (17,), in_shape=(4, 4), out_shape=(4, 4))
    with pytest.raises(ValueError, match=r"one rank per bond: 2 .* got 1"):
        TTLinear(24, 16, (2,), n_cores=3)
    with pytest.raises(ValueError, match=r"fraction of parameters in \(0, 1\], got 0.0"):
        TTLinear(24, 16, 0.0)
    with pytest.raises(
        ValueError, match=r"expected input of shape \(\*, 24\), got (shape )?\(2, 23\)"
    ):
        TTLinear(24, 16, 2)(torch.randn(2, 23))


def test_reset_parameters_gives_linear_default_variance():
    torch.manual_seed(0)
    for kwargs in ({"rank": 16}, {"rank": (8, 12), "n_cores": 3}):
        samples = torch.cat(
            [TTLinear(256, 192, **kwargs).dense_weight().detach().flatten() for _ in range(8)]
        )
        assert samples.var().item() == pytest.approx(1 / (3 * 256), rel=0.1)
        assert abs(samples.mean().item()) < 0.01
    bias = TTLinear(256, 192, rank=4).bias
    assert bias.abs().max() <= 1 / 16


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "outs,ins,ranks",
    [
        ((4, 3), (2, 5), (3,)),
        ((2, 3, 4), (3, 1, 2), (2, 5)),
        ((40, 1), (1, 30), (7,)),
        ((2, 2, 2, 2), (3, 2, 1, 2), (2, 3, 2)),
        ((1, 1, 5), (3, 2, 1), (2, 2)),
        ((1, 6), (5, 1), (3,)),
    ],
)
@pytest.mark.parametrize("schedule", ["last_core_first", "first_core_first", "weight_first", None])
@pytest.mark.parametrize("bias", [True, False])
def test_every_schedule_matches_f_linear_on_the_einsum_weight(outs, ins, ranks, schedule, bias):
    torch.manual_seed(1)
    layer = TTLinear(math.prod(ins), math.prod(outs), list(ranks), in_shape=ins, out_shape=outs,
                     bias=bias, dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(layer.dense_weight(), _einsum_weight(layer), rtol=1e-12, atol=1e-12)
    x = torch.randn(3, 2, layer.in_features, dtype=torch.float64)
    out = tt_linear(x, layer.cores(), layer.bias, schedule=schedule)
    expected = F.linear(x, _einsum_weight(layer), layer.bias)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@given(
    leading=leading_shapes(),
    outs=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    rank=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_property_over_shapes(leading, outs, rank, seed):
    ins = [max(1, 5 - o) for o in outs]
    torch.manual_seed(seed)
    layer = TTLinear(math.prod(ins), math.prod(outs), rank, in_shape=ins, out_shape=outs)
    x = torch.randn(*leading, layer.in_features)
    out = layer(x)
    assert out.shape == (*leading, layer.out_features)
    expected = F.linear(x, _einsum_weight(layer), layer.bias)
    assert_close_to_reference(out, expected, terms=layer.in_features * max(layer.rank))


@pytest.mark.parametrize("schedule", ["last_core_first", "first_core_first", "weight_first"])
@pytest.mark.parametrize(
    "outs,ins,ranks",
    [((2, 3, 2), (3, 2, 2), (2, 3)), ((5, 1), (1, 4), (2,)), ((1, 5), (4, 1), (2,))],
)
def test_gradcheck_every_schedule(schedule, outs, ins, ranks):
    torch.manual_seed(2)
    layer = TTLinear(math.prod(ins), math.prod(outs), list(ranks), in_shape=ins, out_shape=outs,
                     dtype=torch.float64)  # fmt: skip
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)
    cores = [c.detach().requires_grad_(True) for c in layer.cores()]
    bias = layer.bias.detach().requires_grad_(True)

    def fn(x, bias, *cores):
        return tt_linear(x, cores, bias, schedule=schedule)

    assert torch.autograd.gradcheck(fn, (x, bias, *cores))


def test_forward_cases_cover_both_layouts_of_both_orders():
    shapes = [
        ((4, 3), (2, 5), (3,)),
        ((40, 1), (1, 30), (7,)),
        ((1, 6), (5, 1), (3,)),
    ]
    covered = set()
    for outs, ins, ranks in shapes:
        plan = tt_plan(outs, ins, ranks)
        covered |= {("last_core_first", plan.layout[0]), ("first_core_first", plan.layout[1])}
    orders = ("last_core_first", "first_core_first")
    assert covered == {(o, layout) for o in orders for layout in ("rows", "columns")}


def test_schedule_model_prefers_cheaper_order_and_weight_first_only_when_it_pays():
    low_rank = tt_plan((1536, 1), (1, 384), (153,))
    assert low_rank.excess < 0
    assert {tt_schedule(low_rank, b) for b in (1, 32, 10**6)} == {"last_core_first"}
    balanced = tt_plan((48, 32), (24, 16), (192,))
    assert balanced.excess > 0
    assert tt_schedule(balanced, 1) == balanced.order
    assert tt_schedule(balanced, 4096) == "weight_first"
    assert tt_plan((1, 384), (1536, 1), (153,)).order == "first_core_first"


def test_empty_batch_and_one_dimensional_input():
    layer = TTLinear(24, 16, 3, n_cores=3)
    assert layer(torch.randn(0, 24)).shape == (0, 16)
    x = torch.randn(24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


# --------------------------------------------------------------------------- from_dense


@pytest.mark.parametrize(
    "options", [{}, {"n_cores": 3}, {"in_shape": (2, 3, 2, 2), "out_shape": (1, 2, 5, 2)}]
)
def test_full_rank_from_dense_is_exact(options):
    dense = _linear(20, 24)
    layer = TTLinear.from_dense(dense, 10**6, **options)
    x = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-11, atol=1e-11)


def test_from_dense_matches_tt_svd_at_the_allocated_ranks():
    weight = _tt_weight((4, 6), (4, 5), (6,), seed=2) + 0.05 * torch.randn(
        24, 20, dtype=torch.float64
    )
    dense = _linear(24, 20, weight)
    layer = TTLinear.from_dense(dense, 0.5, in_shape=(4, 5), out_shape=(4, 6))
    budget = int(0.5 * 24 * 20)
    assert tt_params(layer.out_shape, layer.in_shape, layer.rank) <= budget
    direct = tt_svd(dense.weight, (4, 6), (4, 5), layer.rank)
    assert _error(layer, dense) == pytest.approx(direct.error, rel=1e-9)
    report = layer.tensorization_report
    assert len(report.candidates) == 1 and report.budget == budget
    assert report.candidates[0].error == pytest.approx(direct.error, rel=1e-9)


def test_tensorization_search_finds_kronecker_structure():
    # An exact 2-core TT of rank 3 at a 0.25 budget: the balanced tensorization
    # represents it exactly, the low-rank form cannot.
    weight = _tt_weight((8, 6), (6, 5), (3,), seed=3)
    dense = _linear(48, 30, weight)
    layer = TTLinear.from_dense(dense, 0.25)
    report = layer.tensorization_report
    assert report.candidates[0].out_shape == (48, 1)
    assert (layer.out_shape, layer.in_shape) == ((8, 6), (6, 5)) and layer.rank == (3,)
    assert _error(layer, dense) < 1e-8
    assert layer.flops_per_position() < 48 * 30
    assert report.candidates[report.chosen].error == min(c.error for c in report.candidates)
    assert all(c.params <= report.budget for c in report.candidates)


def test_search_skips_tensorizations_slower_than_dense():
    # Balanced trains of a random weight at half the parameters cost more FLOPs per
    # row than the dense layer: the search keeps the low-rank form.
    dense = _linear(48, 36, seed=13)
    layer = TTLinear.from_dense(dense, 0.5)
    assert (layer.out_shape, layer.in_shape) == ((48, 1), (1, 36))
    assert len(layer.tensorization_report.candidates) == 3
    assert layer.flops_per_position() < 48 * 36


def test_search_never_loses_to_svd_linear_at_equal_parameters():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(48, 36, generator=g, dtype=torch.float64) * torch.logspace(
        0, -1, 36, dtype=torch.float64
    )
    dense = _linear(48, 36, weight)
    for fraction in (0.2, 0.5):
        layer = TTLinear.from_dense(dense, fraction)
        svd = SVDLinear.from_dense(dense, fraction)
        assert _error(layer, dense) <= _error(svd, dense) + 1e-10


def test_int_and_tuple_ranks_use_the_default_tensorization():
    dense = _linear(24, 16)
    layer = TTLinear.from_dense(dense, 3)
    assert (layer.out_shape, layer.in_shape) == default_tt_shapes(24, 16)
    three = TTLinear.from_dense(dense, (3, 2), n_cores=3)
    assert three.rank == (3, 2) and len(three.cores()) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_sources_decompose_in_float32(dtype):
    dense32 = _linear(24, 16, dtype=torch.float32)
    reference = TTLinear.from_dense(dense32, 3, n_cores=2)
    dense = _linear(24, 16, dtype=torch.float32).to(dtype)
    layer = TTLinear.from_dense(dense, 3, n_cores=2)
    assert all(c.dtype == dtype for c in layer.cores()) and layer.bias.dtype == dtype
    assert _error(layer, dense.float()) == pytest.approx(_error(reference, dense32), abs=0.02)


def test_meta_from_dense_with_float_rank():
    dense = nn.Linear(384, 1536, device="meta")
    layer = TTLinear.from_dense(dense, 0.25)
    assert all(c.device.type == "meta" for c in layer.cores())
    assert (layer.out_shape, layer.in_shape) == ((1536, 1), (1, 384))
    assert tt_params(layer.out_shape, layer.in_shape, layer.rank) <= 0.25 * 384 * 1536
    shaped = TTLinear.from_dense(dense, 0.25, n_cores=3)
    assert (shaped.out_shape, shaped.in_shape) == default_tt_shapes(1536, 384, 3)


def test_budget_too_small_for_every_tensorization():
    with pytest.raises(ValueError, match=r"below the smallest TT-matrix"):
        TTLinear.from_dense(_linear(16, 24), 0.01, n_cores=3)


# --------------------------------------------------------------------------- policies, calibration


def test_rank_policies_meet_their_targets():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(40, 30, generator=g, dtype=torch.float64) * torch.logspace(
        0, -2, 30, dtype=torch.float64
    )
    dense = _linear(40, 30, weight)
    layer = TTLinear.from_dense(dense, ErrorBound(0.2))
    assert _error(layer, dense) <= 0.2 + 1e-9
    layer = TTLinear.from_dense(dense, Energy(0.99))
    assert _error(layer, dense) <= math.sqrt(0.01) + 1e-9
    layer = TTLinear.from_dense(dense, Budget(params=0.5))
    assert tt_params(layer.out_shape, layer.in_shape, layer.rank) <= 0.5 * 1200
    with pytest.raises(ValueError, match="chooses among tensorizations itself"):
        TTLinear.from_dense(dense, ErrorBound(0.2), n_cores=3)


def _inputs(features, rows=500, seed=6):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64)
    return torch.randn(rows, features, generator=g, dtype=torch.float64) @ (
        mix * torch.logspace(0, -2, features, dtype=torch.float64)
    )


def _output_error(layer, dense, x):
    with torch.no_grad():
        return float((layer(x) - dense(x)).norm() / (dense(x) - dense.bias).norm())


@pytest.mark.parametrize("options", [{}, {"n_cores": 2}, {"n_cores": 3}])
def test_calibration_lowers_the_output_error_on_the_data(options):
    dense = _linear(24, 20, seed=7)
    x = _inputs(20)
    gram = x.T @ x
    plain = TTLinear.from_dense(dense, 0.4, **options)
    calibrated = TTLinear.from_dense(dense, 0.4, calibration=gram, **options)
    assert _output_error(calibrated, dense, x) <= _output_error(plain, dense, x) + 1e-9
    chosen = calibrated.tensorization_report.candidates[calibrated.tensorization_report.chosen]
    assert chosen.output_error == pytest.approx(_output_error(calibrated, dense, x), rel=1e-6)


def test_calibrated_search_is_never_worse_than_calibrated_svd_linear():
    dense = _linear(24, 20, seed=8)
    x = _inputs(20, seed=9)
    for fraction in (0.3, 0.6):
        layer = TTLinear.from_dense(dense, fraction, calibration=x.T @ x)
        svd = SVDLinear.from_dense(dense, fraction, calibration=x.T @ x)
        assert _output_error(layer, dense, x) <= _output_error(svd, dense, x) * (1 + 1e-6)


# --------------------------------------------------------------------------- truncation


def test_truncated_is_tt_rounding_of_the_own_cores():
    dense = _linear(48, 30, seed=10)
    layer = TTLinear.from_dense(dense, 10**6, in_shape=(6, 5), out_shape=(8, 6))
    small = layer.truncated(4)
    assert small.rank == (4,)
    direct = tt_svd(layer.dense_weight().detach(), (8, 6), (6, 5), 4)
    torch.testing.assert_close(
        small.dense_weight(), tt_to_matrix(direct.cores), rtol=1e-8, atol=1e-10
    )
    assert _error(small, dense) == pytest.approx(direct.error, rel=1e-8)
    bigger = small.truncated(10)
    assert bigger.rank == (4,)


def test_float_truncation_fits_the_budget_and_keeps_structure():
    dense = _linear(24, 20, seed=11)
    layer = TTLinear.from_dense(dense, 10**6, n_cores=3)
    small = layer.truncated(0.3)
    assert tt_params(small.out_shape, small.in_shape, small.rank) <= 0.3 * 24 * 20
    assert all(a <= b for a, b in zip(small.rank, layer.rank))
    assert (small.out_shape, small.in_shape) == (layer.out_shape, layer.in_shape)
    x = torch.randn(3, 20, dtype=torch.float64)
    torch.testing.assert_close(small(x), F.linear(x, _einsum_weight(small), small.bias))


def test_factorize_converts_a_model_with_ttlinear():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(4, 32)
    factorize_(model, 0.5, layers={nn.Linear: TTLinear})
    assert all(isinstance(model[i], TTLinear) for i in (0, 2))
    assert model(x).shape == (4, 16)


@pytest.mark.parametrize("batch", [1, 600])
def test_every_schedule_computes_the_dense_product(batch):
    # 600 rows of a 1536-wide layer run the core chains in blocks of rows.
    from factorized_layers.functional.tt import TT_SCHEDULES, _block_rows, tt_linear

    torch.manual_seed(0)
    layer = TTLinear(384, 1536, rank=(16,), in_shape=(16, 24), out_shape=(48, 32),
                     dtype=torch.float64)  # fmt: skip
    assert _block_rows(layer._plan, 8) * 2 <= 600  # blocks of 64 rows (the least)
    x = torch.randn(batch, 384, dtype=torch.float64)
    expected = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
    for schedule in TT_SCHEDULES:
        got = tt_linear(x, layer.cores(), layer.bias, plan=layer._plan, schedule=schedule)
        torch.testing.assert_close(got, expected, msg=schedule)
