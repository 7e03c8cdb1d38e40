"""Alternating least squares toolkit: the small units a CP (or tensor-train) ALS is made of.

Every ALS fit here alternates regularised least-squares updates of one factor at a time
(:func:`_als_update`, with :func:`_unit_columns` and :func:`_hadamard`) and decides
after each sweep whether to stop (:class:`_WindowedStop`), whether to move beyond the
ALS point (:class:`_Momentum`), and whether the fit degenerates
(:func:`_cancelling_components`, answered by :func:`_raised_ridge`); before the first
sweep it checks its options (:func:`_check_als_options`) and brings the tensor to a
safe scale (:func:`_peak_scaled`). The units keep no reference to a tensor format:
the factors are ``(size_n, rank)`` matrices with unit columns, in float64, and their
``rank x rank`` Gram matrices.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

_CP_MIN_RIDGE_STEP = 1e-4
_CP_MAX_RIDGE = 1e-1
_CP_CANCEL_COSINE = -0.85
_CP_STOP_WINDOW = 5
"""Sweeps over which CP-ALS averages the change of the error for its ``tol`` test."""


def _hadamard(matrices) -> torch.Tensor:
    """Element-wise product of equally shaped matrices, as a new tensor."""
    product = matrices[0] * matrices[1] if len(matrices) > 1 else matrices[0].clone()
    for matrix in matrices[2:]:
        product.mul_(matrix)
    return product


def _raised_ridge(ridge: float) -> float:
    """The ridge after a degeneracy: tenfold, at least ``_CP_MIN_RIDGE_STEP``, at most the cap."""
    return min(max(ridge * 10, _CP_MIN_RIDGE_STEP), _CP_MAX_RIDGE)


def _als_update(mttkrp: torch.Tensor, grams, mode: int, ridge: float, tiny: float):
    """Ridge-regularised normal equations of one factor, in float64.

    Returns ``(column norms, unit-column factor, its Gram matrix)``.
    """
    system = _hadamard([g for other, g in enumerate(grams) if other != mode])
    system.diagonal().add_(ridge * max(float(system.trace()) / system.shape[0], tiny))
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        update = torch.cholesky_solve(mttkrp.T, chol).T
    elif bool(torch.isfinite(system).all()):
        update = (torch.linalg.pinv(system, hermitian=True) @ mttkrp.T).T
    else:
        # A non-finite factor upstream: a NaN update lets the caller's error test see it.
        update = torch.full_like(mttkrp, math.nan)
    return _unit_columns(update)


def _unit_columns(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(column norms, unit-column matrix, its Gram matrix)`` of a float64 matrix.

    The norms come from the Gram matrix's diagonal, which is needed anyway; zero
    columns stay zero.
    """
    gram = matrix.T @ matrix
    norms = gram.diagonal().sqrt()
    # Columns of norm below 1e-150 (their squares near float64's underflow) are left
    # as they are: zero for all practical purposes, and never scaled up.
    safe = norms.clamp_min(1e-150)
    return norms, matrix / safe, gram / torch.outer(safe, safe)


def _cancelling_components(
    weights: torch.Tensor, grams: Sequence[torch.Tensor], diverging_norm: float
) -> bool:
    """The degeneracy guard: whether diverging rank-1 terms cancel each other.

    Degeneracy (Phan et al. 2020): rank-1 terms whose norms grow far beyond the
    tensor's (``weights`` relative to a unit-norm tensor, above ``diverging_norm``)
    while pairs of them point in opposite directions and cancel (congruence, the
    product of the cosines over all modes, below ``_CP_CANCEL_COSINE``).
    """
    big_weight = float(weights.max()) > diverging_norm
    if big_weight and weights.shape[0] > 1:
        congruence = _hadamard(grams)
        congruence.fill_diagonal_(0.0)
        heavy = weights > 1.0
        cancelling = congruence[heavy][:, heavy]
        if cancelling.numel() and float(cancelling.min()) < _CP_CANCEL_COSINE:
            return True
    return False


