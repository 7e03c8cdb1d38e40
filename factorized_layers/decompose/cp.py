"""CP (CANDECOMP/PARAFAC) decompositions of N-way tensors by alternating least squares.

CP-ALS (:func:`cp_als`, :func:`cp_factors` with the weights spread over the
factors), its data-aware variant :func:`whitened_cp_factors` (in the metric of
:func:`.whiten.whiten_mode`) and :func:`reduce_cp`, which lowers the rank of a CP
tensor from its factors. The format and the MTTKRP contractions are in
:mod:`.cp_format`, the sweep loop is here; the ALS units it drives (update, stop rule,
momentum, degeneracy guard) are in :mod:`.als`.
"""

from __future__ import annotations

import inspect
import math
from typing import List

import torch

from ..ranks import RankSpec, resolve_cp_rank
from ._common import _compute_dtype
from .als import (
    _CP_MAX_RIDGE,
    _als_update,
    _cancelling_components,
    _check_als_options,
    _hadamard,
    _Momentum,
    _peak_scaled,
    _raised_ridge,
    _WindowedStop,
)
from .cp_format import (
    CPDecomposition,
    _check_cp_tensor,
    _GroupContraction,
    _mode_groups,
    _mttkrp_from_partial,
    cp_to_tensor,
)
from .whiten import whiten_mode


def _cp_svd_init(tensor: torch.Tensor, rank: int, generator: torch.Generator) -> list:
    """Leading left singular vectors of each unfolding (HOSVD), random columns beyond.

    The singular vectors come from the eigenvectors of the unfolding's Gram matrix
    (one threaded GEMM, then a small single-threaded ``eigh`` in float64), which
    avoids an SVD of the long unfolding.
    """
    factors = []
    for mode, size in enumerate(tensor.shape):
        unfolding = tensor.movedim(mode, 0).reshape(size, -1)
        gram = (unfolding @ unfolding.T).double()
        _, vectors = torch.linalg.eigh(gram)
        keep = min(size, unfolding.shape[1])
        U = vectors.flip(-1)[:, : min(rank, keep)].to(tensor.dtype)
        if U.shape[1] < rank:
            extra = torch.randn(
                size, rank - U.shape[1], generator=generator, device=tensor.device
            ).to(tensor.dtype)
            U = torch.cat([U, extra / extra.norm(dim=0).clamp_min(1e-30)], dim=1)
        factors.append(U)
    return factors


def _cp_sweep(groups, factors: list, units: list, grams: list, ridge: float, tiny: float):
    """One ALS sweep: each factor solves its normal equations, updating the lists in place.

    Returns the new weights and the sweep's last MTTKRP with its mode.
    """
    for plan in groups:
        partial = plan.partial(factors)
        for mode in plan.group:
            mttkrp = _mttkrp_from_partial(partial, plan.group, factors, mode).double()
            weights, units[mode], grams[mode] = _als_update(mttkrp, grams, mode, ridge, tiny)
            factors[mode] = units[mode].to(factors[mode].dtype)
    return weights, mttkrp, mode


def _sweep_error(data, factors, units, grams, weights, mttkrp, mode: int) -> float:
    """The relative error after a sweep (``||data|| = 1``), estimated or, when small, exact.

    ||T - X||^2 = 1 - 2 <T, X> + ||X||^2 (||T|| = 1) from the last MTTKRP and
    the Gram matrices: no reconstruction. It loses digits by cancellation for
    close fits, so below a 3% error the residual is formed exactly. A non-finite
    entry of any factor reaches a Gram matrix or the MTTKRP, hence the error.
    """
    inner = float((mttkrp * units[mode]).sum(0) @ weights)
    squared = 1.0 - 2.0 * inner + float(weights @ _hadamard(grams) @ weights)
    if squared < 1e-3:
        return float((data - cp_to_tensor(weights.to(data.dtype), factors)).norm())
    return math.sqrt(squared)


