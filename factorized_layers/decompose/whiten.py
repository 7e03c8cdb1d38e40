"""Whitening by calibration Grams: the metric of the output error, shared by every family.

For inputs ``X`` with Gram ``X^T X = S S^T``, ``||(W - W') X^T||_F = ||(W - W') S||_F``:
a square root ``S`` of the Gram (:func:`whitening_root`; normalised and, inside
:func:`whitening_cache`, cached: :func:`normalized_whitening_eig`) turns output
errors into Frobenius errors. Here also the whitened SVD (SVD-LLM:
:func:`whitened_singular_values`, :func:`whitened_low_rank_factors`) and the
whitening of one mode of a tensor (:func:`whiten_mode`, the metric of
:func:`.cp.whitened_cp_factors`); the per-mode whitening of Tucker weights is
:func:`.tucker.whiten_input_modes`.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Iterator, Tuple

import torch

from ..ranks import RankSpec, resolve_matrix_rank
from ._common import (
    _check_gram,
    _check_matrix,
    _check_ridge,
    _compute_dtype,
    _normalized_gram,
    _whitening_eig,
)
from .tucker import mode_dot


def whitening_root(gram: torch.Tensor, *, ridge: float = 1e-6) -> torch.Tensor:
    """A square root ``S`` with ``S @ S.T = gram + ridge * mean(diag(gram)) * I``.

    Computed by ``eigh`` with negative eigenvalues (rounding noise of a PSD matrix)
    clamped to zero, so singular or rank-deficient Gram matrices are fine: ``S`` then
    has (near-)zero columns and no inverse is ever formed. The small ridge ranks
    directions the data never visits by the weight itself, as plain SVD would.

    Examples:
        >>> x = torch.randn(100, 6, dtype=torch.float64)
        >>> S = whitening_root(x.T @ x, ridge=0.0)
        >>> torch.allclose(S @ S.T, x.T @ x)
        True
    """
    eigenvectors, root_eigenvalues = _whitening_eig(gram, ridge)
    return eigenvectors * root_eigenvalues


_ROOT_CACHE: collections.OrderedDict = collections.OrderedDict()
_ROOT_CACHE_SIZE = 4
_ROOT_CACHE_LOCK = threading.Lock()
_ROOT_CACHE_USERS = 0


@contextlib.contextmanager
def whitening_cache() -> Iterator[None]:
    """Within the block, whitening ``eigh`` results are cached per Gram tensor.

    Fitting several candidate weights under one calibration Gram (as sequential
    calibration does) then computes its ``eigh`` once. The cache holds the last few
    Grams (a reference each, so an identity cannot be reused while cached) and is
    emptied when the outermost block exits; outside such a block nothing is cached.
    """
    global _ROOT_CACHE_USERS
    with _ROOT_CACHE_LOCK:
        _ROOT_CACHE_USERS += 1
    try:
        yield
    finally:
        with _ROOT_CACHE_LOCK:
            _ROOT_CACHE_USERS -= 1
            if _ROOT_CACHE_USERS == 0:
                _ROOT_CACHE.clear()


def normalized_whitening_eig(
    gram: torch.Tensor, device: torch.device, dtype: torch.dtype, ridge: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(E, d)`` of :func:`whitening_root` of ``gram`` scaled to unit mean diagonal.

    ``E * d`` is the root; ``E diag(d^-2) E^T / mean(diag(gram))`` is the inverse of
    ``gram`` plus its ridge. Inside :func:`whitening_cache` the ``eigh`` is cached by
    the identity and version of ``gram`` (for every ridge).
    """
    _check_ridge(ridge)
    key = (id(gram), gram._version, torch.device(device), dtype)
    with _ROOT_CACHE_LOCK:
        hit = _ROOT_CACHE.get(key) if _ROOT_CACHE_USERS else None
        if hit is not None:
            _ROOT_CACHE.move_to_end(key)
    if hit is None:
        normalized = _normalized_gram(gram, device, dtype)
        symmetric = (normalized + normalized.mT) / 2
        eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
        hit = (gram, eigenvectors, eigenvalues.clamp_min(0), symmetric.diagonal().mean())
        with _ROOT_CACHE_LOCK:
            if _ROOT_CACHE_USERS:
                _ROOT_CACHE[key] = hit
                while len(_ROOT_CACHE) > _ROOT_CACHE_SIZE:
                    _ROOT_CACHE.popitem(last=False)
    _, eigenvectors, eigenvalues, scale = hit
    return eigenvectors, (eigenvalues + ridge * scale.clamp_min(0)).sqrt()


def normalized_whitening_root(
    gram: torch.Tensor, device: torch.device, dtype: torch.dtype, ridge: float
) -> torch.Tensor:
    """:func:`whitening_root` of ``gram`` scaled to unit mean diagonal, in ``dtype``."""
    eigenvectors, root_eigenvalues = normalized_whitening_eig(gram, device, dtype, ridge)
    return eigenvectors * root_eigenvalues


