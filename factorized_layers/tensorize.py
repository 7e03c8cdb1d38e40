"""Tensorization: viewing a feature size as a tensor of near-balanced modes.

A Tucker (or tensor-train) linear layer reshapes its ``(out_features, in_features)``
weight into a tensor of shape ``out_shape + in_shape`` with
``prod(out_shape) == out_features`` and ``prod(in_shape) == in_features``.

**The rule** (:func:`tensorize`): a size ``n`` with ``p`` prime factors (counted with
multiplicity) is split into ``k = min(max_modes, p)`` factors, each at least 2; among
all such splits the one with the smallest largest factor wins, ties going to the
largest smallest factor. Modes are returned in non-increasing order. A prime stays
one mode and ``1`` stays ``(1,)``. For example ``384 -> (8, 8, 6)`` and
``1536 -> (16, 12, 8)`` (the shapes TensorLy-Torch picks too).

**Candidates** (:func:`tensorize_candidates`): ``TuckerLinear.from_dense`` compares
the tensorizations with ``k = 1, 2, ..., max_modes`` modes on *both* sides (so the
plain two-factor ``U G V^T`` form, ``k = 1``, is always a candidate), dropping
duplicates.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Tuple

from .ranks import check_positive

__all__ = ["prime_factors", "tensorize", "tensorize_candidates", "check_tensorization"]

Shape = Tuple[int, ...]


def prime_factors(n: int) -> List[int]:
    """Prime factors of ``n`` with multiplicity, ascending (``[]`` for 1).

    Examples:
        >>> prime_factors(384)
        [2, 2, 2, 2, 2, 2, 2, 3]
    """
    n = check_positive("n", n)
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def _splits(n: int, k: int, largest: int) -> List[Shape]:
    """Non-increasing ``k``-tuples of integers >= 2 with product ``n``, each <= ``largest``."""
    if k == 1:
        return [(n,)] if 2 <= n <= largest else []
    out = []
    # The first (largest) factor is at least the k-th root of n.
    low = max(2, math.ceil(round(n ** (1.0 / k), 9)))
    for first in range(min(largest, n), low - 1, -1):
        if n % first == 0:
            out.extend((first,) + rest for rest in _splits(n // first, k - 1, first))
    return out


def tensorize(n: int, max_modes: int = 3) -> Shape:
    """Near-balanced factorization of ``n`` into at most ``max_modes`` modes.

    Args:
        n: The feature size.
        max_modes: Most modes to use.

    Returns:
        The modes, non-increasing, with product ``n`` (see the module docstring for
        the rule).

    Raises:
        ValueError: If ``n`` or ``max_modes`` is not a positive integer.

    Examples:
        >>> tensorize(1536), tensorize(384), tensorize(384, 2), tensorize(97)
        ((16, 12, 8), (8, 8, 6), (24, 16), (97,))
    """
    n = check_positive("n", n)
    max_modes = check_positive("max_modes", max_modes)
    k = min(max_modes, len(prime_factors(n)))
    if k <= 1:
        return (n,)
    splits = _splits(n, k, n)
    return min(splits, key=lambda s: (s[0], -s[-1]))


def tensorize_candidates(
    out_features: int, in_features: int, max_modes: int = 3
) -> List[Tuple[Shape, Shape]]:
    """``(out_shape, in_shape)`` pairs ``from_dense`` compares, two-mode form first.

    Examples:
        >>> tensorize_candidates(1536, 384)
        [((1536,), (384,)), ((48, 32), (24, 16)), ((16, 12, 8), (8, 8, 6))]
        >>> tensorize_candidates(7, 5)
        [((7,), (5,))]
    """
    max_modes = check_positive("max_modes", max_modes)
    out = []
    for k in range(1, max_modes + 1):
        pair = (tensorize(out_features, k), tensorize(in_features, k))
        if pair not in out:
            out.append(pair)
    return out


def check_tensorization(name: str, shape: object, features: int) -> Shape:
    """Validate a user-given mode shape whose product must equal ``features``.

    Raises:
        ValueError: If ``shape`` is not a non-empty sequence of positive integers
            with product ``features``; the message names both.

    Examples:
        >>> check_tensorization("in_shape", [8, 8, 6], 384)
        (8, 8, 6)
    """
    try:
        modes = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {shape!r}") from None
    if not modes or any(
        isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1 for m in modes
    ):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {shape!r}")
    modes = tuple(int(m) for m in modes)
    if math.prod(modes) != features:
        raise ValueError(
            f"{name}={modes} has product {math.prod(modes)}, but it must equal {features}"
        )
    return modes