def _cp_sweeps(
    data: torch.Tensor,
    factors: list,
    ridge: float,
    *,
    n_iter: int,
    tol: float,
    diverging_norm: float,
    extrapolate: bool,
):
    """The ALS loop on a unit-norm tensor from initial ``factors`` (compute dtype).

    Returns ``(best, sweeps, converged, degenerate, ridge)`` with ``best`` the
    ``(error, weights, units)`` of the best iterate (float64).
    """
    dtype = data.dtype
    # Small R x R algebra (Gram matrices, solves) and the factors' master copies
    # (``units``: unit columns at every ALS point, moved by the momentum step in
    # between) are float64; ``factors`` are their copies in the compute dtype for
    # the tensor-sized contractions.
    units = [f.double() for f in factors]
    grams = [u.T @ u for u in units]
    weights = torch.ones(factors[0].shape[1], device=data.device, dtype=torch.float64)
    tiny = torch.finfo(dtype).eps
    degenerate = converged = False
    best = (math.inf, weights, list(units))
    groups = [_GroupContraction(data, group) for group in _mode_groups(data.shape)]
    # The first mode a sweep updates does not depend on its own previous value, so
    # the momentum step moves only the others.
    momentum = _Momentum([n for n in range(data.dim()) if n != groups[0].group[0]])
    stop = _WindowedStop(tol, tiny)
    sweeps = 0
    for sweep in range(1, n_iter + 1):
        sweeps = sweep
        weights, mttkrp, mode = _cp_sweep(groups, factors, units, grams, ridge, tiny)
        error = _sweep_error(data, factors, units, grams, weights, mttkrp, mode)
        if not math.isfinite(error):
            # A non-finite update: go back to the best iterate with a stronger ridge.
            degenerate, ridge = True, _raised_ridge(ridge)
            _, weights, units = best[0], best[1], list(best[2])
            factors = [u.to(dtype) for u in units]
            grams = [u.T @ u for u in units]
            momentum.reset()
            stop.reset()
            continue
        if error < best[0]:
            # No copies: every update below rebinds, none writes in place.
            best = (error, weights, list(units))
        guard_fired = _cancelling_components(weights, grams, diverging_norm)
        if guard_fired:
            degenerate, ridge = True, _raised_ridge(ridge)
            # The momentum direction predates the stronger ridge.
            momentum.forget_direction()
        stalled = stop.stalled(error, guard_fired)
        # "Exact": within a few roundings, or within the ridge's own bias.
        if error <= 10 * max(tiny, ridge) or stalled:
            converged = True
            break
        if extrapolate and sweep < n_iter:
            for n in momentum.step(units, error):
                factors[n] = units[n].to(dtype)
                grams[n] = units[n].T @ units[n]
    return best, sweeps, converged, degenerate, ridge


def _cp_als_fit(
    tensor: torch.Tensor,
    rank: RankSpec,
    *,
    n_iter: int = 100,
    tol: float = 1e-5,
    seed: int | None = None,
    ridge: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    diverging_norm: float = 10.0,
    extrapolate: bool = True,
) -> CPDecomposition:
    """:func:`cp_als` in the compute dtype: checks, scaling, HOSVD start, then the ALS loop."""
    _check_cp_tensor(tensor)
    _check_als_options(n_iter, tol, ridge, diverging_norm)
    shape = tuple(tensor.shape)
    r = resolve_cp_rank(rank, shape)
    dtype = _compute_dtype(tensor, compute_dtype)

    if tensor.device.type == "meta":
        meta = dict(device=tensor.device, dtype=dtype)
        return CPDecomposition(
            torch.empty(r, **meta),
            tuple(torch.empty(size, r, **meta) for size in shape),
            float("nan"),
            0,
            False,
            False,
            float(ridge),
        )

    data, peak, scale = _peak_scaled(tensor, dtype)
    generator = torch.Generator(device=data.device).manual_seed(0 if seed is None else int(seed))
    if float(peak) == 0.0:
        factors = _cp_svd_init(data, r, generator)
        return CPDecomposition(
            torch.zeros(r, device=data.device, dtype=dtype),
            tuple(factors),
            0.0,
            0,
            True,
            False,
            float(ridge),
        )
    # Work on the unit-norm tensor: weights are then O(1) for a healthy fit, which
    # makes the degeneracy thresholds scale-free and avoids fp32 over/underflow.
    data = data / data.norm()
    factors = _cp_svd_init(data, r, generator)
    best, sweeps, converged, degenerate, current_ridge = _cp_sweeps(
        data,
        factors,
        float(ridge),
        n_iter=n_iter,
        tol=tol,
        diverging_norm=diverging_norm,
        extrapolate=extrapolate,
    )
    _, weights, units = best
    weights = weights.to(dtype)
    factors = [u.to(dtype) for u in units]
    # The exact error of the returned iterate (the loop may have used the estimate).
    error = float((data - cp_to_tensor(weights, factors)).norm())
    return CPDecomposition(
        weights * scale,
        tuple(factors),
        float(error),
        sweeps,
        converged,
        degenerate,
        current_ridge,
    )


