"""Rank specifications and the parameter / FLOP arithmetic every layer shares.

A *rank spec* says how much of a weight to keep:

* ``int`` -- that rank exactly, ``1 <= rank <= min(rows, cols)``;
* ``float`` in ``(0, 1]`` -- the largest rank whose factor parameters are at most
  that fraction of the dense weight's parameters (never below 1).

All counts are plain Python integers so they can be used in shape arithmetic, in
reports and under ``torch.compile`` alike.
"""

from __future__ import annotations

import math
import numbers
from typing import Union

__all__ = [
    "RankSpec",
    "resolve_matrix_rank",
    "low_rank_params",
    "low_rank_break_even",
    "dense_linear_flops",
    "low_rank_linear_flops",
]

RankSpec = Union[int, float]


def _check_dim(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def low_rank_params(rows: int, cols: int, rank: int) -> int:
    """Number of entries in the two factors of a rank-``rank`` ``rows x cols`` matrix.

    Args:
        rows: Number of rows (``out_features`` for a Linear weight).
        cols: Number of columns (``in_features``).
        rank: Inner dimension of the factorization.

    Returns:
        ``rank * (rows + cols)``.

    Examples:
        >>> low_rank_params(384, 1536, 10)
        19200
    """
    return rank * (rows + cols)


def low_rank_break_even(rows: int, cols: int) -> int:
    """Largest rank whose factors hold strictly fewer entries than the dense matrix.

    Ranks at or above ``rows * cols / (rows + cols)`` save neither parameters nor
    FLOPs; this returns the largest rank below that bound (0 when none exists,
    e.g. for a ``1 x n`` matrix).

    Examples:
        >>> low_rank_break_even(384, 384)
        191
    """
    return (rows * cols - 1) // (rows + cols)


def resolve_matrix_rank(spec: RankSpec, rows: int, cols: int) -> int:
    """Turn a rank spec into a concrete rank for a ``rows x cols`` matrix.

    Args:
        spec: ``int`` rank in ``[1, min(rows, cols)]``, or ``float`` fraction in
            ``(0, 1]`` of the dense parameter count ``rows * cols``; the result is
            then the largest rank ``r`` with ``r * (rows + cols) <= spec * rows * cols``,
            clipped to ``[1, min(rows, cols)]``.
        rows: Number of rows of the matrix.
        cols: Number of columns of the matrix.

    Returns:
        The rank as a Python ``int``.

    Raises:
        TypeError: If ``spec`` is neither an integer nor a float.
        ValueError: If ``spec`` is out of range.

    Examples:
        >>> resolve_matrix_rank(0.5, 384, 1536)
        153
        >>> resolve_matrix_rank(16, 384, 1536)
        16
    """
    rows = _check_dim("rows", rows)
    cols = _check_dim("cols", cols)
    full_rank = min(rows, cols)
    if isinstance(spec, bool):
        raise TypeError(f"rank must be an int or a float, got bool {spec!r}")
    if isinstance(spec, numbers.Integral):
        if not 1 <= spec <= full_rank:
            raise ValueError(
                f"rank must be in [1, {full_rank}] = [1, min({rows}, {cols})], got {spec}"
            )
        return int(spec)
    if isinstance(spec, numbers.Real):
        fraction = float(spec)
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"a float rank is a fraction of parameters in (0, 1], got {spec!r}")
        budget = fraction * rows * cols
        # Small epsilon so that e.g. 0.5 of an exactly divisible budget is not lost to rounding.
        rank = int(math.floor(budget / (rows + cols) + 1e-9))
        return max(1, min(rank, full_rank))
    raise TypeError(f"rank must be an int or a float, got {type(spec).__name__} {spec!r}")


def dense_linear_flops(in_features: int, out_features: int, batch: int = 1) -> int:
    """Multiply-accumulate count of ``F.linear`` on ``batch`` rows (bias excluded).

    Examples:
        >>> dense_linear_flops(1536, 384, batch=2)
        1179648
    """
    return batch * in_features * out_features


def low_rank_linear_flops(in_features: int, out_features: int, rank: int, batch: int = 1) -> int:
    """Multiply-accumulate count of ``x @ A.T @ B.T`` on ``batch`` rows (bias excluded).

    Examples:
        >>> low_rank_linear_flops(1536, 384, 10, batch=2)
        38400
    """
    return batch * rank * (in_features + out_features)
