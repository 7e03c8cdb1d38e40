"""Cached ``opt_einsum`` contraction expressions.

Planning a contraction order with ``opt_einsum`` costs tens of microseconds of
Python, far more than a small forward pass. This module builds each
:func:`opt_einsum.contract_expression` once per (equation, operand shapes, strategy)
and keeps it in a bounded, thread-safe LRU cache. The plan can depend on the batch
size, so the shapes are part of the key.

Operands are always passed at call time, never as ``constants=``: trainable factors
change after every optimizer step and a constant-folded expression would go stale.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple, Sequence, Tuple

import opt_einsum
import torch

__all__ = [
    "CacheInfo",
    "ContractionCache",
    "contract",
    "contraction_expression",
    "contraction_path",
    "default_cache",
    "shape_free_schedule",
]

Shape = Tuple[int, ...]


class CacheInfo(NamedTuple):
    """Counters of a :class:`ContractionCache`, like ``functools.lru_cache``'s."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class ContractionCache:
    """Bounded, thread-safe LRU cache of ``opt_einsum`` contraction expressions.

    Args:
        maxsize: Most expressions kept; the least recently used one is evicted first.
        optimize: Default ``opt_einsum`` path strategy (``'auto'`` picks an exhaustive
            search for few operands and greedy ones for many).

    Examples:
        >>> cache = ContractionCache(maxsize=8)
        >>> expr = cache.expression("bi,ri,or->bo", (4, 6), (2, 6), (3, 2))
        >>> cache.info().misses, cache.info().currsize
        (1, 1)
    """

    def __init__(self, maxsize: int = 512, optimize: str = "auto") -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive integer, got {maxsize!r}")
        self.maxsize = maxsize
        self.optimize = optimize
        self._entries: OrderedDict[tuple, opt_einsum.contract.ContractExpression] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def expression(
        self, equation: str, *shapes: Sequence[int], optimize: str | None = None
    ) -> opt_einsum.contract.ContractExpression:
        """Return the (cached) expression for ``equation`` on operands of ``shapes``."""
        strategy = self.optimize if optimize is None else optimize
        key = (equation, tuple(tuple(int(d) for d in s) for s in shapes), strategy)
        with self._lock:
            expr = self._entries.get(key)
            if expr is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return expr
            self._misses += 1
        # Plan outside the lock: planning is slow and two threads building the same
        # expression at once is harmless (both results are equal).
        expr = opt_einsum.contract_expression(equation, *key[1], optimize=strategy)
        with self._lock:
            self._entries[key] = expr
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return expr

    def info(self) -> CacheInfo:
        """Hit/miss counters and sizes."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, self.maxsize, len(self._entries))

    def clear(self) -> None:
        """Drop every expression and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._hits = 0
            self._misses = 0

    def __repr__(self) -> str:
        hits, misses, maxsize, currsize = self.info()
        return (
            f"{type(self).__name__}(maxsize={maxsize}, currsize={currsize}, "
            f"hits={hits}, misses={misses})"
        )


default_cache = ContractionCache()
"""The process-wide cache used by the layers."""


def shape_free_schedule() -> bool:
    """Whether a kernel must pick its schedule without looking at the input's shape.

    True while ``torch.export`` traces (``torch.onnx.export(..., dynamo=True)``
    included). There the batch, sequence and image sizes may be symbolic, and a branch
    on them would either specialise the exported program to the example's sizes or
    make an export with dynamic dimensions fail. Kernels then take the schedule that
    is best as the batch grows (the serving case) and the plainest graph (no CPU-only
    tricks such as rotations by GEMM), so the exported program is valid for every size.
    ``torch.compile`` is not affected: its shape guards recompile where needed.

    Examples:
        >>> shape_free_schedule()
        False
    """
    return torch.compiler.is_exporting()


def contraction_expression(
    equation: str, *shapes: Sequence[int], cache: ContractionCache | None = None
) -> opt_einsum.contract.ContractExpression:
    """Cached ``opt_einsum.contract_expression(equation, *shapes)``.

    Examples:
        >>> expr = contraction_expression("ij,jk->ik", (2, 3), (3, 4))
        >>> expr(torch.ones(2, 3), torch.ones(3, 4), backend="torch").shape
        torch.Size([2, 4])
    """
    return (default_cache if cache is None else cache).expression(equation, *shapes)


def contraction_path(
    equation: str, *shapes: Sequence[int], cache: ContractionCache | None = None
) -> Tuple[Tuple[int, ...], ...]:
    """The pairwise contraction order opt_einsum plans, as in ``opt_einsum.contract_path``.

    Each entry lists the positions, in the current operand list, of the operands
    contracted at that step (the result is appended to the end of the list).

    Examples:
        >>> contraction_path("bi,ri,or->bo", (64, 1536), (100, 1536), (384, 100))
        ((0, 1), (0, 1))
    """
    expr = contraction_expression(equation, *shapes, cache=cache)
    return tuple(tuple(sorted(step[0])) for step in expr.contraction_list)


def contract(
    equation: str, *operands: torch.Tensor, cache: ContractionCache | None = None
) -> torch.Tensor:
    """Evaluate ``equation`` on ``operands`` with a cached, planned expression.

    Args:
        equation: An einsum equation with an explicit ``->`` output.
        *operands: The tensors, all on one device and of one dtype.
        cache: Cache to use; the module's :data:`default_cache` when ``None``.

    Returns:
        The contraction, computed by the torch backend (differentiable).

    Examples:
        >>> a, b = torch.randn(2, 3), torch.randn(3, 4)
        >>> torch.allclose(contract("ij,jk->ik", a, b), a @ b)
        True
    """
    expr = contraction_expression(equation, *(op.shape for op in operands), cache=cache)
    return expr(*operands, backend="torch")