def cp_als(
    tensor: torch.Tensor,
    rank: RankSpec,
    *,
    n_iter: int = 100,
    tol: float = 1e-5,
    seed: int | None = None,
    ridge: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    diverging_norm: float = 10.0,
    extrapolate: bool = True,
) -> CPDecomposition:
    """CP (CANDECOMP/PARAFAC) decomposition of an N-way tensor by alternating least squares.

    Finds ``weights`` and unit-column ``factors`` with
    ``tensor ~= sum_r weights[r] * factors[0][:, r] o ... o factors[N-1][:, r]``.

    * **Initialisation**: leading left singular vectors of every unfolding (HOSVD);
      only when ``rank`` exceeds a mode's size are the remaining columns random
      (seeded by ``seed``, the global random state is not touched).
    * **Sweeps**: each factor solves its normal equations (Hadamard product of the
      other factors' Gram matrices plus ``ridge`` times its mean diagonal, Cholesky in
      float64) against the MTTKRP. The modes form two groups; per group one GEMM of
      the tensor's unfolding with the Khatri--Rao product of the other group's
      factors serves every mode of the group, whose MTTKRPs follow by rank-wise
      broadcast products. The columns are then normalised into ``weights``.
    * **Momentum** (``extrapolate=True``; Nesterov-type acceleration of ALS with
      restart, Mitchell, Ye & De Sterck 2020): after ``k`` sweeps in a row whose
      error did not rise, the next sweep starts ``(k - 1) / (k + 2)`` of the last
      step beyond the ALS point (the factors but the first-updated one move); a
      sweep whose error rose, or a raised ridge, restarts the count. It needs no
      extra error evaluation. On default-initialised 128x64x3x3 kernels (ranks
      30--120), a 256x256x3x3 kernel (rank 113) and two kernels of the trained
      digits CNN it reached the error of 100 plain sweeps in 32--39 sweeps.
    * **Stopping**: when, on average over the last 5 sweeps, a sweep changes the
      explained share of the tensor's energy by less than ``tol`` (the squared
      relative error ``e**2`` moves by less than ``tol``) and ``e`` by less than
      ``10 * tol`` of itself -- changes count either way, since ``e`` rises while
      a momentum overshoot or a raised ridge is recovered from; when the fit is
      exact to working precision (relative error below ten times the larger of the
      dtype's epsilon and the ridge, whose bias is of that order -- pass
      ``ridge=0`` to fit exact tensors further); or after ``n_iter`` sweeps. The
      energy test decides for poor fits, whose error moves little per sweep
      although each sweep still adds a fair share of what the fit explains; the
      relative test lets close fits converge fully.
    * **Degeneracy guard**: when rank-1 terms grow to more than ``diverging_norm``
      times the tensor's norm while two of them have congruence (product of cosines over all modes)
      below -0.85 -- the diverging, cancelling components of a degenerate CP fit --
      or an update turns non-finite, the ridge is raised tenfold (from at least
      1e-4, at most 0.1), ``degenerate`` is reported, and the best iterate seen is
      returned.

    Memory stays within a small multiple of the tensor for ranks up to its mode
    sizes: one unfolded copy of it per group of modes; Khatri--Rao products and
    partial contractions of ``rank`` times the product of one group's sizes (for a
    ``(C_out, C_in, k, k)`` kernel, ``rank * C * k`` entries); and, for the exact
    error at the end and below a 3% error, one reconstruction whose Khatri--Rao
    product holds ``numel * rank / max(shape)`` entries.

    Args:
        tensor: Floating tensor with at least 2 modes, on any device (meta included).
        rank: ``int`` rank or ``float`` parameter fraction, see
            :func:`factorized_layers.ranks.resolve_cp_rank`.
        n_iter: Maximum number of ALS sweeps (``>= 1``).
        tol: Stop when ``|e_{k-w}**2 - e_k**2| <= w * tol`` and
            ``|e_{k-w} - e_k| <= 10 * w * tol * e_{k-w}`` for the relative error ``e``
            after sweep ``k``, over the last ``w = min(k - 1, 5)`` sweeps (``0``:
            run ``n_iter`` sweeps unless the fit is exact).
        seed: Seed of the random columns used when ``rank`` exceeds a mode size
            (default 0: reproducible by default).
        ridge: Relative Tikhonov term of the normal equations, in ``[0, 0.1]``.
        compute_dtype: ``torch.float32`` or ``torch.float64``; default float64 for
            float64 input, float32 otherwise (so fp16/bf16 tensors are upcast).
        diverging_norm: Weight, relative to the tensor's norm, above which a rank-1
            term counts as diverging for the degeneracy guard (default 10).
        extrapolate: Start each sweep with the momentum step (default ``True``).

    Returns:
        :class:`CPDecomposition` with weights and factors in ``tensor``'s dtype, on
        ``tensor``'s device, plus the relative error, sweeps, convergence and
        degeneracy flags, and the final ridge.

    Raises:
        ValueError: Bad rank, fewer than 2 modes, empty or NaN/Inf input, bad options.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 5, 4)]
        >>> tensor = torch.einsum("ir,jr,kr->ijk", *factors)
        >>> result = cp_als(tensor, 3, tol=0.0, n_iter=500)
        >>> result.weights.shape, [f.shape[0] for f in result.factors]
        (torch.Size([3]), [6, 5, 4])
        >>> result.error < 1e-6
        True
    """
    result = _cp_als_fit(
        tensor,
        rank,
        n_iter=n_iter,
        tol=tol,
        seed=seed,
        ridge=ridge,
        compute_dtype=compute_dtype,
        diverging_norm=diverging_norm,
        extrapolate=extrapolate,
    )
    return result._replace(
        weights=result.weights.to(tensor.dtype),
        factors=tuple(f.to(tensor.dtype) for f in result.factors),
    )


