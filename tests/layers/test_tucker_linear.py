"""TuckerLinear, HOSVD/HOOI, Tucker rank allocation and tensorization (issue 3)."""

from __future__ import annotations

import io
import math
import string

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from factorized_layers.decompose import (
    hooi,
    hosvd,
    hosvd_energy,
    svd_tail_error,
    tucker_to_tensor,
)
from factorized_layers.functional import tucker as functional
from factorized_layers.functional import (
    tucker_linear,
    tucker_linear_input_first,
    tucker_plan,
    tucker_schedule_costs,
)
from factorized_layers.layers.tucker import TuckerLinear
from factorized_layers.ranks import allocate_tucker_ranks, resolve_tucker_ranks, tucker_params
from factorized_layers.tensorize import prime_factors, tensorize, tensorize_candidates
from factorized_layers.testing import leading_shapes

# --------------------------------------------------------------------------- helpers


def _einsum_weight(layer: TuckerLinear) -> torch.Tensor:
    """Independent oracle: the dense weight by one torch.einsum over core and factors."""
    letters = iter(string.ascii_letters)
    factors = layer.out_factors() + layer.in_factors()
    core_idx, out_idx, operands, terms = [], [], [layer.core], []
    for factor in factors:
        if factor is None:
            idx = next(letters)
            core_idx.append(idx)
            out_idx.append(idx)
        else:
            rank_idx, mode_idx = next(letters), next(letters)
            core_idx.append(rank_idx)
            out_idx.append(mode_idx)
            operands.append(factor)
            terms.append(mode_idx + rank_idx)
    equation = ",".join(["".join(core_idx)] + terms) + "->" + "".join(out_idx)
    weight = torch.einsum(equation, *operands)
    return weight.reshape(layer.out_features, layer.in_features)


def _linear(out_features, in_features, weight=None, bias=True, dtype=torch.float64):
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    if weight is not None:
        with torch.no_grad():
            layer.weight.copy_(weight)
    return layer


def _relative_error(layer, dense):
    with torch.no_grad():
        return float((layer.dense_weight() - dense.weight).norm() / dense.weight.norm())


