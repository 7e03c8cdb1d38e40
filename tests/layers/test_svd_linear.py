"""SVDLinear-specific tests: optimality, initialisation, validation, properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from factorized_layers import SVDLinear
from factorized_layers.contract import contraction_path
from factorized_layers.decompose import svd_tail_error
from factorized_layers.functional import svd_linear_input_first
from factorized_layers.testing import (
    assert_close_to_reference,
    feature_sizes,
    leading_shapes,
    linear_with_spectrum,
)


def _relative_error(layer, dense):
    with torch.no_grad():
        return float((layer.dense_weight() - dense.weight).norm() / dense.weight.norm())


def _decaying_linear(out_features, in_features, decay=0.97, seed=0):
    return linear_with_spectrum(out_features, in_features, decay, seed=seed)


@pytest.mark.parametrize("method", ["full", "randomized", "auto"])
@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (700, 600)])
def test_from_dense_error_is_eckart_young_optimal(method, shape):
    out_features, in_features = shape
    dense = _decaying_linear(out_features, in_features)
    optimum_s = torch.linalg.svdvals(dense.weight)
    for rank in (1, 7, min(shape) // 3):
        layer = SVDLinear.from_dense(dense, rank, method=method)
        optimum = svd_tail_error(optimum_s, rank)
        error = _relative_error(layer, dense)
        if method == "full" or (method == "auto" and min(shape) < 512):
            assert error == pytest.approx(optimum, rel=1e-4)
        else:
            assert optimum * (1 - 1e-6) <= error <= optimum * 1.01


def test_randomized_on_trained_like_flat_spectrum_stays_near_optimal():
    torch.manual_seed(0)
    dense = nn.Linear(1024, 768, dtype=torch.float64)
    optimum = svd_tail_error(torch.linalg.svdvals(dense.weight), 96)
    layer = SVDLinear.from_dense(dense, 96, method="randomized")
    assert optimum <= _relative_error(layer, dense) <= 1.01 * optimum


def test_full_rank_from_dense_is_exact_in_float64():
    dense = _decaying_linear(30, 50)
    layer = SVDLinear.from_dense(dense, 30)
    x = torch.randn(4, 50, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)


def test_float_rank_is_largest_rank_within_parameter_fraction():
    layer = SVDLinear(1536, 384, rank=0.5)
    assert layer.rank * (1536 + 384) <= 0.5 * 1536 * 384 < (layer.rank + 1) * (1536 + 384)


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_is_exact(bias):
    layer = SVDLinear(300, 120, rank=17, bias=bias)
    expected = 17 * (300 + 120) + (120 if bias else 0)
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert sorted(layer.state_dict()) == sorted(
        ["input_factor", "output_factor"] + (["bias"] if bias else [])
    )


def test_reset_parameters_matches_nn_linear_variance():
    torch.manual_seed(0)
    in_features, out_features = 512, 384
    layer = SVDLinear(in_features, out_features, rank=64)
    reference = nn.Linear(in_features, out_features)
    expected = 1.0 / (3 * in_features)
    assert reference.weight.var().item() == pytest.approx(expected, rel=0.05)
    assert layer.dense_weight().var().item() == pytest.approx(expected, rel=0.05)
    assert layer.dense_weight().mean().abs().item() < 0.1 * math.sqrt(expected)
    bound = 1 / math.sqrt(in_features)
    assert layer.bias.abs().max().item() <= bound
    assert layer.bias.var().item() == pytest.approx(bound**2 / 3, rel=0.3)


def test_reset_parameters_reinitialises():
    layer = SVDLinear(20, 10, rank=3)
    before = layer.input_factor.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.input_factor)


@pytest.mark.parametrize(
    "rank, match",
    [
        (0, r"rank must be in \[1, 16\].*got 0"),
        (-3, r"rank must be in \[1, 16\].*got -3"),
        (17, r"rank must be in \[1, 16\].*got 17"),
        (0.0, r"\(0, 1\], got 0.0"),
        (1.5, r"\(0, 1\], got 1.5"),
        (-0.2, r"\(0, 1\], got -0.2"),
        (float("nan"), r"\(0, 1\], got nan"),
    ],
)
def test_bad_rank_raises_value_error_naming_value_and_range(rank, match):
    with pytest.raises(ValueError, match=match):
        SVDLinear(24, 16, rank=rank)
    with pytest.raises(ValueError, match=match):
        SVDLinear.from_dense(nn.Linear(24, 16), rank)


@pytest.mark.parametrize("rank", [True, "4", None, 2 + 1j])
def test_non_numeric_rank_raises_type_error(rank):
    with pytest.raises(TypeError, match="rank must be an int or a float"):
        SVDLinear(24, 16, rank=rank)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise_value_error(bad):
    dense = nn.Linear(8, 6)
    with torch.no_grad():
        dense.weight[2, 3] = bad
    with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\) out of 48"):
        SVDLinear.from_dense(dense, 2)


def test_wrong_input_feature_size_raises_value_error():
    layer = SVDLinear(24, 16, rank=4)
    with pytest.raises(
        ValueError, match=r"expected input of shape \(\*, 24\), got (shape )?\(3, 23\)"
    ):
        layer(torch.randn(3, 23))
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 24\), got (shape )?\(\)"):
        layer(torch.tensor(1.0))


def test_from_dense_rejects_non_linear():
    with pytest.raises(TypeError, match="from_dense expects an nn.Linear.*got Conv2d"):
        SVDLinear.from_dense(nn.Conv2d(3, 4, 3), 2)


def test_from_dense_is_reproducible_and_leaves_global_rng_alone():
    dense = nn.Linear(1200, 1000)
    state = torch.random.get_rng_state()
    a = SVDLinear.from_dense(dense, 50, method="randomized", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    b = SVDLinear.from_dense(dense, 50, method="randomized", seed=3)
    c = SVDLinear.from_dense(dense, 50, method="randomized", seed=4)
    assert torch.equal(a.input_factor, b.input_factor)
    assert not torch.equal(a.input_factor, c.input_factor)


def test_low_precision_source_is_decomposed_in_float32():
    torch.manual_seed(0)
    dense32 = _decaying_linear(64, 48).float()
    for dtype in (torch.float16, torch.bfloat16):
        dense = nn.Linear(48, 64, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(dense32.weight)
        layer = SVDLinear.from_dense(dense, 10)
        assert layer.input_factor.dtype == dtype
        reference = SVDLinear.from_dense(dense.float(), 10).dense_weight()
        assert_close_to_reference(layer.dense_weight(), reference.to(dtype), terms=10)


def test_input_first_plan_agrees_with_opt_einsum():
    for batch, features, rank in [(1, 64, 64), (4096, 64, 64), (7, 64, 33), (3000, 96, 96)]:
        path = contraction_path(
            "bi,ri,or->bo", (batch, features), (rank, features), (features, rank)
        )
        assert svd_linear_input_first(batch, features, features, rank) == (path[0] == (0, 1))


def test_weight_first_plan_output_matches_dense():
    torch.manual_seed(0)
    layer = SVDLinear(32, 32, rank=32, dtype=torch.float64)
    x = torch.randn(4096, 32, dtype=torch.float64)
    assert not svd_linear_input_first(4096, 32, 32, 32)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


def test_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = SVDLinear(64, 48, rank=12)
    compiled = torch.compile(layer, fullgraph=True)
    for batch in (5, 9):
        x = torch.randn(batch, 64)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@given(
    in_features=feature_sizes(),
    out_features=feature_sizes(),
    rank_fraction=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    leading=leading_shapes(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_property_matches_f_linear(
    in_features, out_features, rank_fraction, leading, bias, seed
):
    torch.manual_seed(seed)
    rank = max(1, round(rank_fraction * min(in_features, out_features)))
    dense = nn.Linear(in_features, out_features, bias=bias, dtype=torch.float64)
    layer = SVDLinear.from_dense(dense, rank)
    assert layer.rank == rank
    x = torch.randn(*leading, in_features, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (*leading, out_features)
    torch.testing.assert_close(out, F.linear(x, layer.dense_weight(), layer.bias))
    optimum = svd_tail_error(torch.linalg.svdvals(dense.weight), rank)
    assert _relative_error(layer, dense) == pytest.approx(optimum, rel=1e-4, abs=1e-10)