def cp_factors(tensor: torch.Tensor, rank: RankSpec, **als_options) -> CPDecomposition:
    """CP-ALS with the weights spread evenly over the factors (``weights`` all ones).

    Each factor's column ``r`` is scaled by ``weights[r] ** (1 / N)`` in the compute
    dtype before the cast back, which keeps every factor on the same scale (like
    :func:`low_rank_factors` splitting the singular values) so that
    ``cp_to_tensor(None, result.factors)`` approximates ``tensor``.

    Args:
        tensor: N-way tensor.
        rank: Rank spec, as in :func:`cp_als`.
        **als_options: Passed to :func:`cp_als`.

    Returns:
        :class:`CPDecomposition` whose ``weights`` are ones and whose factors carry
        the scale.

    Examples:
        >>> t = torch.randn(4, 3, 2, dtype=torch.float64)
        >>> res = cp_factors(t, 6, n_iter=300, tol=0.0)
        >>> res.error < 0.05, torch.allclose(res.weights, torch.ones(6, dtype=t.dtype))
        (True, True)
    """
    result = _cp_als_fit(tensor, rank, **als_options)
    root = result.weights.clamp_min(0) ** (1.0 / len(result.factors))
    return result._replace(
        weights=torch.ones_like(result.weights).to(tensor.dtype),
        factors=tuple((f * root).to(tensor.dtype) for f in result.factors),
    )


