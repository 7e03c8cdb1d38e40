"""Tucker decompositions of N-way tensors: HOSVD, HOOI and their data-aware variant.

Mode products (:func:`mode_dot`, :func:`tucker_to_tensor`), the truncated HOSVD
(:func:`hosvd`, and :func:`hosvd_energy` for rank allocation), HOOI (:func:`hooi`),
the output-error-aware :func:`whitened_tucker` with its per-mode whitening
(:func:`mode_grams`, :func:`whiten_input_modes`), and :func:`reduce_tucker`, which
lowers the ranks of a Tucker tensor from its parts.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch

from ..ranks import max_tucker_ranks, resolve_tucker_ranks
from ._common import (
    _check_finite,
    _check_gram,
    _check_ridge,
    _compute_dtype,
    _normalized_gram,
    _orthonormal_basis,
    _whitening_eig,
)
from .svd import relative_output_error


class TuckerDecomposition(NamedTuple):
    """A Tucker tensor ``core x_0 factors[0] x_1 factors[1] ...``."""

    core: torch.Tensor
    """Core of shape ``ranks``."""
    factors: Tuple[torch.Tensor, ...]
    """One ``(size_k, rank_k)`` factor per mode, orthonormal columns."""
    error: float
    """Relative Frobenius error ``||T - tucker|| / ||T||`` (NaN on meta, 0 for T = 0)."""
    n_iter: int
    """HOOI sweeps run (0 for HOSVD)."""


def _check_tucker_tensor(tensor: torch.Tensor) -> None:
    """Raise unless ``tensor`` is a non-empty, finite (or meta) floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() < 1 or tensor.numel() == 0:
        raise ValueError(f"tensor must have at least one non-empty mode, got {tuple(tensor.shape)}")
    _check_finite(tensor, "tensor")


def mode_dot(tensor: torch.Tensor, matrix: torch.Tensor | None, mode: int) -> torch.Tensor:
    """Mode-``mode`` product ``tensor x_mode matrix``: mode size ``n`` becomes ``matrix.shape[0]``.

    Args:
        tensor: Any tensor.
        matrix: ``(m, n)`` with ``n = tensor.shape[mode]``; ``None`` means identity.
        mode: The mode to multiply.

    Examples:
        >>> t, m = torch.randn(2, 3, 4), torch.randn(5, 3)
        >>> torch.allclose(mode_dot(t, m, 1), torch.einsum("ijk,mj->imk", t, m), atol=1e-6)
        True
    """
    if matrix is None:
        return tensor
    shape = tensor.shape
    pre, size, post = math.prod(shape[:mode]), shape[mode], math.prod(shape[mode + 1 :])
    # The mode keeps its place: one GEMM (or one batched GEMM over the modes before it)
    # on a view, where moving the mode last and back copied the tensor twice per product.
    view = tensor.reshape(pre, size, post)
    if pre == 1:
        result = matrix @ view[0]
    elif post == 1:
        result = view[:, :, 0] @ matrix.mT
    else:
        result = torch.bmm(matrix.expand(pre, *matrix.shape), view)
    return result.reshape(*shape[:mode], matrix.shape[0], *shape[mode + 1 :])


def tucker_to_tensor(core: torch.Tensor, factors) -> torch.Tensor:
    """The full tensor ``core x_0 factors[0] x_1 factors[1] ...`` (``None`` = identity).

    Examples:
        >>> core, a, b = torch.randn(2, 3), torch.randn(4, 2), torch.randn(5, 3)
        >>> torch.allclose(tucker_to_tensor(core, [a, b]), a @ core @ b.T, atol=1e-6)
        True
    """
    result = core
    for mode, factor in enumerate(factors):
        result = mode_dot(result, factor, mode)
    return result


