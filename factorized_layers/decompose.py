"""Pure tensor decompositions (no ``nn``): the numerical core behind every ``from_dense``.

Conventions shared by every function here:

* computation happens on the input's device, in float32 -- or float64 when the
  input is float64 or ``compute_dtype=torch.float64`` is asked for -- and results
  are cast back to the input's dtype;
* NaN/Inf input raises ``ValueError`` instead of producing garbage factors;
* meta-device input returns meta tensors of the right shapes without computing;
* randomized algorithms are reproducible from ``seed`` (or a ``torch.Generator``)
  and leave the global random state untouched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Tuple

import torch

from .ranks import RankSpec, resolve_matrix_rank

__all__ = [
    "TruncatedSVD",
    "truncated_svd",
    "low_rank_factors",
    "svd_tail_error",
    "choose_svd_method",
]

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
    return max(10, rank // 10)


def _compute_dtype(weight: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is None:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}"
        )
    return compute_dtype


def _check_matrix(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.device.type != "meta":
        bad = int((~torch.isfinite(weight)).sum())
        if bad:
            raise ValueError(
                f"weight contains {bad} NaN/Inf value(s) out of {weight.numel()}; "
                "a decomposition of non-finite values is meaningless"
            )


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the generator of ``device`` inside a forked RNG state (global state restored)."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    else:
        module = torch.get_device_module(device.type)
        index = device.index if device.index is not None else module.current_device()
        with torch.random.fork_rng(devices=[index], device_type=device.type):
            with module.device(index):
                module.manual_seed(seed)
            yield


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    return 0 if seed is None else int(seed)


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