def whitened_cp_factors(
    tensor: torch.Tensor,
    gram: torch.Tensor,
    rank: RankSpec,
    *,
    mode: int = 1,
    whitening_ridge: float = 1e-6,
    **als_options,
) -> CPDecomposition:
    """CP factors fitted in the metric of one mode's input Gram (data-aware CP).

    For a convolution kernel ``(out, in, kh, kw)`` and the Gram of the input channels
    over every batch element and position, the error of each input-channel direction
    counts as much as the data visits it (a dead channel costs nothing). Steps:

    1. CP-ALS (:func:`cp_als`) of :func:`whiten_mode` ``(tensor, gram, mode)``;
    2. back to the original space without inverting the Gram: the ``mode`` factor is
       refit by least squares against ``tensor`` with the other factors fixed. For an
       invertible whitening root this is the same minimiser as in the whitened
       metric (``S^{-T}`` times the whitened one), and directions the data never
       visits get the plain least-squares fit of the weights instead of an amplified
       one;
    3. the weights spread evenly over the factors, as in :func:`cp_factors`.

    With an identity (or all-zero) Gram this is :func:`cp_factors` followed by one
    least-squares refit of ``mode``, which never raises the fit error.

    Args:
        tensor: Floating tensor with at least 2 modes, on any device (meta included).
        gram: ``(n, n)`` Gram matrix of the data along ``mode`` (``n = tensor.shape[mode]``).
        rank: Rank spec, as in :func:`cp_als`.
        mode: The data mode (1, input channels, for a convolution kernel).
        whitening_ridge: Relative ridge of :func:`whitening_root`.
        **als_options: ``n_iter``, ``tol``, ``seed``, ``ridge``, ``compute_dtype``,
            ``diverging_norm`` of :func:`cp_als`.

    Returns:
        :class:`CPDecomposition` with ``weights`` all ones, factors in ``tensor``'s
        dtype, and ``error`` the relative error in the whitened metric
        ``||(T - T') x_mode S^T|| / ||T x_mode S^T||``.

    Raises:
        ValueError: Bad rank, mode, ridge, options or Gram shape; NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> kernel = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
        >>> x = torch.randn(40, 2, generator=g, dtype=torch.float64)
        >>> x = x @ torch.randn(2, 5, generator=g, dtype=torch.float64)  # 2 live directions
        >>> result = whitened_cp_factors(kernel, x.T @ x, 18, n_iter=500, tol=0.0)
        >>> result.error < 1e-3
        True
    """
    _check_cp_tensor(tensor)
    whitened = whiten_mode(
        tensor,
        gram,
        mode,
        ridge=whitening_ridge,
        compute_dtype=als_options.get("compute_dtype"),
    )
    if tensor.device.type == "meta":
        return cp_factors(tensor, rank, **als_options)
    fit = _cp_als_fit(whitened, rank, **als_options)
    work = tensor.detach().to(whitened.dtype)
    # The caller's ridge, not fit.ridge: the degeneracy guard may have raised that one
    # (up to 0.1), which would bias this exact least-squares refit.
    refit_ridge = als_options.get(
        "ridge", inspect.signature(_cp_als_fit).parameters["ridge"].default
    )
    factors = _refit_balanced(work, fit.factors, mode, refit_ridge)
    error = _whitened_error(whitened, work, factors, gram, mode, whitening_ridge)
    return fit._replace(
        weights=torch.ones(len(fit.weights), device=work.device, dtype=tensor.dtype),
        factors=tuple(f.to(tensor.dtype) for f in factors),
        error=error,
    )