class _WindowedStop:
    """The stop rule: the fit's change per sweep, averaged over the last few sweeps, is small.

    Change per sweep, averaged over a window of up to ``_CP_STOP_WINDOW`` sweeps, of the
    explained share of the tensor's energy (``||T|| = 1``), which decides for poor fits,
    and of the error relative to itself at ``10 * tol``, which decides for close ones.
    Changes count either way: the error rises while a momentum overshoot or a raised
    ridge is being recovered from, which is no sign of convergence.
    """

    def __init__(self, tol: float, tiny: float) -> None:
        self.tol = tol
        self.tiny = tiny
        self.history: List[float] = []

    def reset(self) -> None:
        """Forget the errors seen so far (the fit restarts from another point)."""
        self.history.clear()

    def stalled(self, error: float, guard_fired: bool) -> bool:
        """Record the error of the latest sweep; whether the fit stopped moving."""
        history = self.history
        history.append(error)
        window = min(len(history) - 1, _CP_STOP_WINDOW)
        earlier = history[-1 - window]
        return (
            window > 0
            and not guard_fired
            and abs(earlier**2 - error**2) <= window * self.tol
            and abs(earlier - error) <= 10 * window * self.tol * max(earlier, self.tiny)
        )


class _Momentum:
    """The extrapolation step: Nesterov-type momentum with restart.

    Mitchell, Ye & De Sterck 2020: the next sweep starts beyond this ALS point, away
    from the previous one, by ``(k - 1) / (k + 2)`` of the step after ``k`` sweeps in
    a row whose error did not rise; a sweep whose error rose restarts the count (no
    momentum). Only the factors of ``moved`` modes move (the first mode a sweep
    updates does not depend on its own previous value).
    """

    def __init__(self, moved: Sequence[int]) -> None:
        self.moved = list(moved)
        self.reset()

    def reset(self) -> None:
        """Forget the previous point, its error and the count (a restart from elsewhere)."""
        self.previous_units, self.previous_error, self.steps = None, math.inf, 0

    def forget_direction(self) -> None:
        """Drop the previous point and the count: the direction predates a stronger ridge."""
        self.previous_units, self.steps = None, 0

    def step(self, units: List[torch.Tensor], error: float) -> List[int]:
        """Move ``units`` (in place, rebinding entries) beyond this ALS point; the modes moved."""
        point = list(units)
        moved: List[int] = []
        if self.previous_units is not None and error <= self.previous_error:
            self.steps += 1
            beta = (self.steps - 1) / (self.steps + 2)
            moved = self.moved if beta > 0 else []
            for n in moved:
                units[n] = torch.lerp(self.previous_units[n], point[n], 1.0 + beta)
        else:
            self.steps = 0
        self.previous_units, self.previous_error = point, error
        return moved


def _check_als_options(n_iter: int, tol: float, ridge: float, diverging_norm: float) -> None:
    """Raise unless the options of an ALS fit (sweeps, tolerance, ridge, guard) are in range."""
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0:
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    if (
        isinstance(ridge, bool)
        or not isinstance(ridge, (int, float))
        or not (math.isfinite(ridge) and 0.0 <= ridge <= _CP_MAX_RIDGE)
    ):
        raise ValueError(f"ridge must be a number in [0, {_CP_MAX_RIDGE}], got {ridge!r}")
    if (
        isinstance(diverging_norm, bool)
        or not isinstance(diverging_norm, (int, float))
        or not (math.isfinite(diverging_norm) and diverging_norm > 1.0)
    ):
        raise ValueError(f"diverging_norm must be a finite number > 1, got {diverging_norm!r}")


def _peak_scaled(tensor: torch.Tensor, dtype: torch.dtype):
    """``(data, peak, norm)``: ``tensor`` in ``dtype`` divided by its peak magnitude (if any).

    ``norm`` is the norm of ``tensor`` itself, computed from the scaled data.
    """
    data = tensor.detach().to(dtype)
    # Two-step scaling (max, then norm) so that the norm neither overflows nor
    # underflows in float32 for kernels of extreme magnitude.
    peak = data.abs().amax()
    if float(peak) > 0.0:
        data = data / peak
    scale = float(data.norm().double()) * float(peak)
    return data, peak, scale
