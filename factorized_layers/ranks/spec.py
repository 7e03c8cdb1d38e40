"""Rank specs and their resolution for matrices and CP tensors, and the shared validators.

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
    "check_positive",
    "resolve_matrix_rank",
    "cp_max_rank",
    "resolve_cp_rank",
]

RankSpec = Union[int, float]


def check_positive(name: str, value: int) -> int:
    """``value`` as an ``int``; ``ValueError`` naming ``name`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_shape(shape) -> tuple:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive integers, got {shape!r}") from None
    if not dims:
        raise ValueError("shape must have at least one mode, got ()")
    return tuple(check_positive(f"shape[{i}]", d) for i, d in enumerate(dims))


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
    rows = check_positive("rows", rows)
    cols = check_positive("cols", cols)
    return _resolve_linear_cost_rank(
        spec,
        max_rank=min(rows, cols),
        max_rank_text=f"min({rows}, {cols})",
        dense_params=rows * cols,
        params_per_rank=rows + cols,
    )


def _resolve_linear_cost_rank(
    spec: RankSpec, *, max_rank: int, max_rank_text: str, dense_params: int, params_per_rank: int
) -> int:
    """Rank spec -> rank for factorizations whose parameters grow linearly with the rank."""
    if isinstance(spec, bool):
        raise TypeError(f"rank must be an int or a float, got bool {spec!r}")
    if isinstance(spec, numbers.Integral):
        if not 1 <= spec <= max_rank:
            raise ValueError(f"rank must be in [1, {max_rank}] = [1, {max_rank_text}], got {spec}")
        return int(spec)
    if isinstance(spec, numbers.Real):
        fraction = float(spec)
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"a float rank is a fraction of parameters in (0, 1], got {spec!r}")
        # Small epsilon so that e.g. 0.5 of an exactly divisible budget is not lost to rounding.
        rank = int(math.floor(fraction * dense_params / params_per_rank + 1e-9))
        return max(1, min(rank, max_rank))
    raise TypeError(f"rank must be an int or a float, got {type(spec).__name__} {spec!r}")


def cp_max_rank(shape) -> int:
    """Largest useful CP rank of a tensor of ``shape``: ``prod(shape) // max(shape)``.

    Every tensor has CP rank at most the product of all but its largest mode (write
    it as a sum over the fibres of the largest mode), so higher ranks only add
    redundant terms.

    Examples:
        >>> cp_max_rank((128, 64, 3, 3))
        576
    """
    dims = _check_shape(shape)
    return math.prod(dims) // max(dims)


def resolve_cp_rank(spec: RankSpec, shape) -> int:
    """Turn a rank spec into a concrete CP rank for a tensor of ``shape``.

    Args:
        spec: ``int`` rank in ``[1, cp_max_rank(shape)]``, or ``float`` fraction in
            ``(0, 1]`` of the dense parameter count ``prod(shape)``; the result is then
            the largest rank ``r`` with ``r * sum(shape) <= spec * prod(shape)``,
            clipped to ``[1, cp_max_rank(shape)]``.
        shape: Mode sizes of the tensor.

    Returns:
        The rank as a Python ``int``.

    Raises:
        TypeError: If ``spec`` is neither an integer nor a float.
        ValueError: If ``spec`` is out of range or ``shape`` is not positive.

    Examples:
        >>> resolve_cp_rank(0.25, (128, 64, 3, 3))
        93
        >>> resolve_cp_rank(16, (128, 64, 3, 3))
        16
    """
    dims = _check_shape(shape)
    return _resolve_linear_cost_rank(
        spec,
        max_rank=cp_max_rank(dims),
        max_rank_text=f"prod{dims} // max{dims}",
        dense_params=math.prod(dims),
        params_per_rank=sum(dims),
    )