def _refit_balanced(work: torch.Tensor, factors, mode: int, ridge: float) -> List[torch.Tensor]:
    """Refit ``mode``'s factor by least squares against ``work``; spread the weights evenly."""
    dtype = work.dtype
    factors = list(factors)
    mttkrp = _GroupContraction(work, (mode,)).partial(factors).double()
    grams = [f.double().mT @ f.double() for f in factors]
    weights, unit, _ = _als_update(mttkrp, grams, mode, ridge, torch.finfo(dtype).eps)
    factors[mode] = unit.to(dtype)
    root = weights.clamp_min(0) ** (1.0 / len(factors))
    return [f * root.to(dtype) for f in factors]


def _whitened_error(
    whitened: torch.Tensor, work: torch.Tensor, factors, gram, mode: int, ridge: float
) -> float:
    """``||(T - T') x_mode S^T|| / ||T x_mode S^T||`` for ``whitened = T x_mode S^T``."""
    reference = float(whitened.double().norm())
    if reference == 0.0:
        return 0.0
    residual = whiten_mode(
        work - cp_to_tensor(None, factors),
        gram,
        mode,
        ridge=ridge,
        compute_dtype=work.dtype,
    )
    return float(residual.double().norm()) / reference


def reduce_cp(
    factors,
    rank: int,
    *,
    n_iter: int = 100,
    tol: float = 1e-7,
    ridge: float = 1e-9,
) -> CPDecomposition:
    """Rank-``rank`` CP approximation of a CP tensor ``[[A_0, ..., A_{N-1}]]``, from its factors.

    ALS on the Kruskal tensor itself: the MTTKRP of mode ``n`` is
    ``A_n (*_{m != n} A_m^T B_m)`` and the error follows from the Gram matrices,
    so every step costs ``O(sum_k n_k R r)`` and the full tensor is never formed.
    It starts from the ``rank`` components of largest norm (so the result is never
    worse than dropping the others) and keeps the best iterate. All algebra runs in
    float64 (the matrices are small).

    Args:
        factors: ``N >= 2`` factors ``(n_k, R)`` with the component weights absorbed.
        rank: New rank in ``[1, R]``.
        n_iter: Most ALS sweeps (``>= 1``).
        tol: Stop when the relative error changes by less than ``tol`` (relative).
        ridge: Relative Tikhonov term of the normal equations, in ``[0, 0.1]``.

    Returns:
        :class:`CPDecomposition` with the weights spread evenly over the factors
        (``weights`` all ones, as :func:`cp_factors`), the relative error with respect
        to the input CP tensor, sweeps run and whether it converged.

    Examples:
        >>> big = cp_factors(torch.randn(5, 4, 3, dtype=torch.float64), 8)
        >>> small = reduce_cp(big.factors, 3)
        >>> full = cp_to_tensor(None, big.factors)
        >>> fit = (full - cp_to_tensor(None, small.factors)).norm() / full.norm()
        >>> abs(float(fit) - small.error) < 1e-8
        True
    """
    factors = list(factors)
    _check_reduce_cp(factors, rank, n_iter, ridge)
    dtype, device = factors[0].dtype, factors[0].device
    if device.type == "meta":
        return CPDecomposition(
            torch.ones(rank, device=device, dtype=dtype),
            tuple(torch.empty(f.shape[0], rank, device=device, dtype=dtype) for f in factors),
            math.nan,
            0,
            False,
            False,
            float(ridge),
        )
    source, strength, norm_squared = _kruskal_source(factors)
    if norm_squared <= 0.0:
        zero = tuple(torch.zeros(f.shape[0], rank, device=device, dtype=dtype) for f in factors)
        return CPDecomposition(
            torch.ones(rank, device=device, dtype=dtype), zero, 0.0, 0, True, False, float(ridge)
        )
    keep = strength.argsort(descending=True)[:rank]
    approx = [f[:, keep].clone() for f in source]
    weights = strength[keep].clone()
    best, sweeps, converged = _kruskal_als(
        source, strength, norm_squared, approx, weights, n_iter=n_iter, tol=tol, ridge=ridge
    )
    error, weights, approx = best
    root = weights.clamp_min(0) ** (1.0 / len(approx))
    return CPDecomposition(
        torch.ones(rank, device=device, dtype=dtype),
        tuple((a * root).to(dtype) for a in approx),
        error,
        sweeps,
        converged,
        False,
        float(ridge),
    )