def whitened_singular_values(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Singular values of ``weight @ S``: the output-error spectrum on the calibration data.

    ``||(W - W') X^T||_F = ||(W - W') S||_F`` for ``S S^T = X^T X``, so the tail of
    these values gives the best achievable output error of each rank.
    """
    _check_matrix(weight)
    _check_gram(gram, weight.shape[1])
    dtype = _compute_dtype(weight, compute_dtype)
    root = normalized_whitening_root(gram, weight.device, dtype, ridge)
    return torch.linalg.svdvals(weight.detach().to(dtype) @ root)


def whitened_low_rank_factors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    rank: RankSpec,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` minimising the output error ``||(W - B A) X^T||_F`` (SVD-LLM).

    With ``S S^T = X^T X`` (:func:`whitening_root`) and ``W S = U diag(s) V^T``, the best
    rank-``r`` output approximation is ``W' = U_r U_r^T W``: it reaches the optimum
    ``sqrt(sum_{i>r} s_i^2)`` and needs no inverse of ``S``, so rank-deficient
    calibration data cannot produce NaN/Inf. ``B = U_r D`` and ``A = D^{-1} U_r^T W``
    with ``D`` balancing the factors' scales. With isotropic inputs (``X^T X = c I``) this
    is exactly the truncated SVD.

    Args:
        weight: ``(out, in)`` matrix.
        gram: ``(in, in)`` input second-moment matrix ``X^T X`` (any float dtype).
        rank: Rank spec as in :func:`truncated_svd`.
        ridge: Relative ridge of :func:`whitening_root`.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (default as in
            :func:`truncated_svd`).

    Returns:
        ``(B, A)`` of shapes ``(out, r)`` and ``(r, in)`` in ``weight``'s dtype and device.

    Examples:
        >>> w = torch.randn(8, 6, dtype=torch.float64)
        >>> x = torch.randn(50, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64)
        >>> B, A = whitened_low_rank_factors(w, x.T @ x, 2, ridge=0.0)
        >>> torch.allclose(x @ (B @ A).T, x @ w.T)
        True
    """
    _check_matrix(weight)
    _check_gram(gram, weight.shape[1])
    rows, cols = weight.shape
    r = resolve_matrix_rank(rank, rows, cols)
    dtype = _compute_dtype(weight, compute_dtype)
    if weight.device.type == "meta":
        meta = dict(device=weight.device, dtype=weight.dtype)
        return torch.empty(rows, r, **meta), torch.empty(r, cols, **meta)
    matrix = weight.detach().to(dtype)
    root = normalized_whitening_root(gram, weight.device, dtype, ridge)
    left = torch.linalg.svd(matrix @ root, full_matrices=False).U[:, :r]
    projected = left.mT @ matrix
    balance = projected.norm(dim=1).sqrt()
    balance = torch.where(balance > 0, balance, torch.ones_like(balance))
    return (left * balance).to(weight.dtype), (projected / balance[:, None]).to(weight.dtype)


def whiten_mode(
    tensor: torch.Tensor,
    gram: torch.Tensor,
    mode: int,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``tensor x_mode S^T`` for the :func:`whitening_root` ``S`` of ``gram`` (normalised).

    When ``mode`` is the input-channel mode of a kernel and ``gram`` the Gram matrix of
    the input channels over all positions, Frobenius errors of the result weigh each
    channel direction by how much the data visits it.

    Args:
        tensor: Any floating tensor (meta included).
        gram: ``(n, n)`` Gram matrix, ``n = tensor.shape[mode]``.
        mode: The mode to whiten.
        ridge: Relative ridge of :func:`whitening_root`.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (default as in
            :func:`truncated_svd`).

    Returns:
        The whitened tensor in the compute dtype, on ``tensor``'s device.

    Raises:
        ValueError: Bad ``mode``, ``ridge`` or Gram shape, NaN/Inf Gram.

    Examples:
        >>> t = torch.randn(4, 3, 2, dtype=torch.float64)
        >>> torch.allclose(whiten_mode(t, torch.eye(3), 1, ridge=0.0), t)
        True
    """
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < tensor.dim():
        raise ValueError(f"mode must be an integer in [0, {tensor.dim() - 1}], got {mode!r}")
    _check_gram(gram, tensor.shape[mode])
    _check_ridge(ridge)
    dtype = _compute_dtype(tensor, compute_dtype)
    if tensor.device.type == "meta":
        return torch.empty(tensor.shape, device="meta", dtype=dtype)
    vectors, values = _whitening_eig(_normalized_gram(gram, tensor.device, torch.float64), ridge)
    return mode_dot(tensor.detach().to(dtype), (vectors * values).mT.to(dtype), mode)
