"""TT-SVD, TT-rounding, bond spectra, whitened TT-SVD and TT rank allocation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from factorized_layers.decompose import (
    allocate_tt_svd_ranks,
    tt_core_spectra,
    tt_round,
    tt_spectra,
    tt_svd,
    tt_to_matrix,
    whiten_tt_inputs,
    whitened_low_rank_factors,
    whitened_tt_svd,
)
from factorized_layers.ranks import allocate_tt_ranks, max_tt_ranks, resolve_tt_ranks, tt_params
from factorized_layers.ranks.tt import feasible_tt_ranks, tt_error_bound, tt_rank_path

SHAPES = [
    ((4, 3), (2, 5)),
    ((2, 3, 4), (3, 2, 2)),
    ((2, 2, 3, 2), (1, 3, 2, 2)),
    ((24, 1), (1, 20)),
    ((1, 6), (5, 1)),
]


def _unfoldings(weight: torch.Tensor, outs, ins):
    """Independent oracle: bond unfoldings built index by index with einsum-free reshapes.

    Entry ``W[o, i]`` goes to row ``(o_1 i_1 ... o_k i_k)``, column ``(o_{k+1} i_{k+1} ...)``
    of unfolding ``k`` (row-major multi-indices).
    """
    d = len(outs)
    tensor = weight.reshape(*outs, *ins)
    letters = "abcdefgh"
    src = letters[:d] + letters[d : 2 * d].upper()
    dst = "".join(letters[k] + letters[d + k].upper() for k in range(d))
    paired = torch.einsum(f"{src}->{dst}", tensor)
    sizes = [o * i for o, i in zip(outs, ins)]
    return [paired.reshape(math.prod(sizes[:k]), -1) for k in range(1, d)]


def _random_tt(outs, ins, ranks, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    full = (1, *ranks, 1)
    return [
        torch.randn(full[k], o, i, full[k + 1], generator=g, dtype=dtype)
        for k, (o, i) in enumerate(zip(outs, ins))
    ]


def _decaying(rows, cols, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=dtype)
    return w * torch.logspace(0, -1.5, cols, dtype=dtype)


@pytest.mark.parametrize("outs,ins", SHAPES)
def test_full_rank_tt_svd_reproduces_the_matrix(outs, ins):
    weight = _decaying(math.prod(outs), math.prod(ins))
    fit = tt_svd(weight, outs, ins, 10**6)
    assert fit.ranks == feasible_tt_ranks(outs, ins, max_tt_ranks(outs, ins))
    assert fit.error == 0.0
    torch.testing.assert_close(tt_to_matrix(fit.cores), weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("outs,ins", SHAPES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_tt_svd_error_is_within_the_unfolding_bound(outs, ins, rank):
    weight = _decaying(math.prod(outs), math.prod(ins), seed=rank)
    fit = tt_svd(weight, outs, ins, rank)
    actual = float((tt_to_matrix(fit.cores) - weight).norm() / weight.norm())
    assert fit.error == pytest.approx(actual, rel=1e-9, abs=1e-12)
    discarded = sum(
        float(torch.linalg.svdvals(unfolding)[r:].square().sum())
        for unfolding, r in zip(_unfoldings(weight, outs, ins), fit.ranks)
    )
    bound = math.sqrt(discarded) / float(weight.norm())
    assert actual <= bound * (1 + 1e-9) + 1e-12
    spectra = [s.tolist() for s in tt_spectra(weight, outs, ins)]
    assert tt_error_bound(spectra, outs, ins, fit.ranks) == pytest.approx(bound, rel=1e-9)


def test_two_core_tt_svd_is_the_eckart_young_optimum_of_the_reshuffled_matrix():
    outs, ins = (6, 4), (5, 3)
    weight = _decaying(24, 15, seed=3)
    (unfolding,) = _unfoldings(weight, outs, ins)
    values = torch.linalg.svdvals(unfolding)
    for rank in (1, 4, 9):
        fit = tt_svd(weight, outs, ins, rank)
        assert fit.error == pytest.approx(float(values[rank:].norm() / values.norm()), rel=1e-10)


def test_low_rank_form_is_the_truncated_svd():
    weight = _decaying(30, 20, seed=1)
    fit = tt_svd(weight, (30, 1), (1, 20), 7)
    values = torch.linalg.svdvals(weight)
    assert fit.error == pytest.approx(float(values[7:].norm() / values.norm()), rel=1e-10)


def test_tt_spectra_and_core_spectra_match_svdvals_of_the_unfoldings():
    outs, ins = (2, 3, 4), (3, 2, 2)
    weight = _decaying(24, 12, seed=4)
    oracle = [torch.linalg.svdvals(u) for u in _unfoldings(weight, outs, ins)]
    for got, expected in zip(tt_spectra(weight, outs, ins), oracle):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    cores = _random_tt(outs, ins, (3, 4), seed=5)
    dense = tt_to_matrix(cores)
    oracle = [torch.linalg.svdvals(u) for u in _unfoldings(dense, outs, ins)]
    for got, expected in zip(tt_core_spectra(cores), oracle):
        torch.testing.assert_close(got, expected[: got.shape[0]], rtol=1e-9, atol=1e-9)
        assert float(expected[got.shape[0] :].abs().sum()) < 1e-9


def test_tt_round_recovers_an_exact_lower_rank_tt():
    outs, ins = (2, 3, 4, 2), (3, 2, 2, 2)
    cores = _random_tt(outs, ins, (2, 3, 2), seed=6)
    dense = tt_to_matrix(cores)
    # The same matrix stored at higher ranks with a random gauge and zero padding.
    g = torch.Generator().manual_seed(7)
    big = []
    full, big_ranks = (1, 2, 3, 2, 1), (1, 5, 6, 4, 1)
    gauges = [torch.eye(1, dtype=torch.float64)]
    for k in range(1, 4):
        q, _ = torch.linalg.qr(
            torch.randn(big_ranks[k], big_ranks[k], generator=g, dtype=torch.float64)
        )
        gauges.append(q)
    gauges.append(torch.eye(1, dtype=torch.float64))
    for k, core in enumerate(cores):
        padded = torch.zeros(big_ranks[k], outs[k], ins[k], big_ranks[k + 1], dtype=torch.float64)
        padded[: full[k], :, :, : full[k + 1]] = core
        padded = torch.einsum("ab,boic,dc->aoid", gauges[k], padded, gauges[k + 1])
        big.append(padded)
    torch.testing.assert_close(tt_to_matrix(big), dense, rtol=0, atol=1e-10)
    rounded = tt_round(big, (2, 3, 2))
    assert rounded.ranks == (2, 3, 2)
    assert rounded.error < 1e-10
    torch.testing.assert_close(tt_to_matrix(rounded.cores), dense, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ranks", [(1, 1), (2, 5), (4, 3)])
def test_tt_round_equals_tt_svd_of_the_represented_matrix(ranks):
    outs, ins = (2, 3, 4), (3, 2, 2)
    cores = _random_tt(outs, ins, (6, 8), seed=8)
    dense = tt_to_matrix(cores)
    rounded = tt_round(cores, ranks)
    direct = tt_svd(dense, outs, ins, ranks)
    assert rounded.ranks == direct.ranks
    assert rounded.error == pytest.approx(direct.error, rel=1e-8)
    actual = float((tt_to_matrix(rounded.cores) - dense).norm() / dense.norm())
    assert rounded.error == pytest.approx(actual, rel=1e-8)
    torch.testing.assert_close(
        tt_to_matrix(rounded.cores), tt_to_matrix(direct.cores), rtol=1e-8, atol=1e-8
    )


def test_tt_round_never_raises_ranks():
    cores = _random_tt((2, 3), (3, 2), (2,), seed=9)
    assert tt_round(cores, 5).ranks == (2,)


@given(
    outs=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    seed=st.integers(0, 10**6),
    rank=st.integers(1, 6),
)
def test_tt_svd_properties(outs, seed, rank):
    ins = list(reversed(outs))
    weight = _decaying(math.prod(outs), math.prod(ins), seed=seed)
    fit = tt_svd(weight, outs, ins, rank)
    assert all(r <= rank for r in fit.ranks)
    assert fit.ranks == feasible_tt_ranks(outs, ins, fit.ranks)
    for k, core in enumerate(fit.cores):
        assert core.shape[1:3] == (outs[k], ins[k])
    actual = float((tt_to_matrix(fit.cores) - weight).norm() / weight.norm())
    assert fit.error == pytest.approx(actual, rel=1e-8, abs=1e-10)
    assert fit.error <= 1.0 + 1e-12


def test_low_precision_and_meta_inputs():
    weight = _decaying(12, 10, seed=10, dtype=torch.float32)
    reference = tt_svd(weight, (4, 3), (2, 5), 3)
    for dtype in (torch.float16, torch.bfloat16):
        fit = tt_svd(weight.to(dtype), (4, 3), (2, 5), 3)
        assert all(c.dtype == dtype for c in fit.cores)
        assert fit.error == pytest.approx(reference.error, abs=0.02)
    meta = tt_svd(torch.empty(12, 10, device="meta"), (4, 3), (2, 5), 3)
    assert [tuple(c.shape) for c in meta.cores] == [(1, 4, 2, 3), (3, 3, 5, 1)]
    assert all(c.device.type == "meta" for c in meta.cores) and math.isnan(meta.error)
    rounded = tt_round(meta.cores, 2)
    assert rounded.ranks == (2,) and rounded.cores[0].device.type == "meta"


def test_bad_arguments_name_the_values():
    weight = torch.randn(12, 10)
    with pytest.raises(
        ValueError, match=r"weight of shape \(12, 10\) does not match out_shape=\(4, 4\)"
    ):
        tt_svd(weight, (4, 4), (2, 5), 2)
    with pytest.raises(ValueError, match=r"d >= 2.*out_shape=\(12,\)"):
        tt_svd(weight, (12,), (10,), 2)
    with pytest.raises(
        ValueError, match=r"out_shape=\(4, 3\) \(2 modes\) and in_shape=\(2, 5, 1\)"
    ):
        tt_svd(weight, (4, 3), (2, 5, 1), 2)
    with pytest.raises(ValueError, match=r"rank\[0\] \(bond 1\) must be in \[1, 8\].*got 9"):
        tt_svd(weight, (4, 3), (2, 5), (9,))
    with pytest.raises(ValueError, match=r"one rank per bond: 1 .* got 2"):
        tt_svd(weight, (4, 3), (2, 5), (2, 2))
    with pytest.raises(
        ValueError, match=r"rank\[1\]=4 is larger than its neighbours allow.*\[1, 3\]"
    ):
        resolve_tt_ranks((1, 4), (2, 3, 2), (2, 1, 2))
    with pytest.raises(ValueError, match=r"fraction of parameters in \(0, 1\], got 1.5"):
        tt_svd(weight, (4, 3), (2, 5), 1.5)
    with pytest.raises(ValueError, match=r"valid fractions are in \["):
        resolve_tt_ranks(0.001, (4, 3), (2, 5))
    with pytest.raises(ValueError, match=r"int rank \(largest bond rank\) must be >= 1, got 0"):
        tt_svd(weight, (4, 3), (2, 5), 0)
    with pytest.raises(TypeError, match="got bool"):
        tt_svd(weight, (4, 3), (2, 5), True)
    with pytest.raises(ValueError, match="NaN/Inf"):
        tt_svd(torch.full((12, 10), float("nan")), (4, 3), (2, 5), 2)
    with pytest.raises(
        ValueError, match=r"core 1 has shape \(3, 3, 5, 1\): its first rank must be 2"
    ):
        tt_round([torch.randn(1, 4, 2, 2), torch.randn(3, 3, 5, 1)], 1)
    with pytest.raises(ValueError, match="ridge must be a finite positive float, got 0"):
        whitened_tt_svd(weight, (4, 3), (2, 5), 2, torch.eye(10), ridge=0)
    with pytest.raises(ValueError, match=r"gram must be the \(10, 10\)"):
        whitened_tt_svd(weight, (4, 3), (2, 5), 2, torch.eye(9))


# --------------------------------------------------------------------------- whitening


def _correlated_inputs(features, seed=0, rows=400):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -2, features, dtype=torch.float64)
    return torch.randn(rows, features, generator=g, dtype=torch.float64) @ (mix * scale)


def test_whitened_low_rank_form_is_the_activation_whitened_svd_optimum():
    weight = _decaying(24, 20, seed=11)
    x = _correlated_inputs(20, seed=12)
    gram = x.T @ x
    fit, calibrated, plain = whitened_tt_svd(weight, (24, 1), (1, 20), 5, gram, ridge=1e-9)
    # Independent oracle: the Eckart-Young tail of W S with S the Cholesky root of the Gram.
    root = torch.linalg.cholesky(gram)
    values = torch.linalg.svdvals(weight @ root)
    optimum = float(values[5:].norm() / values.norm())
    assert calibrated == pytest.approx(optimum, rel=1e-6)
    measured = float(((weight - tt_to_matrix(fit.cores)) @ x.T).norm() / (weight @ x.T).norm())
    assert measured == pytest.approx(optimum, rel=1e-6)
    assert calibrated <= plain
    output, inputs = whitened_low_rank_factors(weight, gram, 5, ridge=1e-9)
    torch.testing.assert_close(tt_to_matrix(fit.cores), output @ inputs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("outs,ins", [((4, 6), (4, 5)), ((2, 3, 4), (2, 5, 2))])
def test_whitened_tt_svd_is_never_worse_on_the_data(outs, ins):
    weight = _decaying(24, 20, seed=13)
    x = _correlated_inputs(20, seed=14)
    fit, calibrated, plain = whitened_tt_svd(weight, outs, ins, 3, x.T @ x)
    measured = float(((weight - tt_to_matrix(fit.cores)) @ x.T).norm() / (weight @ x.T).norm())
    assert measured == pytest.approx(calibrated, rel=1e-6)
    plain_fit = tt_svd(weight, outs, ins, 3)
    plain_measured = float(
        ((weight - tt_to_matrix(plain_fit.cores)) @ x.T).norm() / (weight @ x.T).norm()
    )
    assert plain == pytest.approx(plain_measured, rel=1e-6)
    assert calibrated <= plain * (1 + 1e-12)


def test_kronecker_gram_whitening_is_exact():
    outs, ins = (4, 6), (4, 5)
    weight = _decaying(24, 20, seed=15)
    a, b = _correlated_inputs(4, seed=16), _correlated_inputs(5, seed=17)
    g1, g2 = a.T @ a, b.T @ b
    gram = torch.kron(g1, g2)
    whitened = whiten_tt_inputs(weight, outs, ins, gram, ridge=1e-12)
    root = torch.kron(torch.linalg.cholesky(g1), torch.linalg.cholesky(g2))
    # Roots differ by an orthogonal factor: compare the Gram of the whitened rows.
    scale = float((weight @ root).norm() / whitened.norm())
    torch.testing.assert_close(
        whitened @ whitened.T * scale**2, (weight @ root) @ (weight @ root).T, rtol=1e-8, atol=1e-8
    )
    fit, calibrated, _ = whitened_tt_svd(weight, outs, ins, 4, gram, ridge=1e-12)
    # Exactness: the output error is the TT-SVD error of the whitened weight.
    assert calibrated == pytest.approx(tt_svd(whitened, outs, ins, 4).error, rel=1e-6)


# --------------------------------------------------------------------------- ranks


def test_resolve_and_feasible_ranks():
    assert max_tt_ranks((16, 12, 8), (8, 8, 6)) == (128, 48)
    assert resolve_tt_ranks(64, (16, 12, 8), (8, 8, 6)) == (64, 48)
    assert resolve_tt_ranks((3, 4), (2, 3, 4), (3, 2, 2)) == (3, 4)
    assert feasible_tt_ranks((2, 8, 2), (1, 8, 1), (64, 64)) == (2, 2)
    for fraction in (0.05, 0.2, 0.5, 1.0):
        ranks = resolve_tt_ranks(fraction, (16, 12, 8), (8, 8, 6))
        assert tt_params((16, 12, 8), (8, 8, 6), ranks) <= fraction * 1536 * 384
    assert tt_params((4, 3), (2, 5), (8,)) == 8 * 8 + 8 * 15


def _bound(spectra, ranks):
    return sum(sum(v * v for v in s[r:]) for s, r in zip(spectra, ranks))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_allocation_fits_the_budget_and_nearly_minimises_the_bound(seed, fraction):
    outs, ins = (4, 3, 2), (2, 3, 4)
    g = torch.Generator().manual_seed(seed)
    weight = (
        torch.randn(24, 24, generator=g, dtype=torch.float64)
        @ torch.diag(torch.logspace(0, -2, 24, dtype=torch.float64))
        @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    )
    spectra = [s.tolist() for s in tt_spectra(weight, outs, ins)]
    budget = int(fraction * 576)
    ranks = allocate_tt_ranks(spectra, outs, ins, budget)
    assert tt_params(outs, ins, ranks) <= budget
    assert ranks == feasible_tt_ranks(outs, ins, ranks)
    limits = max_tt_ranks(outs, ins)
    optimum = min(
        _bound(spectra, r)
        for r in itertools.product(*[range(1, m + 1) for m in limits])
        if r == feasible_tt_ranks(outs, ins, r) and tt_params(outs, ins, r) <= budget
    )
    assert _bound(spectra, ranks) <= optimum * 1.1 + 1e-12
    uniform = resolve_tt_ranks(budget / 576, outs, ins)
    assert _bound(spectra, ranks) <= _bound(spectra, uniform) + 1e-12


def test_two_core_allocation_is_the_largest_rank_in_budget():
    spectra = [[float(v) for v in torch.linspace(10, 1, 12)]]
    assert allocate_tt_ranks(spectra, (12, 1), (1, 10), 10 * 22) == (10,)
    with pytest.raises(ValueError, match=r"budget of 5 parameters is below the smallest"):
        allocate_tt_ranks(spectra, (12, 1), (1, 10), 5)


def test_rank_path_descends_to_ones_with_growing_bound():
    outs, ins = (2, 3, 4), (3, 2, 2)
    spectra = [s.tolist() for s in tt_spectra(_decaying(24, 12, seed=18), outs, ins)]
    path = tt_rank_path(spectra, outs, ins)
    assert path[0][0] == feasible_tt_ranks(outs, ins, max_tt_ranks(outs, ins))
    assert path[-1][0] == (1, 1)
    params = [p for _, p, _ in path]
    bounds = [b for _, _, b in path]
    assert params == sorted(params, reverse=True) and bounds == sorted(bounds)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fraction", [0.25, 0.45])
def test_three_core_allocation_is_the_exhaustive_tt_svd_optimum(seed, fraction):
    outs, ins = (4, 3, 2), (2, 3, 4)
    weight = _decaying(24, 24, seed=20 + seed)
    budget = int(fraction * 576)
    ranks = allocate_tt_svd_ranks(weight, outs, ins, budget)
    assert tt_params(outs, ins, ranks) <= budget
    limits = max_tt_ranks(outs, ins)
    optimum = min(
        tt_svd(weight, outs, ins, r).error
        for r in itertools.product(*[range(1, m + 1) for m in limits])
        if r == feasible_tt_ranks(outs, ins, r) and tt_params(outs, ins, r) <= budget
    )
    assert tt_svd(weight, outs, ins, ranks).error <= optimum * (1 + 1e-9)


def test_allocation_for_two_and_four_cores_fits_the_budget():
    weight = _decaying(24, 24, seed=30)
    for outs, ins in [((6, 4), (4, 6)), ((2, 2, 3, 2), (2, 3, 2, 2))]:
        ranks = allocate_tt_svd_ranks(weight, outs, ins, 200)
        assert tt_params(outs, ins, ranks) <= 200
    (unfolding,) = _unfoldings(weight, (6, 4), (4, 6))
    values = torch.linalg.svdvals(unfolding)
    best = max(r for r in range(1, 25) if tt_params((6, 4), (4, 6), (r,)) <= 200)
    assert allocate_tt_svd_ranks(weight, (6, 4), (4, 6), 200) == (best,)
    assert float(values[best - 1]) > 0