def _check_reduce_cp(factors: list, rank: int, n_iter: int, ridge: float) -> None:
    """Raise unless ``factors`` are >= 2 matrices of one column count and the options fit."""
    if len(factors) < 2 or any(not isinstance(f, torch.Tensor) or f.dim() != 2 for f in factors):
        raise ValueError("factors must be at least two 2-D tensors (n_k, R)")
    current = factors[0].shape[1]
    if any(f.shape[1] != current for f in factors):
        raise ValueError(
            f"factors must share their column count, got {[tuple(f.shape) for f in factors]}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= current:
        raise ValueError(f"rank must be an int in [1, {current}], got {rank!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if not 0.0 <= ridge <= _CP_MAX_RIDGE:
        raise ValueError(f"ridge must be a number in [0, {_CP_MAX_RIDGE}], got {ridge!r}")


def _kruskal_source(factors: list):
    """``(unit-column float64 factors, component strengths, squared norm)`` of a CP tensor."""
    source = [f.detach().double() for f in factors]
    for k, f in enumerate(source):
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"factor {k} contains NaN/Inf values")
    # Normalise: source components have unit columns times `strength`.
    norms = torch.stack([f.norm(dim=0) for f in source])
    strength = norms.prod(dim=0)
    source = [f / torch.where(n > 0, n, torch.ones_like(n)) for f, n in zip(source, norms)]
    norm_squared = float(strength @ _hadamard([f.T @ f for f in source]) @ strength)
    return source, strength, norm_squared


def _kruskal_error(source, strength, norm_squared: float, weights: torch.Tensor, approx) -> float:
    """Relative error of the CP tensor ``(weights, approx)`` to the source, from Gram matrices."""
    cross = _hadamard([f.T @ a for f, a in zip(source, approx)])
    own = _hadamard([a.T @ a for a in approx])
    squared = (
        norm_squared - 2.0 * float(strength @ cross @ weights) + float(weights @ own @ weights)
    )
    return math.sqrt(max(squared, 0.0) / norm_squared)


def _kruskal_als(
    source, strength, norm_squared: float, approx, weights, *, n_iter: int, tol: float, ridge: float
):
    """ALS of ``(weights, approx)`` against the source CP tensor: ``(best, sweeps, converged)``."""
    grams = [f.T @ f for f in approx]
    tiny = torch.finfo(torch.float64).eps
    best = (
        _kruskal_error(source, strength, norm_squared, weights, approx),
        weights.clone(),
        [a.clone() for a in approx],
    )
    previous, sweeps, converged = best[0], 0, False
    for sweep in range(1, n_iter + 1):
        sweeps = sweep
        for mode in range(len(source)):
            cross = _hadamard(
                [f.T @ a for other, (f, a) in enumerate(zip(source, approx)) if other != mode]
            )
            mttkrp = source[mode] @ (strength[:, None] * cross)
            weights, approx[mode], grams[mode] = _als_update(mttkrp, grams, mode, ridge, tiny)
        error = _kruskal_error(source, strength, norm_squared, weights, approx)
        if not math.isfinite(error):
            break
        if error < best[0]:
            best = (error, weights.clone(), [a.clone() for a in approx])
        if abs(previous - error) <= tol * max(previous, tiny) or error <= 10 * tiny:
            converged = True
            break
        previous = error
    return best, sweeps, converged