def _unfolding(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-``mode`` unfolding: ``(size_mode, product of the other sizes)``."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _leading_left(tensor: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of the mode-``mode`` unfolding.

    A mode kept whole (``rank`` = its size) gets the identity: no truncation, and
    the rank may then exceed what the unfolding's SVD could return.
    """
    size = tensor.shape[mode]
    if rank == size:
        return torch.eye(size, device=tensor.device, dtype=tensor.dtype)
    return _left_singular_vectors(_unfolding(tensor, mode), rank)


def _left_singular_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of an (already checked) matrix.

    Unfoldings are usually short and very wide (``16 x 36864``), where a full SVD
    spends its time on the right vectors nobody needs: there the eigenvectors of
    the Gram matrix ``A A^T``, formed and diagonalised in float64 (so squaring the
    singular values costs no float32 accuracy), are much faster.
    """
    rows, cols = matrix.shape
    if cols >= 2 * rows:
        wide = matrix.double()  # one float64 copy, not one per operand
        gram = wide @ wide.mT
        _, vectors = torch.linalg.eigh(gram)
        return vectors.flip(-1)[:, :rank].to(matrix.dtype)
    return torch.linalg.svd(matrix, full_matrices=False).U[:, :rank]


def _project_all_but(tensor: torch.Tensor, factors, skip: int) -> torch.Tensor:
    """``tensor`` multiplied by every factor's transpose except mode ``skip``'s.

    The modes that shrink the tensor most go first, so later products run on less.
    """
    order = sorted(
        (mode for mode in range(len(factors)) if mode != skip),
        key=lambda mode: factors[mode].shape[1] / factors[mode].shape[0],
    )
    for mode in order:
        tensor = mode_dot(tensor, factors[mode].mT, mode)
    return tensor


def _tucker_setup(tensor, ranks, compute_dtype):
    """Check ``tensor``; return its resolved multilinear ranks and the compute dtype."""
    _check_tucker_tensor(tensor)
    ranks = resolve_tucker_ranks(ranks, tuple(tensor.shape))
    return ranks, _compute_dtype(tensor, compute_dtype)


def _meta_tucker(tensor: torch.Tensor, ranks) -> TuckerDecomposition:
    """A meta-device :class:`TuckerDecomposition` of the right shapes (error NaN)."""
    meta = dict(device=tensor.device, dtype=tensor.dtype)
    factors = tuple(torch.empty(n, r, **meta) for n, r in zip(tensor.shape, ranks))
    return TuckerDecomposition(torch.empty(ranks, **meta), factors, math.nan, 0)


def _relative_error(core: torch.Tensor, norm: float) -> float:
    """Relative error of a Tucker tensor with orthonormal factors, from its core alone."""
    # ||T - G x U||^2 = ||T||^2 - ||G||^2 for orthonormal factors; accumulated in fp64.
    if norm == 0.0:
        return 0.0
    kept = float(core.double().square().sum())
    return math.sqrt(max(norm**2 - kept, 0.0)) / norm


def _exact_error(work: torch.Tensor, core: torch.Tensor, factors, norm: float) -> float:
    """Relative error ``||tucker - work|| / norm`` from the reconstruction."""
    if norm == 0.0:
        return 0.0
    return float((tucker_to_tensor(core, factors) - work).double().norm()) / norm


def _finish(
    core: torch.Tensor, factors, error: float, n_iter: int, dtype: torch.dtype
) -> TuckerDecomposition:
    """The :class:`TuckerDecomposition` with core and factors cast to ``dtype``."""
    return TuckerDecomposition(core.to(dtype), tuple(f.to(dtype) for f in factors), error, n_iter)


def hosvd(
    tensor: torch.Tensor, ranks, *, compute_dtype: torch.dtype | None = None
) -> TuckerDecomposition:
    """Truncated higher-order SVD: leading left singular vectors of every unfolding.

    Args:
        tensor: An N-way floating tensor on any device (meta included).
        ranks: Multilinear ranks: an ``int`` for every mode, a tuple, or a ``float``
            parameter fraction (see :func:`factorized_layers.ranks.resolve_tucker_ranks`).
        compute_dtype: ``torch.float32`` or ``torch.float64``; default float64 for
            float64 input, float32 otherwise.

    Returns:
        :class:`TuckerDecomposition` in ``tensor``'s dtype and device; ``error`` is
        measured on the reconstruction.

    Raises:
        ValueError: Bad ranks (naming value and valid range), NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> t = torch.randn(6, 5, 4, dtype=torch.float64)
        >>> core, factors, error, _ = hosvd(t, (6, 5, 4))
        >>> error < 1e-12
        True
    """
    ranks, dtype = _tucker_setup(tensor, ranks, compute_dtype)
    if tensor.device.type == "meta":
        return _meta_tucker(tensor, ranks)
    work = tensor.detach().to(dtype)
    factors = tuple(_leading_left(work, k, r) for k, r in enumerate(ranks))
    core = tucker_to_tensor(work, [f.mT for f in factors])
    error = _exact_error(work, core, factors, float(work.double().norm()))
    return _finish(core, factors, error, 0, tensor.dtype)


def hosvd_energy(
    tensor: torch.Tensor, *, compute_dtype: torch.dtype | None = None
) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """Full HOSVD bases and the squared all-orthogonal core, for rank allocation.

    With ``U_k`` all left singular vectors of the mode-``k`` unfolding (at most
    ``min(size_k, prod(other sizes))`` of them), ``S = T x_k U_k^T`` is
    all-orthogonal and truncating the bases to ranks ``r`` leaves the core block
    ``S[:r_0, :r_1, ...]``. ``energy = S ** 2`` (float64) therefore gives the error of
    every truncated HOSVD by a prefix sum, see
    :func:`factorized_layers.ranks.allocate_tucker_ranks`.

    Returns:
        ``(bases, energy)`` in the compute dtype (energy in float64).

    Examples:
        >>> bases, energy = hosvd_energy(torch.randn(4, 3, 2))
        >>> energy.shape, round(float(energy.sum()), 3) > 0
        (torch.Size([4, 3, 2]), True)
    """
    _check_tucker_tensor(tensor)
    dtype = _compute_dtype(tensor, compute_dtype)
    limits = max_tucker_ranks(tuple(tensor.shape))
    if tensor.device.type == "meta":
        return tuple(
            torch.empty(n, r, device="meta", dtype=dtype) for n, r in zip(tensor.shape, limits)
        ), torch.empty(limits, device="meta", dtype=torch.float64)
    work = tensor.detach().to(dtype)
    # All singular vectors (not the identity _leading_left gives a whole mode): the
    # prefix property needs the singular-vector order on every mode.
    bases = tuple(_left_singular_vectors(_unfolding(work, k), r) for k, r in enumerate(limits))
    core = tucker_to_tensor(work, [b.mT for b in bases])
    return bases, core.double().square()


def hooi(
    tensor: torch.Tensor,
    ranks,
    *,
    n_iter: int = 30,
    tol: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> TuckerDecomposition:
    """Tucker decomposition by higher-order orthogonal iteration, HOSVD-initialised.

    Each sweep replaces every factor by the leading left singular vectors of the
    tensor projected on all the other factors. The best iterate is kept, so the
    error is never above :func:`hosvd`'s; for a matrix (two modes) HOSVD is already
    the truncated-SVD optimum (Eckart--Young) and HOOI keeps it.

    Args:
        tensor: An N-way floating tensor on any device (meta included).
        ranks: Multilinear ranks, as in :func:`hosvd`.
        n_iter: Most sweeps (``0`` returns the HOSVD).
        tol: Stop when a sweep lowers the relative error by less than ``tol``.
        compute_dtype: As in :func:`hosvd`.

    Returns:
        :class:`TuckerDecomposition` in ``tensor``'s dtype and device.

    Raises:
        ValueError: Bad ranks, ``n_iter`` or ``tol``, NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> t = torch.randn(8, 7, 6, dtype=torch.float64)
        >>> hooi(t, (3, 3, 3)).error <= hosvd(t, (3, 3, 3)).error
        True
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite non-negative number, got {tol!r}")
    ranks, dtype = _tucker_setup(tensor, ranks, compute_dtype)
    if tensor.device.type == "meta":
        return _meta_tucker(tensor, ranks)
    work = tensor.detach().to(dtype)
    norm = float(work.double().norm())
    factors = [_leading_left(work, k, r) for k, r in enumerate(ranks)]
    core = tucker_to_tensor(work, [f.mT for f in factors])
    start = (core, tuple(factors))
    best_error = _relative_error(core, norm)
    best = start
    sweeps = 0
    previous = best_error
    for _ in range(n_iter):
        if best_error == 0.0:
            break
        sweeps += 1
        for k, r in enumerate(ranks):
            if r < work.shape[k]:
                factors[k] = _leading_left(_project_all_but(work, factors, k), k, r)
        core = tucker_to_tensor(work, [f.mT for f in factors])
        error = _relative_error(core, norm)
        if error < best_error:
            best_error, best = error, (core, tuple(factors))
        if previous - error < tol:
            break
        previous = error
    # The sweeps compared errors through ||T||^2 - ||G||^2; decide the final
    # HOSVD-or-HOOI choice on the exact errors so that it can never lose to HOSVD.
    error = _exact_error(work, best[0], best[1], norm)
    if best is not start:
        start_error = _exact_error(work, start[0], start[1], norm)
        if start_error < error:
            best, error = start, start_error
    return _finish(best[0], best[1], error, sweeps, tensor.dtype)


def mode_grams(gram: torch.Tensor, shape: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """Per-mode Gram matrices of inputs seen as tensors of ``shape`` (partial traces).

    For inputs ``x_t`` reshaped (row-major) to ``shape``, the mode-``k`` Gram is
    ``sum_t X_t(k) X_t(k)^T`` with ``X_t(k)`` the mode-``k`` unfolding of ``x_t``: the
    full Gram ``sum_t x_t x_t^T`` with every other mode traced out, so no new
    statistics are needed.

    Args:
        gram: ``(n, n)`` Gram matrix, ``n = prod(shape)``.
        shape: Modes of the inputs.

    Returns:
        One ``(shape[k], shape[k])`` matrix per mode, in ``gram``'s dtype and device.

    Raises:
        ValueError: If ``gram`` is not ``(prod(shape), prod(shape))``.

    Examples:
        >>> x = torch.randn(5, 6, dtype=torch.float64)
        >>> g0, g1 = mode_grams(x.T @ x, (2, 3))
        >>> xs = x.reshape(5, 2, 3)
        >>> torch.allclose(g0, torch.einsum("tab,tcb->ac", xs, xs))
        True
    """
    shape = tuple(int(n) for n in shape)
    features = math.prod(shape)
    _check_gram(gram, features)
    order = len(shape)
    if order == 1:
        return (gram,)
    letters = "abcdefghijklmnopqrstuvwxyz"[:order]
    tensor = gram.reshape(shape + shape)
    grams = []
    for k in range(order):
        columns = "".join(c.upper() if j == k else c for j, c in enumerate(letters))
        grams.append(torch.einsum(f"{letters}{columns}->{letters[k]}{letters[k].upper()}", tensor))
    return tuple(grams)


def _input_mode_roots(
    gram: torch.Tensor, in_shape: Tuple[int, ...], ridge: float, dtype: torch.dtype
) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """The normalised Gram (float64) and ``(E_k, d_k)`` (in ``dtype``) of every mode's root."""
    normalized = _normalized_gram(gram, gram.device, torch.float64)
    # Trace of the normalised Gram = in_features, so every mode's ridge term is the
    # partial trace of ridge * I: the modes share one regularisation.
    roots = [_whitening_eig(g, ridge) for g in mode_grams(normalized, in_shape)]
    return normalized, [(e.to(dtype), d.to(dtype)) for e, d in roots]


def _whiten_modes(
    tensor: torch.Tensor, roots: Sequence[Tuple[torch.Tensor, torch.Tensor]], first: int
) -> torch.Tensor:
    """``tensor x_{first+k} S_k^T`` for the roots ``S_k = E_k diag(d_k)`` in ``roots``."""
    for k, (vectors, values) in enumerate(roots):
        tensor = mode_dot(tensor, (vectors * values).mT, first + k)
    return tensor


def _check_in_modes(tensor: torch.Tensor, in_modes: int) -> Tuple[int, ...]:
    """Check ``in_modes``; return the shape of the trailing input modes."""
    if (
        isinstance(in_modes, bool)
        or not isinstance(in_modes, int)
        or not (1 <= in_modes <= tensor.dim())
    ):
        raise ValueError(
            f"in_modes must be an integer in [1, {tensor.dim()}] (the tensor has "
            f"{tensor.dim()} modes), got {in_modes!r}"
        )
    return tuple(tensor.shape[tensor.dim() - in_modes :])


def whiten_input_modes(
    tensor: torch.Tensor,
    gram: torch.Tensor,
    in_modes: int,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``tensor`` with every input mode multiplied by its whitening root: ``T x_k S_k^T``.

    The last ``in_modes`` modes of ``tensor`` are the input modes of a weight tensor
    (``out_shape + in_shape``); ``S_k`` is the :func:`whitening_root` of the
    mode-``k`` Gram (:func:`mode_grams` of the normalised ``gram``). For
    Kronecker-structured inputs (``gram = G_1 (x) G_2 (x) ...``) the Frobenius error of
    a Tucker approximation of the result is exactly the output error on the data;
    otherwise it is the Kronecker approximation of it. Its HOSVD energy ranks Tucker
    budgets by output error (:func:`whitened_tucker` decomposes it).

    Args:
        tensor: ``out_shape + in_shape`` weight tensor.
        gram: ``(in, in)`` input Gram matrix ``X^T X``, ``in = prod(in_shape)``.
        in_modes: Number of trailing input modes.
        ridge: Relative ridge of :func:`whitening_root`.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (default as in :func:`hosvd`).

    Returns:
        The whitened tensor in the compute dtype (so that low-precision weights lose
        nothing), on ``tensor``'s device.

    Examples:
        >>> w = torch.randn(4, 2, 3, dtype=torch.float64)
        >>> eye = torch.eye(6, dtype=torch.float64)
        >>> torch.allclose(whiten_input_modes(w, eye, 2, ridge=0.0), w * 6**0.5)
        True
    """
    _check_tucker_tensor(tensor)
    in_shape = _check_in_modes(tensor, in_modes)
    _check_gram(gram, math.prod(in_shape))
    dtype = _compute_dtype(tensor, compute_dtype)
    if tensor.device.type == "meta":
        return torch.empty(tensor.shape, device="meta", dtype=dtype)
    _, roots = _input_mode_roots(gram.detach().to(tensor.device), in_shape, ridge, dtype)
    first = tensor.dim() - in_modes
    return _whiten_modes(tensor.detach().to(dtype), roots, first)


def _gram_weighted_core(
    tensor: torch.Tensor,
    out_factors: Sequence[torch.Tensor],
    in_factors: Sequence[torch.Tensor],
    gram: torch.Tensor,
) -> torch.Tensor:
    """Core ``C`` minimising ``||(W - U C B^T) S||_F`` for ``S S^T = gram`` (float64).

    ``U`` and ``B`` are the Kronecker products of the (orthonormal) output and input
    factors, never formed: ``C = (U^T W) G B (B^T G B)^{-1}``, with the Gram's
    products taken mode by mode on its ``in_shape + in_shape`` view.
    """
    first = len(out_factors)
    in_shape = tuple(tensor.shape[first:])
    in_ranks = tuple(f.shape[1] for f in in_factors)
    projected = tensor
    for k, factor in enumerate(out_factors):
        projected = mode_dot(projected, factor.mT, k)
    out_ranks = tuple(projected.shape[:first])
    flat = projected.double().reshape(math.prod(out_ranks), -1)
    wide = gram.reshape(in_shape + in_shape)
    for k, factor in enumerate(in_factors):
        wide = mode_dot(wide, factor.double().mT, len(in_shape) + k)
    gram_b = wide.reshape(math.prod(in_shape), -1)  # G B
    narrow = wide
    for k, factor in enumerate(in_factors):
        narrow = mode_dot(narrow, factor.double().mT, k)
    system = narrow.reshape(gram_b.shape[1], -1)  # B^T G B
    system = (system + system.mT) / 2
    rhs = (flat @ gram_b).mT
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, chol)
    else:
        solution = torch.linalg.pinv(system, hermitian=True) @ rhs
    return solution.mT.reshape(out_ranks + in_ranks)


def whitened_tucker(
    tensor: torch.Tensor,
    gram: torch.Tensor,
    ranks,
    *,
    in_modes: int,
    ridge: float = 1e-6,
    n_iter: int = 30,
    tol: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> TuckerDecomposition:
    """Tucker approximation of a weight tensor minimising the output error on calibration data.

    ``tensor`` is a linear layer's ``(out, in)`` weight seen as ``out_shape + in_shape``
    (the last ``in_modes`` modes take the input). Three steps, none of which forms an
    inverse of a Gram matrix:

    1. :func:`hooi` of :func:`whiten_input_modes` (each input mode multiplied by the
       root of its partial-trace Gram), giving orthonormal output factors ``U_k`` and
       whitened input factors ``V_k``;
    2. each input factor mapped back to the input space as an orthonormal basis of
       ``S_k^{-T} V_k`` (``S_k = E_k diag(d_k)``, so this is ``E_k diag(1/d_k) V_k``;
       directions the data never visits, ``d = 0`` with ``ridge=0``, get 0);
    3. the core refit exactly for the full Gram: ``C = (U^T W) G B (B^T G B)^{-1}``
       with the ridged, normalised Gram ``G`` (Cholesky in float64, pseudo-inverse
       if singular), the optimal core for these factors.

    The mode whitening is exact only for Kronecker-structured Grams, so the factors
    of plain :func:`hooi` at the same ranks, with their core refit the same way,
    compete, and the lower output error wins: the result is never worse on the
    calibration data than plain HOOI (up to the ridge).

    With isotropic inputs (``gram = c I``) this is :func:`hooi` exactly; for the two-mode
    form ``(out,), (in,)`` the input factor spans the leading right singular vectors
    of ``W S`` and the output error reaches the whitened-SVD optimum. Modes kept whole
    get the identity, as in :func:`hooi`.

    Args:
        tensor: ``out_shape + in_shape`` floating tensor on any device (meta included).
        gram: ``(in, in)`` input Gram ``X^T X`` (e.g. ``InputStats.gram``), any float dtype.
        ranks: Multilinear ranks, output modes first, as in :func:`hosvd`.
        in_modes: Number of trailing input modes.
        ridge: Relative ridge of :func:`whitening_root`, also added to the Gram of the
            core refit; ``0`` is allowed (then rank-deficient data is handled by
            pseudo-inverses).
        n_iter: Most HOOI sweeps.
        tol: HOOI stops when a sweep improves the (whitened) error by less.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (default as in :func:`hosvd`).

    Returns:
        :class:`TuckerDecomposition` in ``tensor``'s dtype and device whose ``error``
        is the relative *output* error ``||(W - W') X^T|| / ||W X^T||`` on the
        calibration data (no ridge), ``n_iter`` the HOOI sweeps of the winning factors.

    Raises:
        ValueError: Bad ranks, ``in_modes``, ``ridge`` or Gram shape; NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(6, 4, 6, dtype=torch.float64, generator=g)
        >>> x = torch.randn(40, 3, dtype=torch.float64, generator=g)
        >>> x = x @ torch.randn(3, 24, dtype=torch.float64, generator=g)
        >>> result = whitened_tucker(w, x.T @ x, (6, 4, 3), in_modes=2, ridge=0.0)
        >>> result.error < 1e-6
        True
    """
    ranks, dtype = _tucker_setup(tensor, ranks, compute_dtype)
    in_shape = _check_in_modes(tensor, in_modes)
    _check_gram(gram, math.prod(in_shape))
    if tensor.device.type == "meta":
        _check_ridge(ridge)
        return _meta_tucker(tensor, ranks)
    first = tensor.dim() - in_modes
    work = tensor.detach().to(dtype)
    normalized, roots = _input_mode_roots(gram.detach().to(tensor.device), in_shape, ridge, dtype)
    whitened = _whiten_modes(work, roots, first)
    fitted = hooi(whitened, ranks, n_iter=n_iter, tol=tol, compute_dtype=dtype)
    mapped_in = _unwhitened_input_factors(roots, fitted.factors[first:], in_shape, ranks[first:])
    # The mode whitening only approximates a non-Kronecker Gram, so the plain HOOI
    # factors (with the refit core) compete: the result never loses to plain HOOI.
    plain = hooi(work, ranks, n_iter=n_iter, tol=tol, compute_dtype=dtype)
    candidates = (
        (tuple(fitted.factors[:first]) + tuple(mapped_in), fitted.n_iter),
        (plain.factors, plain.n_iter),
    )
    return _finish(*_best_refit(work, candidates, first, normalized, ridge), tensor.dtype)


def _unwhitened_input_factors(
    roots: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    factors: Sequence[torch.Tensor],
    in_shape: Tuple[int, ...],
    ranks: Tuple[int, ...],
) -> List[torch.Tensor]:
    """Orthonormal bases of ``S_k^{-T} V_k``: the whitened input factors mapped back."""
    mapped_in = []
    for (vectors, values), factor, size, rank in zip(roots, factors, in_shape, ranks):
        dtype = vectors.dtype
        if rank == size:
            mapped_in.append(torch.eye(size, device=vectors.device, dtype=dtype))
            continue
        floor = float(values.max()) * torch.finfo(dtype).eps * size
        inverse = torch.where(
            values > floor, 1.0 / values.clamp_min(floor), torch.zeros_like(values)
        )
        mapped = (vectors * inverse) @ factor
        mapped_in.append(torch.linalg.svd(mapped, full_matrices=False).U)
    return mapped_in


def _best_refit(
    work: torch.Tensor, candidates, first: int, normalized: torch.Tensor, ridge: float
) -> tuple:
    """``(core, factors, output error, sweeps)`` of the candidate whose refit core wins."""
    dtype = work.dtype
    ridged = normalized + ridge * torch.eye(
        normalized.shape[0], device=work.device, dtype=torch.float64
    )
    best = None
    for factors, sweeps in candidates:
        core = _gram_weighted_core(work, factors[:first], factors[first:], ridged).to(dtype)
        approximation = tucker_to_tensor(core, factors).reshape(-1, normalized.shape[0])
        error = relative_output_error(work.reshape(approximation.shape), approximation, normalized)
        if best is None or error < best[2]:
            best = (core, factors, error, sweeps)
    return best


def reduce_tucker(
    core: torch.Tensor,
    factors,
    ranks,
    *,
    n_iter: int = 30,
    tol: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> TuckerDecomposition:
    """Tucker approximation with lower multilinear ranks of a Tucker tensor, from its parts.

    Each factor is orthonormalised (``U_k = Q_k R_k``, ``None`` = identity), the
    ``R_k`` are absorbed into the core, and :func:`hooi` runs on that small core;
    the new factors are ``Q_k`` times the core's factors. Since the ``Q_k`` are
    orthonormal this is exactly HOOI (and its HOSVD start) on the full tensor, which
    is never formed.

    Args:
        core: Core of shape ``r_0 x r_1 x ...``.
        factors: One ``(n_k, r_k)`` factor per mode, or ``None`` (identity, ``n_k = r_k``).
        ranks: New multilinear ranks, each in ``[1, r_k]`` (as :func:`hooi` takes them,
            relative to the full tensor's mode sizes ``n_k``).
        n_iter: Most HOOI sweeps.
        tol: HOOI's stopping threshold.
        compute_dtype: As in :func:`hooi`.

    Returns:
        :class:`TuckerDecomposition` of the full tensor: core of shape ``ranks``,
        orthonormal ``(n_k, ranks[k])`` factors, and the relative error with respect
        to the input Tucker tensor.

    Examples:
        >>> t = torch.randn(6, 5, 4, dtype=torch.float64)
        >>> big = hooi(t, (4, 4, 3))
        >>> small = reduce_tucker(big.core, big.factors, (2, 2, 2))
        >>> full = tucker_to_tensor(big.core, big.factors)
        >>> abs(small.error - hooi(full, (2, 2, 2)).error) < 1e-8
        True
    """
    if not isinstance(core, torch.Tensor):
        raise TypeError(f"core must be a torch.Tensor, got {type(core).__name__}")
    factors = list(factors)
    if len(factors) != core.dim():
        raise ValueError(f"got {len(factors)} factors for a core with {core.dim()} modes")
    sizes = []
    for k, (factor, r) in enumerate(zip(factors, core.shape)):
        if factor is not None and (factor.dim() != 2 or factor.shape[1] != r):
            raise ValueError(
                f"factor {k} must have shape (n, {r}) to match the core, got {tuple(factor.shape)}"
            )
        sizes.append(r if factor is None else factor.shape[0])
    ranks = resolve_tucker_ranks(ranks, tuple(sizes))
    too_big = [(k, r, c) for k, (r, c) in enumerate(zip(ranks, core.shape)) if r > c]
    if too_big:
        raise ValueError(
            f"new ranks must not exceed the current ones (mode, new, current): {too_big}"
        )
    if core.device.type == "meta":
        return _meta_tucker(torch.empty(sizes, device="meta", dtype=core.dtype), ranks)
    compute = _compute_dtype(core, compute_dtype)
    small = core.detach().to(compute)
    bases = []
    for k, factor in enumerate(factors):
        if factor is None:
            bases.append(None)
            continue
        q, r = _orthonormal_basis(factor, compute)
        small = mode_dot(small, r, k)
        bases.append(q)
    result = hooi(small, ranks, n_iter=n_iter, tol=tol)
    new_factors = tuple(
        inner if q is None else q @ inner for q, inner in zip(bases, result.factors)
    )
    dtype = core.dtype
    return TuckerDecomposition(
        result.core.to(dtype),
        tuple(f.to(dtype) for f in new_factors),
        result.error,
        result.n_iter,
    )