def _tucker_tensor(shape, ranks, decays, seed=0):
    """Tucker tensor whose core energy decays by ``decays[k] ** i`` along mode k."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks, generator=g, dtype=torch.float64)
    for k, decay in enumerate(decays):
        scale = decay ** torch.arange(ranks[k], dtype=torch.float64)
        core = core * scale.reshape([-1 if j == k else 1 for j in range(len(ranks))])
    factors = [
        torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
        for n, r in zip(shape, ranks)
    ]
    return tucker_to_tensor(core, factors)


# --------------------------------------------------------------------------- tensorize


def test_tensorize_rule_and_candidates():
    assert tensorize(384) == (8, 8, 6)
    assert tensorize(1536) == (16, 12, 8)
    assert tensorize(97) == (97,) and tensorize(1) == (1,)
    assert tensorize(2 * 97) == (97, 2)
    assert tensorize(4096, 2) == (64, 64) and tensorize(12, 1) == (12,)
    for n in range(1, 400):
        modes = tensorize(n)
        assert math.prod(modes) == n
        assert len(modes) == min(3, max(1, len(prime_factors(n))))
        assert list(modes) == sorted(modes, reverse=True)
    assert tensorize_candidates(1536, 384) == [
        ((1536,), (384,)),
        ((48, 32), (24, 16)),
        ((16, 12, 8), (8, 8, 6)),
    ]
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        tensorize(0)


def test_constructor_default_and_explicit_shapes():
    layer = TuckerLinear(384, 1536, rank=4)
    assert layer.in_shape == (8, 8, 6) and layer.out_shape == (16, 12, 8)
    assert layer.rank == (4,) * 6
    plain = TuckerLinear(384, 1536, rank=5, in_shape=(384,), out_shape=(1536,))
    assert plain.rank == (5, 5)
    assert plain.out_factor_0.shape == (1536, 5) and plain.in_factor_0.shape == (384, 5)
    assert plain.core.shape == (5, 5)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "out_shape, in_shape",
    [(None, None), ((24,), (20,)), ((4, 6), (5, 2, 2)), ((2, 3, 4), (20,))],
)
def test_full_ranks_reproduce_source_exactly(out_shape, in_shape):
    torch.manual_seed(0)
    dense = _linear(24, 20)
    layer = TuckerLinear.from_dense(dense, 1000, in_shape=in_shape, out_shape=out_shape)
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)
    assert layer.tensorization_report.candidates[0].error < 1e-12


def test_full_rank_float32_within_dtype_tolerance(device):
    torch.manual_seed(0)
    dense = nn.Linear(48, 32, device=device)
    layer = TuckerLinear.from_dense(dense, 64, in_shape=(4, 12), out_shape=(8, 4))
    assert layer.core.device.type == device and layer.core.dtype == torch.float32
    x = torch.randn(7, 48, device=device)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_partial_full_rank_modes_are_folded_not_stored():
    dense = _linear(24, 20)
    layer = TuckerLinear.from_dense(dense, (4, 6, 3, 4), in_shape=(5, 4), out_shape=(4, 6))
    assert layer.out_factor_0 is None and layer.out_factor_1 is None
    assert layer.in_factor_1 is None and layer.in_factor_0.shape == (5, 3)
    assert sorted(layer.state_dict()) == ["bias", "core", "in_factor_0"]
    x = torch.randn(3, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, _einsum_weight(layer), layer.bias))


@pytest.mark.parametrize(
    "out_shape, in_shape, rank",
    [
        ((16, 12, 8), (8, 8, 6), (5, 4, 3, 4, 3, 2)),
        ((16, 12, 8), (8, 8, 6), (10, 9, 8, 8, 8, 6)),
        ((8, 8, 6), (8, 8, 6), (3, 8, 6, 8, 8, 6)),
        ((48,), (40,), (48, 7)),
        ((48,), (40,), (6, 40)),
        ((48,), (40,), (6, 6)),
        ((6, 8), (40,), (3, 2, 5)),
        ((48,), (5, 8), (4, 5, 2)),
    ],
)
def test_forward_equals_f_linear_with_dense_weight_for_random_factors(out_shape, in_shape, rank):
    torch.manual_seed(0)
    out_features, in_features = math.prod(out_shape), math.prod(in_shape)
    layer = TuckerLinear(
        in_features, out_features, rank, in_shape=in_shape, out_shape=out_shape, dtype=torch.float64
    )
    oracle = _einsum_weight(layer)
    torch.testing.assert_close(layer.dense_weight(), oracle)
    for batch in (1, 9, 2048):
        x = torch.randn(batch, in_features, dtype=torch.float64)
        torch.testing.assert_close(layer(x), F.linear(x, oracle, layer.bias))
    torch.testing.assert_close(layer.to_dense()(x), F.linear(x, oracle, layer.bias))


def test_weight_first_schedule_is_taken_and_exact():
    torch.manual_seed(0)
    layer = TuckerLinear(24, 24, (23, 23), in_shape=(24,), out_shape=(24,), dtype=torch.float64)
    assert not tucker_linear_input_first(layer._plan, 4096)
    assert tucker_linear_input_first(layer._plan, 1)
    x = torch.randn(4096, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, _einsum_weight(layer), layer.bias))
    multi = TuckerLinear(48, 48, (4, 3, 3, 4, 6, 2), in_shape=(4, 6, 2), out_shape=(4, 3, 4))
    multi.double()
    assert not tucker_linear_input_first(multi._plan, 8192)
    x = torch.randn(8192, 48, dtype=torch.float64)
    torch.testing.assert_close(multi(x), F.linear(x, _einsum_weight(multi), multi.bias))


def test_schedule_choice_follows_opt_einsum_when_it_builds_the_weight():
    # Compressing ranks: the chain is cheaper in FLOPs and in the cost model.
    plan = tucker_plan((16, 12, 8), (8, 8, 6), (5, 4, 3), (4, 3, 2))
    for batch in (1, 64, 4096):
        first, weight = tucker_schedule_costs(plan, batch)
        assert first < weight and tucker_linear_input_first(plan, batch)
    # Near-full ranks at a large batch: build the weight once.
    plan = tucker_plan((24,), (24,), (24,), (23,))
    assert not tucker_linear_input_first(plan, 4096)


# --------------------------------------------------------------------------- HOSVD / HOOI


@pytest.mark.parametrize("rank", [(11, 11), (150, 11), 0.3])
def test_two_mode_from_dense_equals_truncated_svd_error(rank):
    w = torch.randn(150, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = w * (0.9 ** torch.arange(40, dtype=torch.float64))  # decaying, non-trivial spectrum
    dense = _linear(150, 40, w)
    layer = TuckerLinear.from_dense(dense, rank, in_shape=(40,), out_shape=(150,))
    effective = min(layer.rank)
    optimum = svd_tail_error(torch.linalg.svdvals(dense.weight), effective)
    assert _relative_error(layer, dense) == pytest.approx(optimum, rel=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_decompositions_reject_non_finite(bad):
    t = torch.randn(4, 3, 2)
    t[1, 2, 0] = bad
    for fn in (hosvd, hooi):
        with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\) out of 24"):
            fn(t, (2, 2, 2))
    dense = nn.Linear(6, 4)
    with torch.no_grad():
        dense.weight[0, 0] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        TuckerLinear.from_dense(dense, 0.5)


# --------------------------------------------------------------------------- ranks / budget


def test_rank_resolution_int_tuple_float():
    assert resolve_tucker_ranks(10, (16, 12, 8)) == (10, 10, 8)
    assert resolve_tucker_ranks(1000, (1536, 384)) == (384, 384)
    assert resolve_tucker_ranks((3, 8, 6), (8, 8, 6)) == (3, 8, 6)
    for fraction in (0.2, 0.5, 1.0):
        for shape in [(16, 12, 8, 8, 8, 6), (1536, 384), (24, 20)]:
            ranks = resolve_tucker_ranks(fraction, shape)
            assert tucker_params(shape, ranks) <= fraction * math.prod(shape)
    assert TuckerLinear(384, 1536, 0.5).rank == resolve_tucker_ranks(0.5, (16, 12, 8, 8, 8, 6))


def _budget_case():
    # Mode 0 carries a steep spectrum, mode 1 a flat one: a uniform split wastes
    # parameters on mode 0 and starves mode 1.
    shape = (24, 24)
    t = _tucker_tensor((24, 6, 4, 24), (24, 6, 4, 24), (0.3, 0.95, 0.95, 0.97))
    return t.reshape(24, 24).mT.reshape(24, 24), shape


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_float_budget_is_respected_and_beats_uniform_split(fraction):
    out_shape, in_shape = (6, 4), (8, 3)
    t = _tucker_tensor(out_shape + in_shape, (6, 4, 8, 3), (0.2, 0.95, 0.97, 0.4), seed=2)
    dense = _linear(24, 24, t.reshape(24, 24))
    layer = TuckerLinear.from_dense(dense, fraction, in_shape=in_shape, out_shape=out_shape)
    budget = fraction * 24 * 24
    weight_params = sum(p.numel() for n, p in layer.named_parameters() if n != "bias")
    assert weight_params == tucker_params(out_shape + in_shape, layer.rank) <= budget
    uniform = resolve_tucker_ranks(fraction, out_shape + in_shape)
    assert tucker_params(out_shape + in_shape, uniform) <= budget
    uniform_error = hooi(t, uniform).error
    assert _relative_error(layer, dense) < uniform_error - 1e-3


def test_float_budget_never_exceeded_across_candidates():
    torch.manual_seed(0)
    dense = _linear(48, 40)
    for fraction in (0.1, 0.3, 0.6, 0.9):
        layer = TuckerLinear.from_dense(dense, fraction)
        report = layer.tensorization_report
        budget = math.floor(fraction * 48 * 40)
        assert report.budget == budget
        assert all(c.params <= budget for c in report.candidates)
        assert sum(p.numel() for n, p in layer.named_parameters() if n != "bias") <= budget


def test_allocation_uses_exact_truncated_hosvd_errors():
    t = _tucker_tensor((6, 5, 4), (6, 5, 4), (0.5, 0.9, 0.7), seed=4)
    _, energy = hosvd_energy(t)
    ranks = allocate_tucker_ranks(energy, (6, 5, 4), 60)
    assert tucker_params((6, 5, 4), ranks) <= 60
    kept = float(energy[tuple(slice(0, min(r, m)) for r, m in zip(ranks, energy.shape))].sum())
    predicted = math.sqrt(max(0.0, 1 - kept / float(energy.sum())))
    assert hosvd(t, ranks).error == pytest.approx(predicted, rel=1e-6, abs=1e-9)


def test_from_dense_chooses_lowest_error_candidate_and_reports_it():
    # A low-rank matrix: the two-mode form (truncated SVD) is the best at this budget.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, 40, generator=g, dtype=torch.float64
    )
    dense = _linear(48, 40, w + 1e-3 * torch.randn(48, 40, generator=g, dtype=torch.float64))
    layer = TuckerLinear.from_dense(dense, 0.25)
    report = layer.tensorization_report
    shapes = [(c.out_shape, c.in_shape) for c in report.candidates]
    assert shapes == tensorize_candidates(48, 40)
    errors = [c.error for c in report.candidates]
    assert report.chosen == errors.index(min(errors))
    chosen = report.candidates[report.chosen]
    assert (layer.out_shape, layer.in_shape, layer.rank) == (
        chosen.out_shape,
        chosen.in_shape,
        chosen.ranks,
    )
    assert (layer.out_shape, layer.in_shape) == ((48,), (40,))
    assert _relative_error(layer, dense) == pytest.approx(chosen.error, rel=1e-6)
    text = str(report)
    assert "chosen from 3 candidate(s)" in text and "* out_shape=(48,) in_shape=(40,)" in text


# --------------------------------------------------------------------------- module recipe


def test_reset_parameters_matches_nn_linear_variance():
    torch.manual_seed(0)
    expected = 1.0 / (3 * 512)
    for shapes, rank in [(None, (6, 6, 5, 6, 6, 6)), (((384,), (512,)), (64, 64))]:
        kwargs = {} if shapes is None else {"out_shape": shapes[0], "in_shape": shapes[1]}
        variances = []
        for _ in range(4):
            layer = TuckerLinear(512, 384, rank, **kwargs)
            variances.append(layer.dense_weight().var().item())
        assert sum(variances) / 4 == pytest.approx(expected, rel=0.15)
    bound = 1 / math.sqrt(512)
    assert layer.bias.abs().max().item() <= bound


def test_state_dict_keys_parameter_count_and_weights_only_round_trip(tmp_path):
    torch.manual_seed(0)
    layer = TuckerLinear(384, 1536, (10, 9, 8, 8, 8, 6))
    assert sorted(layer.state_dict()) == ["bias", "core", "out_factor_0", "out_factor_1"]
    total = sum(p.numel() for p in layer.parameters())
    assert total == tucker_params((16, 12, 8, 8, 8, 6), layer.rank) + 1536
    path = tmp_path / "tucker.pt"
    torch.save(layer.state_dict(), path)
    fresh = TuckerLinear(384, 1536, layer.rank, in_shape=layer.in_shape, out_shape=layer.out_shape)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(3, 384)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert repr(torch.load(buffer, weights_only=False)) == repr(layer)


def test_extra_repr_and_from_dense_keeps_bias_and_mode():
    dense = nn.Linear(20, 24, bias=False)
    for training in (True, False):
        dense.train(training)
        layer = TuckerLinear.from_dense(dense, 0.5)
        assert layer.training is training and layer.bias is None
        assert layer.to_dense().training is training and layer.to_dense().bias is None
    dense = nn.Linear(20, 24)
    layer = TuckerLinear.from_dense(dense, 3, in_shape=(5, 4), out_shape=(6, 4))
    torch.testing.assert_close(layer.bias, dense.bias, rtol=0, atol=0)
    assert layer.bias.data_ptr() != dense.bias.data_ptr()
    assert repr(layer) == (
        "TuckerLinear(in_features=20, out_features=24, rank=(3, 3, 3, 3), "
        "in_shape=(5, 4), out_shape=(6, 4), bias=True)"
    )


def test_low_precision_source_is_decomposed_in_float32():
    torch.manual_seed(0)
    dense32 = nn.Linear(24, 16)
    for dtype in (torch.float16, torch.bfloat16):
        dense = nn.Linear(24, 16, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(dense32.weight)
        layer = TuckerLinear.from_dense(dense, 3, in_shape=(6, 4), out_shape=(4, 4))
        assert layer.core.dtype == dtype
        reference = TuckerLinear.from_dense(dense.float(), 3, in_shape=(6, 4), out_shape=(4, 4))
        torch.testing.assert_close(
            layer.dense_weight().float(), reference.dense_weight(), rtol=3e-2, atol=3e-2
        )


def test_meta_device_constructor_from_dense_and_forward():
    with torch.device("meta"):
        layer = TuckerLinear(384, 1536, 0.5)
        dense = nn.Linear(384, 1536)
    assert layer.core.device.type == "meta"
    converted = TuckerLinear.from_dense(dense, 0.5)
    assert all(p.device.type == "meta" for p in converted.parameters())
    out = converted(torch.empty(2, 7, 384, device="meta"))
    assert out.shape == (2, 7, 1536) and out.device.type == "meta"
    assert TuckerLinear.from_dense(dense, (4, 4, 4, 4, 4, 4)).core.device.type == "meta"


@pytest.mark.parametrize(
    "shapes, rank",
    [(((4, 3), (2, 3)), (3, 2, 2, 3)), (((12,), (6,)), (3, 6)), (((2, 2, 3), (6,)), (2, 2, 1, 2))],
)
def test_gradcheck_float64(shapes, rank):
    torch.manual_seed(0)
    layer = TuckerLinear(6, 12, rank, out_shape=shapes[0], in_shape=shapes[1], dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))


def test_gradcheck_float64_weight_first_path():
    torch.manual_seed(0)
    layer = TuckerLinear(6, 6, (5, 5), in_shape=(6,), out_shape=(6,), dtype=torch.float64)
    batch = next(b for b in (64, 512, 4096, 32768) if not tucker_linear_input_first(layer._plan, b))
    x = torch.randn(batch, 6, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]

    def fn(*params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,)).sum(0)

    assert torch.autograd.gradcheck(fn, tuple(layer.parameters()))


@pytest.mark.parametrize("mode_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 4096), (4096, 6), (100, 100), (200, 300), (3, 5)])
def test_rotation_equals_transposing_copy_exactly(shape, dtype, mode_first):
    t = torch.randn(shape).to(dtype)
    rotated = functional._rotated(t, mode_first)
    assert rotated.is_contiguous() and rotated.dtype == dtype
    assert torch.equal(rotated, t.mT.contiguous())


@pytest.mark.parametrize(
    "out_shape, in_shape, rank",
    [((8, 8, 6), (8, 384), (3, 3, 3, 4, 384)), ((4, 4, 4, 6), (96,), (2, 4, 2, 6, 8))],
)
def test_inf_in_one_row_leaves_the_other_rows_finite(out_shape, in_shape, rank):
    torch.manual_seed(0)
    in_features = math.prod(in_shape)
    out_features = math.prod(out_shape)
    layer = TuckerLinear(in_features, out_features, rank, out_shape=out_shape, in_shape=in_shape)
    for batch in (16, 256):
        x = torch.randn(batch, in_features)
        x[0, 5] = float("inf")
        y = layer(x)
        assert torch.isfinite(y[1:]).all()
        torch.testing.assert_close(y[1:], F.linear(x[1:], layer.dense_weight(), layer.bias))


def test_gradcheck_float64_gemm_rotation_and_few_rows_paths():
    torch.manual_seed(0)
    # Output mode 6 is folded: the chain rotates it, by GEMM once it is large enough.
    layer = TuckerLinear(
        384, 384, (4, 24, 8), out_shape=(16, 24), in_shape=(384,), dtype=torch.float64
    )
    plan = layer._plan
    names = [n for n, _ in layer.named_parameters()]
    few = functional._IN_PLACE_MAX_PRODUCTS // plan.small_products_per_row
    many = 2048
    assert plan.always_input_first
    assert many * plan.small_products_per_row > functional._IN_PLACE_MAX_PRODUCTS
    assert many * plan.rows >= functional._GEMM_ROTATION_MIN_SIZE
    for batch in (1, few, many):
        x = torch.randn(batch, 384, dtype=torch.float64)
        torch.testing.assert_close(layer(x), F.linear(x, _einsum_weight(layer), layer.bias))

        def fn(*params, x=x):
            return torch.func.functional_call(layer, dict(zip(names, params)), (x,)).sum(0)

        assert torch.autograd.gradcheck(fn, tuple(layer.parameters()), fast_mode=True)


@pytest.mark.parametrize(
    "out_shape, in_shape, rank, bias",
    [
        ((4, 6), (3, 8), (4, 3, 2, 5), True),  # first output mode folded: bias added last
        ((4, 6), (3, 8), (2, 6, 3, 5), True),  # first output mode factored: bias in its GEMM
        ((4, 6), (3, 8), (2, 3, 2, 8), False),
        ((16, 24), (8, 48), (16, 8, 8, 12), True),  # no batched GEMM at any batch size
    ],
)
def test_modes_in_place_path_matches_oracle(out_shape, in_shape, rank, bias):
    torch.manual_seed(0)
    in_features, out_features = math.prod(in_shape), math.prod(out_shape)
    layer = TuckerLinear(in_features, out_features, rank, out_shape=out_shape,
                         in_shape=in_shape, bias=bias, dtype=torch.float64)  # fmt: skip
    oracle = _einsum_weight(layer)
    plan = layer._plan
    batches = [0, 1, 2]
    if plan.small_products_per_row == 0:
        batches.append(3000)
    for batch in batches:
        assert batch * plan.small_products_per_row <= functional._IN_PLACE_MAX_PRODUCTS
        x = torch.randn(batch, in_features, dtype=torch.float64)
        torch.testing.assert_close(layer(x), F.linear(x, oracle, layer.bias))
    x = torch.randn(in_features, dtype=torch.float64)  # unbatched
    torch.testing.assert_close(layer(x), F.linear(x, oracle, layer.bias))


def test_compile_fullgraph_symbolic_batch_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    for layer in (
        TuckerLinear(48, 24, (3, 2, 4, 3, 2), out_shape=(6, 4), in_shape=(4, 6, 2)),
        TuckerLinear(48, 24, (24, 5), out_shape=(24,), in_shape=(48,)),
        TuckerLinear(48, 24, (6, 4, 48), out_shape=(6, 4), in_shape=(48,)),
    ):
        compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=True)
        # Few rows keep every mode in place; 300 rows take the rotation chain.
        for batch in (3, 5, 11, 300):
            x = torch.randn(batch, 48)
            torch.testing.assert_close(compiled(x), layer(x))
        x = torch.randn(2, 3, 48)
        torch.testing.assert_close(compiled(x), layer(x))


def test_compile_fullgraph_of_the_stateless_kernel():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = TuckerLinear(48, 24, (3, 4, 4, 3, 2), out_shape=(6, 4), in_shape=(4, 6, 2))
    core, outs, ins = layer.core, layer.out_factors(), layer.in_factors()

    def fn(x):
        return tucker_linear(x, core, outs, ins, layer.bias)

    compiled = torch.compile(fn, fullgraph=True, backend="eager", dynamic=True)
    for batch in (0, 4, 7):
        x = torch.randn(batch, 48)
        torch.testing.assert_close(compiled(x), layer(x))


def test_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = TuckerLinear(48, 24, (3, 2, 4, 3, 2), out_shape=(6, 4), in_shape=(4, 6, 2))
    compiled = torch.compile(layer, fullgraph=True)
    for batch in (5, 9):
        x = torch.randn(batch, 48)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_training_step_updates_factors_and_stays_consistent():
    torch.manual_seed(0)
    layer = TuckerLinear(48, 24, (3, 2, 4, 3, 2), out_shape=(6, 4), in_shape=(4, 6, 2))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(16, 48)
    before = layer(x).detach()
    layer(x).square().mean().backward()
    optimizer.step()
    after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, F.linear(x, _einsum_weight(layer), layer.bias))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_shape": (5, 5)}, r"in_shape=\(5, 5\) has product 25, but it must equal 24"),
        ({"out_shape": (3, 3)}, r"out_shape=\(3, 3\) has product 9, but it must equal 16"),
        ({"in_shape": (4, 0, 6)}, r"in_shape must be a non-empty sequence of positive integers"),
        ({"in_shape": ()}, r"in_shape must be a non-empty sequence of positive integers"),
        ({"rank": (2, 2, 2)}, r"one rank per mode: 5 for shape \(4, 2, 2, 4, 6\), got 3"),
        ({"rank": (5, 2, 2, 2, 2)}, r"rank\[0\] must be in \[1, 4\] \(mode size 4\), got 5"),
        ({"rank": (3, 1, 1, 1, 1)}, r"rank\[0\]=3 is larger than the core allows.*\[1, 1\]"),
        ({"rank": 0}, r"an int rank must be >= 1.*got 0"),
        ({"rank": 1.5}, r"\(0, 1\], got 1.5"),
        ({"rank": float("nan")}, r"\(0, 1\], got nan"),
        ({"rank": 0.001}, r"allows 0 parameters.*valid fractions are in \["),
    ],
)
def test_bad_constructor_input_raises_value_error(kwargs, match):
    args = {"rank": 2, "in_shape": (4, 6), "out_shape": (4, 2, 2)}
    args.update(kwargs)
    rank = args.pop("rank")
    with pytest.raises(ValueError, match=match):
        TuckerLinear(24, 16, rank, **args)


def test_bad_from_dense_and_forward_input():
    dense = nn.Linear(24, 16)
    with pytest.raises(ValueError, match=r"in_shape=\(5, 5\) has product 25"):
        TuckerLinear.from_dense(dense, 0.5, in_shape=(5, 5))
    with pytest.raises(ValueError, match=r"\(0, 1\], got 0.0"):
        TuckerLinear.from_dense(dense, 0.0)
    with pytest.raises(ValueError, match="valid fractions are in"):
        TuckerLinear.from_dense(dense, 0.01)
    with pytest.raises(TypeError, match="from_dense expects an nn.Linear.*got Conv2d"):
        TuckerLinear.from_dense(nn.Conv2d(3, 4, 3), 2)
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        TuckerLinear(0, 16, 2)
    with pytest.raises(TypeError, match="rank must be an int, a float or a tuple"):
        TuckerLinear(24, 16, "2")
    layer = TuckerLinear(24, 16, 2)
    with pytest.raises(
        ValueError, match=r"expected input of shape \(\*, 24\), got (shape )?\(3, 23\)"
    ):
        layer(torch.randn(3, 23))
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 24\), got (shape )?\(\)"):
        layer(torch.tensor(1.0))


# --------------------------------------------------------------------------- properties


@st.composite
def _layouts(draw):
    def side(max_modes):
        modes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=max_modes))
        ranks = [draw(st.integers(1, n)) for n in modes]
        return tuple(modes), ranks

    out_shape, out_ranks = side(3)
    in_shape, in_ranks = side(3)
    ranks = list(out_ranks + in_ranks)
    shape = out_shape + in_shape
    # Make the ranks usable: a factored rank at most the product of the others.
    for _ in range(len(ranks)):
        for k in range(len(ranks)):
            cap = math.prod(ranks[:k] + ranks[k + 1 :])
            if cap < ranks[k] < shape[k]:
                ranks[k] = cap
    return out_shape, in_shape, tuple(ranks)


@given(
    layout=_layouts(),
    leading=leading_shapes(max_dims=2, max_side=4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_property_matches_einsum_oracle(layout, leading, bias, seed):
    out_shape, in_shape, rank = layout
    torch.manual_seed(seed)
    out_features, in_features = math.prod(out_shape), math.prod(in_shape)
    layer = TuckerLinear(
        in_features,
        out_features,
        rank,
        in_shape=in_shape,
        out_shape=out_shape,
        bias=bias,
        dtype=torch.float64,
    )
    x = torch.randn(*leading, in_features, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (*leading, out_features)
    oracle = _einsum_weight(layer)
    torch.testing.assert_close(out, F.linear(x, oracle, layer.bias))
    torch.testing.assert_close(
        tucker_linear(x, layer.core, layer.out_factors(), layer.in_factors(), layer.bias), out
    )


@given(
    layout=_layouts(),
    fraction=st.floats(min_value=0.3, max_value=1.0),
    seed=st.integers(0, 2**16),
)
def test_from_dense_property_budget_and_hooi_not_worse_than_hosvd(layout, fraction, seed):
    out_shape, in_shape, _ = layout
    shape = out_shape + in_shape
    out_features, in_features = math.prod(out_shape), math.prod(in_shape)
    budget = math.floor(fraction * out_features * in_features + 1e-9)
    if tucker_params(shape, (1,) * len(shape)) > budget:
        return
    torch.manual_seed(seed)
    dense = _linear(out_features, in_features)
    layer = TuckerLinear.from_dense(dense, fraction, in_shape=in_shape, out_shape=out_shape)
    assert tucker_params(shape, layer.rank) <= budget
    error = _relative_error(layer, dense)
    assert error <= hosvd(dense.weight.reshape(shape), layer.rank).error + 1e-9


@pytest.mark.parametrize("batch", [1, 37, 600])
def test_every_schedule_computes_the_dense_product(batch):
    # 600 rows of a 1536-wide layer run the rotation chain in blocks of 128 rows.
    from factorized_layers.functional.tucker import (
        TUCKER_SCHEDULES,
        tucker_dense_weight,
        tucker_linear_scheduled,
    )

    torch.manual_seed(0)
    layer = TuckerLinear(384, 1536, rank=(12, 9, 7, 8, 8, 6), in_shape=(8, 8, 6),
                         out_shape=(16, 12, 8), dtype=torch.float64)  # fmt: skip
    x = torch.randn(batch, 384, dtype=torch.float64)
    outs, ins = layer.out_factors(), layer.in_factors()
    expected = F.linear(x, tucker_dense_weight(layer.core, outs, ins), layer.bias)
    for schedule in set(TUCKER_SCHEDULES) - {"chain"}:
        got = tucker_linear_scheduled(schedule, x, layer.core, outs, ins, layer.bias,
                                      plan=layer._plan)  # fmt: skip
        torch.testing.assert_close(got, expected, msg=schedule)
    with pytest.raises(ValueError, match="does not apply"):
        tucker_linear_scheduled("chain", x, layer.core, outs, ins, plan=layer._plan)
    with pytest.raises(ValueError, match="schedule must be one of"):
        tucker_linear_scheduled("fastest", x, layer.core, outs, ins, plan=layer._plan)
