"""HOSVD, HOOI, mode Grams and whitened Tucker: optimality, precision, validation."""

from __future__ import annotations

import math

import pytest
import torch

from factorized_layers.decompose import (
    hooi,
    hosvd,
    mode_grams,
    relative_output_error,
    svd_tail_error,
    tucker_to_tensor,
    whiten_input_modes,
    whitened_tucker,
)

# --------------------------------------------------------------------------- HOSVD / HOOI


@pytest.mark.parametrize(
    "shape, ranks",
    [
        ((8, 7, 6), (3, 3, 3)),
        ((6, 5, 4, 3), (2, 3, 2, 2)),
        ((16, 12), (5, 5)),
        ((9, 8, 7), (8, 2, 7)),
    ],
)
def test_hooi_error_never_above_hosvd(shape, ranks):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first, best = hosvd(t, ranks), hooi(t, ranks)
    assert best.error <= first.error + 1e-12
    full = tucker_to_tensor(best.core, best.factors)
    assert float((full - t).norm() / t.norm()) == pytest.approx(best.error, rel=1e-9)
    for f, r in zip(best.factors, ranks):
        torch.testing.assert_close(f.T @ f, torch.eye(r, dtype=t.dtype), atol=1e-10, rtol=0)


def test_hooi_strictly_improves_on_hosvd_for_a_generic_tensor():
    t = torch.randn(8, 7, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert hooi(t, (3, 3, 3)).error < hosvd(t, (3, 3, 3)).error - 1e-6


def test_two_mode_hooi_equals_truncated_svd_optimum():
    w = torch.randn(60, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    optimum = svd_tail_error(torch.linalg.svdvals(w), 9)
    assert hooi(w, (9, 9)).error == pytest.approx(optimum, rel=1e-4)
    assert hooi(w, (60, 9)).error == pytest.approx(optimum, rel=1e-4)


def test_error_not_above_tensorly_tucker():
    tensorly = pytest.importorskip(
        "tensorly", reason="tensorly not installed (bench extra: pip install tensorly)"
    )
    from tensorly.decomposition import tucker

    tensorly.set_backend("pytorch")
    try:
        for seed, shape, ranks in [(0, (8, 7, 6, 5), (3, 4, 2, 3)), (1, (16, 12, 8), (5, 4, 3))]:
            t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            t = t.double()
            core, factors = tucker(t, rank=list(ranks), init="svd", n_iter_max=100, tol=1e-8)
            theirs = float((tucker_to_tensor(core, factors) - t).norm() / t.norm())
            assert hooi(t, ranks).error <= theirs * (1 + 1e-3)
    finally:
        tensorly.set_backend("numpy")


def test_decompositions_preserve_device_and_cast_back(device):
    t = torch.randn(6, 5, 4, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        core, factors, error, _ = hooi(t.to(dtype), (2, 3, 2))
        assert core.dtype == dtype and core.device.type == device
        assert all(f.dtype == dtype and f.device.type == device for f in factors)
        assert 0 < error < 1


def test_decompositions_on_meta_return_meta_shapes():
    t = torch.empty(6, 5, 4, device="meta")
    for fn in (hosvd, hooi):
        core, factors, error, _ = fn(t, (2, 3, 4))
        assert core.device.type == "meta" and core.shape == (2, 3, 4)
        assert [f.shape for f in factors] == [(6, 2), (5, 3), (4, 4)]
        assert math.isnan(error)


# --------------------------------------------------------------------------- calibration


def _correlated_gram(features, seed=0):
    """Gram of inputs with a decaying, non-Kronecker covariance."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g, dtype=torch.float64)
    mixing = mixing * torch.logspace(0, -2, features, dtype=torch.float64)
    x = torch.randn(3 * features, features, generator=g, dtype=torch.float64) @ mixing.T
    return x.T @ x


def test_mode_grams_are_the_grams_of_the_unfolded_inputs():
    x = torch.randn(30, 4 * 3 * 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tensors = x.reshape(30, 4, 3, 2)
    grams = mode_grams(x.T @ x, (4, 3, 2))
    for k, gram in enumerate(grams):
        unfolded = tensors.movedim(k + 1, 1).reshape(30, tensors.shape[k + 1], -1)
        torch.testing.assert_close(gram, torch.einsum("tar,tbr->ab", unfolded, unfolded))
    with pytest.raises(ValueError, match=r"gram must be the \(24, 24\)"):
        mode_grams(torch.eye(23), (4, 3, 2))


@pytest.mark.parametrize(
    "shape, in_modes, ranks",
    [
        ((6, 4, 3, 4), 2, (4, 3, 2, 3)),
        ((12, 4, 3, 2), 3, (5, 2, 3, 2)),
        ((10, 24), 1, (10, 5)),
        ((4, 5, 6, 4), 2, (4, 5, 3, 2)),
        # Output modes truncated only: here the mode-whitened factors lose to plain HOOI's.
        ((5, 4, 2, 4, 4, 3), 3, (4, 4, 2, 4, 4, 3)),
    ],
)
def test_whitened_tucker_never_worse_than_hooi_on_output_error(shape, in_modes, ranks):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    features = math.prod(shape[len(shape) - in_modes :])
    gram = _correlated_gram(features)
    result = whitened_tucker(t, gram, ranks, in_modes=in_modes)
    weight = t.reshape(-1, features)
    approx = tucker_to_tensor(result.core, result.factors).reshape(weight.shape)
    assert result.error == pytest.approx(relative_output_error(weight, approx, gram), rel=1e-9)
    plain = hooi(t, ranks)
    plain_approx = tucker_to_tensor(plain.core, plain.factors).reshape(weight.shape)
    assert result.error <= relative_output_error(weight, plain_approx, gram) + 1e-9
    for factor, rank in zip(result.factors, ranks):
        torch.testing.assert_close(
            factor.T @ factor, torch.eye(rank, dtype=t.dtype), atol=1e-9, rtol=0
        )


def test_whitened_tucker_is_hooi_for_isotropic_inputs_and_rejects_bad_options():
    t = torch.randn(6, 4, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = whitened_tucker(t, 5.0 * torch.eye(12), (3, 2, 2, 3), in_modes=2)
    plain = hooi(t, (3, 2, 2, 3))
    torch.testing.assert_close(
        tucker_to_tensor(result.core, result.factors), tucker_to_tensor(plain.core, plain.factors)
    )
    with pytest.raises(ValueError, match=r"in_modes must be an integer in \[1, 4\].*got 5"):
        whitened_tucker(t, torch.eye(12), 2, in_modes=5)
    with pytest.raises(ValueError, match=r"gram must be the \(12, 12\)"):
        whitened_tucker(t, torch.eye(4), 2, in_modes=2)
    with pytest.raises(ValueError, match="ridge must be a finite non-negative float, got nan"):
        whitened_tucker(t, torch.eye(12), 2, in_modes=2, ridge=float("nan"))
    with pytest.raises(ValueError, match=r"in_modes must be an integer in \[1, 4\].*got 0"):
        whiten_input_modes(t, torch.eye(12), 0)
    meta = whitened_tucker(t.to("meta"), torch.eye(12), (3, 2, 2, 3), in_modes=2)
    assert meta.core.device.type == "meta" and math.isnan(meta.error)


def test_hooi_rejects_bad_options():
    t = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="n_iter must be a non-negative integer, got -1"):
        hooi(t, 2, n_iter=-1)
    with pytest.raises(ValueError, match="tol must be a finite non-negative number, got nan"):
        hooi(t, 2, tol=float("nan"))
