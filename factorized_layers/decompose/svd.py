"""Truncated SVD of matrices: the low-rank family's decompositions.

:func:`truncated_svd` (full or randomized, :func:`choose_svd_method`), the balanced
factors :func:`low_rank_factors`, the Eckart--Young error :func:`svd_tail_error`, and
:func:`reduce_low_rank`, which lowers the rank of factors ``B @ A`` without forming
the product; :func:`relative_output_error` measures an approximation's error on
calibration data. The data-aware (whitened) truncations live in :mod:`.whiten`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

from ..ranks import RankSpec, resolve_matrix_rank
from ._common import _check_matrix, _compute_dtype, _orthonormal_basis, _resolve_seed, _seeded

_METHODS = ("auto", "full", "randomized")


class TruncatedSVD(NamedTuple):
    """Leading singular triplets: ``weight ~= U @ diag(S) @ Vh``."""

    U: torch.Tensor
    """``(rows, rank)`` left singular vectors."""
    S: torch.Tensor
    """``(rank,)`` singular values, descending."""
    Vh: torch.Tensor
    """``(rank, cols)`` right singular vectors (transposed)."""


def choose_svd_method(rows: int, cols: int, rank: int, oversample: int) -> str:
    """The SVD algorithm ``method='auto'`` uses for a ``rows x cols`` matrix.

    The randomized range finder costs ``O(rows * cols * q)`` per pass with
    ``q = rank + oversample``, the full SVD ``O(rows * cols * min(rows, cols))``
    with a larger constant. Measured on 2 CPU cores (benchmarks/README.md), the
    randomized path wins once the smaller side is at least 512 and ``q`` is at most
    a third of it; below that the full SVD is both fast and exact.
    """
    small = min(rows, cols)
    if small >= 512 and 3 * (rank + oversample) <= small:
        return "randomized"
    return "full"


def _default_oversample(rank: int) -> int:
    """Default extra range-finder columns of the randomized SVD: ``max(10, rank // 10)``."""
    return max(10, rank // 10)


def _svd_in_compute_dtype(
    weight: torch.Tensor,
    rank: RankSpec,
    *,
    method: str = "auto",
    oversample: int | None = None,
    n_iter: int = 4,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> TruncatedSVD:
    """:func:`truncated_svd` before the cast back: the triplets in the compute dtype."""
    _check_matrix(weight)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    rows, cols = weight.shape
    r = resolve_matrix_rank(rank, rows, cols)
    if oversample is None:
        oversample = _default_oversample(r)
    elif isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be a non-negative integer, got {oversample!r}")
    dtype = _compute_dtype(weight, compute_dtype)

    if weight.device.type == "meta":
        meta = dict(device=weight.device, dtype=dtype)
        return TruncatedSVD(
            torch.empty(rows, r, **meta), torch.empty(r, **meta), torch.empty(r, cols, **meta)
        )

    if method == "auto":
        method = choose_svd_method(rows, cols, r, oversample)
    matrix = weight.detach().to(dtype)
    q = min(r + oversample, rows, cols)
    if method == "randomized" and q < min(rows, cols):
        with _seeded(matrix.device, _resolve_seed(seed, generator)):
            U, S, V = torch.svd_lowrank(matrix, q=q, niter=n_iter)
        return TruncatedSVD(U[:, :r], S[:r], V[:, :r].mT)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return TruncatedSVD(U[:, :r], S[:r], Vh[:r])


def truncated_svd(
    weight: torch.Tensor,
    rank: RankSpec,
    *,
    method: str = "auto",
    oversample: int | None = None,
    n_iter: int = 4,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> TruncatedSVD:
    """Best rank-``rank`` approximation ``U diag(S) Vh`` of a matrix (Eckart--Young).

    Args:
        weight: ``(rows, cols)`` floating-point matrix, on any device (meta included).
        rank: ``int`` rank or ``float`` parameter fraction, see
            :func:`factorized_layers.ranks.resolve_matrix_rank`.
        method: ``'full'`` (``torch.linalg.svd``, exact), ``'randomized'``
            (``torch.svd_lowrank``: Gaussian range finder with ``oversample`` extra
            columns and ``n_iter`` power iterations), or ``'auto'``
            (:func:`choose_svd_method`).
        oversample: Extra range-finder columns; default ``max(10, rank // 10)``.
        n_iter: Power iterations of the randomized path (more = closer to optimal).
        seed: Seed of the randomized path (default 0: reproducible by default). The
            global random state is not touched.
        generator: Alternative to ``seed``: one seed is drawn from it.
        compute_dtype: ``torch.float32`` or ``torch.float64``; default float64 for
            float64 input, float32 otherwise (so fp16/bf16 weights are upcast).

    Returns:
        :class:`TruncatedSVD` with ``U (rows, r)``, ``S (r,)``, ``Vh (r, cols)`` in
        ``weight``'s dtype, on ``weight``'s device.

    Raises:
        ValueError: Bad rank, non-2-D input, NaN/Inf values, unknown method.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> w = torch.randn(64, 32)
        >>> U, S, Vh = truncated_svd(w, 8)
        >>> (U.shape, S.shape, Vh.shape)
        (torch.Size([64, 8]), torch.Size([8]), torch.Size([8, 32]))
    """
    U, S, Vh = _svd_in_compute_dtype(
        weight,
        rank,
        method=method,
        oversample=oversample,
        n_iter=n_iter,
        seed=seed,
        generator=generator,
        compute_dtype=compute_dtype,
    )
    return TruncatedSVD(U.to(weight.dtype), S.to(weight.dtype), Vh.to(weight.dtype))


def low_rank_factors(
    weight: torch.Tensor,
    rank: RankSpec,
    **svd_options,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation.

    ``B = U sqrt(S)`` and ``A = sqrt(S) Vh``: splitting the singular values evenly
    keeps both factors on the same scale, which helps fp16/bf16 range and makes
    gradient steps on either factor comparable. The split happens in the compute
    dtype, before the cast back to ``weight.dtype``.

    Args:
        weight: ``(rows, cols)`` matrix.
        rank: Rank spec, as in :func:`truncated_svd`.
        **svd_options: Passed to :func:`truncated_svd`.

    Returns:
        ``(B, A)`` of shapes ``(rows, r)`` and ``(r, cols)`` in ``weight``'s dtype.

    Examples:
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> B, A = low_rank_factors(w, 4)
        >>> torch.allclose(B @ A, w)
        True
    """
    U, S, Vh = _svd_in_compute_dtype(weight, rank, **svd_options)
    root = S.sqrt()
    return (U * root).to(weight.dtype), (root[:, None] * Vh).to(weight.dtype)


def relative_output_error(
    weight: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor
) -> float:
    """``||(W - W') X^T||_F / ||W X^T||_F`` from the Gram matrix ``X^T X`` (no activations).

    A convolution kernel ``(out, in, *kernel)`` with the Gram of its input *channels* is
    viewed as ``(out, in, positions)`` and summed over kernel positions: the error in the
    metric of the input-channel Gram (exact for a linear layer).

    Examples:
        >>> x, w = torch.randn(30, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        >>> round(relative_output_error(w, 0 * w, x.T @ x), 6)
        1.0
    """
    g = gram.detach().to(device=weight.device, dtype=torch.float64)
    w = weight.detach().to(torch.float64)
    difference = w - approximation.detach().to(device=weight.device, dtype=torch.float64)
    w = w.reshape(w.shape[0], w.shape[1], -1)
    difference = difference.reshape(w.shape)
    numerator = torch.einsum("oik,ij,ojk->", difference, g, difference).clamp_min(0)
    denominator = torch.einsum("oik,ij,ojk->", w, g, w).clamp_min(1e-300)
    return math.sqrt(float(numerator / denominator))


def svd_tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """Eckart--Young optimum: relative Frobenius error of the best rank-``rank`` approximation.

    Args:
        singular_values: All singular values of the matrix (any order).
        rank: Number of singular values kept.

    Returns:
        ``sqrt(sum_{i > rank} s_i^2) / sqrt(sum_i s_i^2)`` (0 for a zero matrix).

    Examples:
        >>> svd_tail_error(torch.tensor([3.0, 4.0]), 1)
        0.6
    """
    s = torch.sort(singular_values.detach().double().abs(), descending=True).values
    total = float(s.square().sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(float(s[rank:].square().sum()) / total)


def reduce_low_rank(
    output_factor: torch.Tensor,
    input_factor: torch.Tensor,
    rank: int,
    *,
    compute_dtype: torch.dtype | None = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the best rank-``rank`` approximation of ``B @ A``.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR), then the SVD of the small
    ``R_B R_A^T`` gives the SVD of ``B A`` without forming it: the result is the
    Eckart--Young optimum for ``B A``, in ``O((m + n) r^2)`` instead of
    ``O(m n min(m, n))``. The singular values are split evenly as in
    :func:`low_rank_factors`.

    Args:
        output_factor: ``B``, ``(m, r)``.
        input_factor: ``A``, ``(r, n)``.
        rank: New rank in ``[1, min(m, r, n)]``.
        compute_dtype: float32 (default; float64 for float64 factors) or float64.

    Returns:
        ``(B', A')`` of shapes ``(m, rank)`` and ``(rank, n)`` in the factors' dtype.

    Examples:
        >>> b, a = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        >>> b2, a2 = reduce_low_rank(b, a, 2)
        >>> s = torch.linalg.svdvals(b @ a)
        >>> bool(torch.isclose(torch.linalg.norm(b @ a - b2 @ a2), s[2:].norm()))
        True
    """
    largest = min(output_factor.shape[0], output_factor.shape[1], input_factor.shape[1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= largest:
        raise ValueError(
            f"rank must be an int in [1, {largest}] (at most the current rank and both "
            f"sizes of the product), got {rank!r}"
        )
    dtype = output_factor.dtype
    if output_factor.device.type == "meta":
        meta = dict(device="meta", dtype=dtype)
        return (
            torch.empty(output_factor.shape[0], rank, **meta),
            torch.empty(rank, input_factor.shape[1], **meta),
        )
    compute = _compute_dtype(output_factor, compute_dtype)
    _check_matrix(output_factor)
    _check_matrix(input_factor)
    q_out, r_out = _orthonormal_basis(output_factor, compute)
    q_in, r_in = _orthonormal_basis(input_factor.mT, compute)
    U, S, Vh = torch.linalg.svd(r_out @ r_in.mT)
    root = S[:rank].sqrt()
    new_output = q_out @ (U[:, :rank] * root)
    new_input = (root[:, None] * Vh[:rank]) @ q_in.mT
    return new_output.to(dtype), new_input.to(dtype)
