"""cp_als, cp_factors, khatri_rao and whitened_cp_factors: fitting, stability, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from factorized_layers.decompose import (
    cp_als,
    cp_factors,
    cp_to_tensor,
    khatri_rao,
    whitened_cp_factors,
)


def _cp_kernel(shape, rank, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=g, dtype=dtype) for n in shape]
    return cp_to_tensor(None, factors), factors


# --------------------------------------------------------------------------- fitting


def _degenerate_tensor():
    """a∘a∘b + a∘b∘a + b∘a∘a: rank 3, border rank 2 -- rank-2 ALS diverges (Phan et al.)."""
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(4, generator=g, dtype=torch.float64),
        torch.randn(4, generator=g, dtype=torch.float64),
    )
    a = a / a.norm()
    b = b - (b @ a) * a
    b = b / b.norm()

    def outer(x, y, z):
        return torch.einsum("i,j,k->ijk", x, y, z)

    return outer(a, a, b) + outer(a, b, a) + outer(b, a, a)


def test_degeneracy_guard_fires_raises_ridge_and_bounds_the_weights():
    tensor = _degenerate_tensor()
    # Unguarded, the two weights grow without bound (the best iterate of 200 sweeps has
    # a weight of 20.8x the norm); with the guard at 1.5x it fires, raises the ridge and
    # stops them (1.9x).
    guarded = cp_als(tensor, 2, n_iter=200, tol=0.0, diverging_norm=1.5)
    assert guarded.degenerate
    assert guarded.ridge >= 1e-4
    assert float(guarded.weights.max()) < 3.2 * float(tensor.norm())
    assert math.isfinite(guarded.error) and guarded.error < 0.1
    assert all(torch.isfinite(f).all() for f in guarded.factors)


def test_zero_tolerance_runs_every_sweep_through_overshoots_and_guard_firings():
    # The error rises for a few sweeps after a momentum overshoot (the degenerate
    # tensor, guard off) and after the guard raises the ridge (the kernel); neither
    # may read as convergence when tol=0 asks for every sweep.
    overshooting = cp_als(_degenerate_tensor(), 2, n_iter=120, tol=0.0, diverging_norm=1e12)
    assert overshooting.n_iter == 120 and not overshooting.converged
    torch.manual_seed(0)
    nn.Conv2d(8, 16, 3)
    kernel = nn.Conv2d(8, 16, 3).weight.detach().double()
    guarded = cp_als(kernel, 30, n_iter=120, tol=0.0)
    assert guarded.degenerate and guarded.n_iter == 120


def test_more_sweeps_never_return_a_worse_fit():
    # The best ALS point is returned, not the last one: on the degenerate tensor (guard
    # off) a momentum step overshoots at sweep 45, from an error of 2e-4 to 0.19.
    tensor = _degenerate_tensor()
    errors = [
        cp_als(tensor, 2, n_iter=n, tol=0.0, diverging_norm=1e12).error for n in range(40, 51)
    ]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:]))


@pytest.mark.parametrize("poisoned_call", [12, 13])
def test_a_non_finite_update_restarts_from_the_best_iterate(poisoned_call, monkeypatch):
    # Call 12 is the last mode of sweep 3 (the error sees the NaN at once); call 13 the
    # first mode of sweep 4, whose NaN Gram matrix breaks the next mode's Cholesky.
    from factorized_layers.decompose import cp as decompose

    update = decompose._als_update
    calls = []

    def poisoned(mttkrp, grams, mode, ridge, tiny):
        norms, unit, gram = update(mttkrp, grams, mode, ridge, tiny)
        calls.append(mode)
        if len(calls) == poisoned_call:
            unit = unit.clone()
            unit[0, 0] = math.nan
            gram = unit.T @ unit
        return norms, unit, gram

    monkeypatch.setattr(decompose, "_als_update", poisoned)
    torch.manual_seed(0)
    kernel = nn.Conv2d(32, 48, 3).weight.detach()
    result = cp_als(kernel, 20, n_iter=30)
    assert len(calls) > poisoned_call
    assert result.degenerate and result.ridge >= 1e-4
    assert math.isfinite(result.error) and result.error < 0.95
    assert all(torch.isfinite(f).all() for f in result.factors)


@pytest.mark.filterwarnings("ignore:Trying to compute SVD with n_eigenvecs")
def test_fit_error_is_at_most_tensorly_parafac_error():
    tensorly = pytest.importorskip("tensorly", reason="tensorly is not installed")
    from tensorly.decomposition import parafac

    torch.manual_seed(0)
    for shape, rank, n_iter in [((16, 8, 3, 3), 10, 25), ((12, 12, 5, 3), 20, 40)]:
        kernel = nn.Conv2d(shape[1], shape[0], shape[2:]).weight.detach().double()
        ours = cp_als(kernel, rank, n_iter=n_iter, tol=0.0)
        cp = parafac(
            tensorly.tensor(kernel.numpy()),
            rank,
            n_iter_max=n_iter,
            init="svd",
            tol=0.0,
            random_state=0,
        )
        rebuilt = torch.from_numpy(tensorly.cp_to_tensor(cp))
        theirs = float((rebuilt - kernel).norm() / kernel.norm())
        assert ours.error <= theirs + 1e-3, (shape, ours.error, theirs)


# --------------------------------------------------------------------------- cp_als unit


def test_cp_als_n_way_generic_and_result_fields():
    for shape in [(7, 5), (4, 5, 6), (3, 4, 2, 3, 2)]:
        tensor, _ = _cp_kernel(shape, 2, seed=len(shape))
        result = cp_als(tensor, 2, n_iter=500, tol=0.0)
        assert [f.shape for f in result.factors] == [(n, 2) for n in shape]
        assert result.error < 1e-5, shape
        torch.testing.assert_close(
            cp_to_tensor(result.weights, result.factors), tensor, rtol=1e-4, atol=1e-4
        )
        norms = torch.stack([f.norm(dim=0) for f in result.factors])
        torch.testing.assert_close(norms, torch.ones_like(norms))
        assert 1 <= result.n_iter <= 500


def test_momentum_lowers_the_error_reached_in_a_fixed_number_of_sweeps():
    torch.manual_seed(0)
    kernel = nn.Conv2d(32, 48, 3).weight.detach()
    for rank in (20, 60):
        plain = cp_als(kernel, rank, n_iter=30, tol=0.0, extrapolate=False)
        accelerated = cp_als(kernel, rank, n_iter=30, tol=0.0)
        assert plain.n_iter == accelerated.n_iter == 30
        assert accelerated.error < plain.error
        # Both report the exact error of the factors they return.
        for result in (plain, accelerated):
            approx = cp_to_tensor(result.weights, result.factors)
            exact = float((approx - kernel).norm() / kernel.norm())
            assert abs(exact - result.error) < 1e-5


def test_windowed_stop_runs_fewer_sweeps_with_a_looser_tolerance():
    torch.manual_seed(0)
    kernel = nn.Conv2d(32, 48, 3).weight.detach()
    loose = cp_als(kernel, 40, n_iter=200, tol=1e-3)
    tight = cp_als(kernel, 40, n_iter=200, tol=1e-5)
    assert loose.converged and loose.n_iter < tight.n_iter
    assert tight.error <= loose.error


def test_cp_als_dtypes_devices_and_meta():
    tensor = torch.randn(6, 5, 4)
    half = cp_als(tensor.half(), 3, n_iter=5)
    assert half.weights.dtype == torch.float16 and all(
        f.dtype == torch.float16 for f in half.factors
    )
    result = cp_als(tensor, 3, n_iter=5, compute_dtype=torch.float64)
    assert result.weights.dtype == torch.float32
    meta = cp_als(torch.empty(6, 5, 4, device="meta"), 3)
    assert meta.weights.device.type == "meta" and meta.factors[2].shape == (4, 3)
    assert math.isnan(meta.error) and meta.n_iter == 0


def test_cp_factors_balance_weights_into_factors():
    tensor = torch.randn(5, 4, 3, dtype=torch.float64) * 100
    plain = cp_als(tensor, 4, n_iter=50)
    balanced = cp_factors(tensor, 4, n_iter=50)
    torch.testing.assert_close(
        cp_to_tensor(None, balanced.factors), cp_to_tensor(plain.weights, plain.factors)
    )
    scales = torch.stack([f.norm(dim=0) for f in balanced.factors])
    torch.testing.assert_close(scales, scales[:1].expand_as(scales))


def test_khatri_rao_matches_definition():
    a, b, c = torch.randn(3, 2), torch.randn(4, 2), torch.randn(2, 2)
    kr = khatri_rao([a, b, c])
    expected = torch.einsum("ir,jr,kr->ijkr", a, b, c).reshape(-1, 2)
    torch.testing.assert_close(kr, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_iter=0), "n_iter must be a positive integer, got 0"),
        (dict(tol=-1.0), r"tol must be a number in \[0, 1\), got -1.0"),
        (dict(ridge=1.0), r"ridge must be a number in \[0, 0.1\], got 1.0"),
        (dict(compute_dtype=torch.float16), "compute_dtype must be"),
        (dict(diverging_norm=0.5), "diverging_norm must be a finite number > 1, got 0.5"),
    ],
)
def test_cp_als_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cp_als(torch.randn(3, 4, 5), 2, **kwargs)


def test_cp_als_bad_tensors():
    with pytest.raises(ValueError, match="at least 2 modes"):
        cp_als(torch.randn(5), 1)
    with pytest.raises(TypeError, match="floating-point"):
        cp_als(torch.ones(3, 3, dtype=torch.int64), 1)
    bad = torch.randn(3, 4, 5)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\) out of 60"):
        cp_als(bad, 2)


# --------------------------------------------------------------------------- calibration


def test_channel_whitening_with_isotropic_channels_never_raises_the_fit_error():
    dense = nn.Conv2d(6, 8, 3, dtype=torch.float64)
    plain = cp_factors(dense.weight.detach(), 5, n_iter=200)
    result = whitened_cp_factors(dense.weight.detach(), 3.0 * torch.eye(6), 5, n_iter=200)
    assert result.error <= plain.error + 1e-12
    with torch.no_grad():
        fitted = cp_to_tensor(None, result.factors)
        relative = float((fitted - dense.weight).norm() / dense.weight.norm())
    assert relative == pytest.approx(result.error, rel=1e-9)
    torch.testing.assert_close(result.weights, torch.ones(5, dtype=torch.float64))
