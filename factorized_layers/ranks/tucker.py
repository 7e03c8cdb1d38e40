"""Tucker multilinear ranks: their limits, rank-spec resolution and error-minimising allocation."""

from __future__ import annotations

import itertools
import math
import numbers

from .costs import tucker_params
from .spec import check_positive

__all__ = ["max_tucker_ranks", "resolve_tucker_ranks", "allocate_tucker_ranks"]


def _check_modes(shape) -> tuple[int, ...]:
    modes = tuple(shape)
    if not modes:
        raise ValueError("a Tucker shape needs at least one mode, got ()")
    return tuple(check_positive("mode size", m) for m in modes)


def _tucker_feasible(shape: tuple[int, ...], ranks) -> tuple[int, ...]:
    """Clip every rank to its mode size, and every factored rank to the others' product.

    A mode at full rank (``rank == size``) has no factor, so any value is fine. A
    factored mode whose rank exceeds the product of the other ranks is dead weight:
    the core's unfolding along it has at most that many independent rows, and the
    same weight is reached with the rank lowered to that product.
    """
    ranks = [min(r, n) for r, n in zip(ranks, shape)]
    changed = True
    while changed:
        changed = False
        for k in range(len(ranks)):
            cap = math.prod(ranks[:k] + ranks[k + 1 :])
            if cap < ranks[k] < shape[k]:
                ranks[k] = cap
                changed = True
    return tuple(ranks)


def max_tucker_ranks(shape) -> tuple[int, ...]:
    """Most singular vectors per unfolding: ``min(size_k, prod(other sizes))``.

    Examples:
        >>> max_tucker_ranks((40, 3, 2))
        (6, 3, 2)
    """
    shape = _check_modes(shape)
    return tuple(min(n, math.prod(shape) // n) for n in shape)


def resolve_tucker_ranks(spec, shape) -> tuple[int, ...]:
    """Turn a rank spec into concrete multilinear ranks for a tensor of ``shape``.

    Args:
        spec: ``int`` -- that rank on every mode, clipped to the mode size (and to
            the product of the other ranks, above which a rank is useless);
            ``tuple``/``list`` -- one rank per mode, each in ``[1, size_k]``; a rank
            below the mode size (a factored mode) must be at most the product of
            the other ranks; ``float`` in ``(0, 1]`` -- a
            fraction of ``prod(shape)`` parameters, split *balanced*: the ranks
            ``max(1, floor(t * size_k))`` with the largest ``t`` whose
            :func:`tucker_params` fit the budget. (``TuckerLinear.from_dense`` splits
            a float budget by error instead, see :func:`allocate_tucker_ranks`.)
        shape: The mode sizes of the tensor.

    Returns:
        A tuple of ``int`` ranks, one per mode.

    Raises:
        TypeError: If ``spec`` is not an int, float or sequence of ints.
        ValueError: If a value is out of range; the message names the value and the
            valid range.

    Examples:
        >>> resolve_tucker_ranks(10, (16, 12, 8))
        (10, 10, 8)
        >>> resolve_tucker_ranks((3, 3), (8, 6))
        (3, 3)
        >>> resolve_tucker_ranks(0.5, (1536, 384))
        (142, 142)
    """
    shape = _check_modes(shape)
    if isinstance(spec, bool):
        raise TypeError(f"rank must be an int, a float or a tuple of ints, got bool {spec!r}")
    if isinstance(spec, numbers.Integral):
        if spec < 1:
            raise ValueError(f"an int rank must be >= 1 (it is clipped to each mode), got {spec}")
        return _tucker_feasible(shape, [int(spec)] * len(shape))
    if isinstance(spec, numbers.Real):
        fraction = float(spec)
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"a float rank is a fraction of parameters in (0, 1], got {spec!r}")
        budget = fraction * math.prod(shape)
        best = None
        # Every breakpoint t = j / size_k of the balanced ranks; parameters are not
        # monotone in t (folding a full-rank factor frees n^2 entries), so scan all.
        points = sorted({j / n for n in shape for j in range(1, n + 1)})
        for t in points:
            ranks = _tucker_feasible(shape, [max(1, int(math.floor(t * n + 1e-9))) for n in shape])
            if tucker_params(shape, ranks) <= budget + 1e-9:
                best = ranks
        if best is None:
            minimum = tucker_params(shape, (1,) * len(shape))
            raise ValueError(
                f"a float rank of {spec!r} allows {budget:.0f} parameters, but the smallest "
                f"Tucker factorization of shape {shape} (all ranks 1) needs {minimum}; "
                f"valid fractions are in [{minimum / math.prod(shape):.4g}, 1]"
            )
        return best
    if isinstance(spec, (tuple, list)):
        ranks = tuple(spec)
        if len(ranks) != len(shape):
            raise ValueError(
                f"a rank tuple needs one rank per mode: {len(shape)} for shape {shape}, "
                f"got {len(ranks)} ({ranks!r})"
            )
        for k, (r, n) in enumerate(zip(ranks, shape)):
            if isinstance(r, bool) or not isinstance(r, numbers.Integral):
                raise TypeError(f"rank[{k}] must be an int, got {type(r).__name__} {r!r}")
            if not 1 <= r <= n:
                raise ValueError(f"rank[{k}] must be in [1, {n}] (mode size {n}), got {r}")
        for k, r in enumerate(ranks):
            cap = math.prod(ranks[:k] + ranks[k + 1 :])
            if cap < r < shape[k]:
                raise ValueError(
                    f"rank[{k}]={r} is larger than the core allows: a factored mode's rank "
                    f"must be at most the product of the other ranks ({cap}), i.e. in "
                    f"[1, {cap}], or equal the mode size {shape[k]} (no factor)"
                )
        return tuple(int(r) for r in ranks)
    raise TypeError(
        f"rank must be an int, a float or a tuple of ints, got {type(spec).__name__} {spec!r}"
    )


def allocate_tucker_ranks(energy, shape, budget: float) -> tuple[int, ...]:
    """Split a parameter budget across modes to minimise the truncated-HOSVD error.

    ``energy`` is the element-wise square of the *all-orthogonal* full HOSVD core
    ``S`` of the tensor (:func:`factorized_layers.decompose.hosvd_energy`). Keeping the
    leading ``r_k`` singular vectors of every unfolding leaves exactly the core block
    ``S[:r_0, :r_1, ...]``, so the squared error of ranks ``r`` is
    ``sum(energy) - sum(energy[:r_0, :r_1, ...])``: one lookup in the cumulative sum
    (a mode kept whole, ``r_k = size_k``, keeps all of its singular vectors).
    Greedy ascent then takes, at each step, the move with the largest error
    reduction per added parameter whose parameters stay within ``budget``: one rank
    up on any non-empty subset of modes (so coupled modes such as the two of a
    matrix can grow together) or, in a second run, also one mode straight to full
    size, where folding its factor into the core may *save* parameters; a third
    run keeps every rank below its mode size. These and the balanced split are
    polished by exchanges (one mode down, another up) and the lowest error wins.

    Args:
        energy: Tensor of squared core entries, one axis per mode, of shape
            :func:`max_tucker_ranks` ``(shape)``.
        shape: Mode sizes of the tensor (for :func:`tucker_params`).
        budget: Most parameters allowed (core plus factors).

    Returns:
        Ranks with ``tucker_params(shape, ranks) <= budget``.

    Raises:
        ValueError: If even all ranks 1 exceed the budget.

    Examples:
        >>> import torch
        >>> energy = torch.diag(torch.tensor([9.0, 4.0, 1.0, 0.5])) ** 2
        >>> allocate_tucker_ranks(energy, (8, 4), 24)
        (8, 2)
    """
    shape = _check_modes(shape)
    limits = _check_energy_shape(energy, shape)
    _check_budget(shape, budget)
    search = _RankSearch(shape, limits, budget, _cumulative_energy(energy, len(shape)))
    # Jumping a mode to full size can free parameters (a matrix's U G V^T becomes
    # the cheaper (U G) V^T), but taken early it can also lock a large core in, and
    # growing a small mode to full size (folding it) can do the same. Run the greedy
    # with and without jumps and with ranks kept below the mode sizes, add the
    # balanced split, polish each by exchanges and keep the lowest error.
    below = tuple(min(m, n - 1) if n > 1 else 1 for m, n in zip(limits, shape))
    starts = [
        search.greedy(False, limits),
        search.greedy(True, limits),
        search.greedy(False, below),
    ]
    fraction = budget / math.prod(shape)
    if fraction <= 1:
        try:
            starts.append(resolve_tucker_ranks(fraction, shape))
        except ValueError:
            pass
    results = [search.exchange(r) for r in starts if search.fits(r)]
    return max(results, key=search.captured)


def _check_energy_shape(energy, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axis sizes of ``energy``; ``ValueError`` unless they are ``max_tucker_ranks(shape)``."""
    limits = tuple(int(m) for m in energy.shape)
    if limits != max_tucker_ranks(shape):
        raise ValueError(
            f"energy must have shape {max_tucker_ranks(shape)} for shape {shape}, got {limits}"
        )
    return limits


def _check_budget(shape: tuple[int, ...], budget: float) -> None:
    """``ValueError`` if even all ranks 1 need more than ``budget`` parameters."""
    smallest = tucker_params(shape, (1,) * len(shape))
    if smallest > budget:
        raise ValueError(
            f"a budget of {budget:.0f} parameters is below the smallest Tucker "
            f"factorization of shape {shape} (all ranks 1: {smallest})"
        )


def _cumulative_energy(energy, order: int) -> list[float]:
    """Flattened (row-major) cumulative sum of ``energy`` along every axis, in float64."""
    import torch

    cumulative = energy.detach().to(torch.float64, copy=True)
    for dim in range(order):
        cumulative = cumulative.cumsum(dim)
    return cumulative.flatten().tolist()


class _RankSearch:
    """Captured energy and feasibility of Tucker ranks for one tensor, and searches over them."""

    def __init__(
        self, shape: tuple[int, ...], limits: tuple[int, ...], budget: float, flat: list[float]
    ) -> None:
        order = len(shape)
        self.shape, self.limits, self.budget, self.flat = shape, limits, budget, flat
        self.order = order
        self.strides = [math.prod(limits[k + 1 :]) for k in range(order)]
        self.moves = [
            subset
            for size in range(1, order + 1)
            for subset in itertools.combinations(range(order), size)
        ]
        self.tiny = 1e-15 * max(flat[-1], 1e-300)

    def captured(self, r: tuple[int, ...]) -> float:
        """Energy kept by the truncated HOSVD of ranks ``r``: one cumulative-sum lookup."""
        return self.flat[
            sum((min(x, m) - 1) * st for x, m, st in zip(r, self.limits, self.strides))
        ]

    def feasible(self, r: tuple[int, ...]) -> bool:
        """Whether every factored mode's rank is at most the product of the other ranks."""
        total = math.prod(r)
        return all(x == n or x * x <= total for x, n in zip(r, self.shape))

    def fits(self, r: tuple[int, ...]) -> bool:
        """Whether ``r`` is valid, feasible and within the budget."""
        shape = self.shape
        return (
            all(1 <= x <= n for x, n in zip(r, shape))
            and all(x == n or x <= m for x, n, m in zip(r, shape, self.limits))
            and self.feasible(r)
            and tucker_params(shape, r) <= self.budget
        )

    def greedy(self, jumps: bool, caps: tuple[int, ...]) -> tuple[int, ...]:
        """Greedy ascent from all ranks 1 by the best error reduction per added parameter."""
        ranks = (1,) * self.order
        params, kept = tucker_params(self.shape, ranks), self.captured(ranks)
        while True:
            best = self._best_step(ranks, params, kept, self._steps(ranks, jumps, caps))
            if best is None:
                return ranks
            _, ranks, params = best
            kept = self.captured(ranks)

    def _steps(self, ranks: tuple[int, ...], jumps: bool, caps: tuple[int, ...]) -> list:
        """Greedy candidates: one rank up on a subset of modes, or (``jumps``) one mode full."""
        candidates = []
        for subset in self.moves:
            if all(ranks[k] < caps[k] for k in subset):
                candidates.append(tuple(r + 1 if k in subset else r for k, r in enumerate(ranks)))
        if jumps:
            for k in range(self.order):
                if ranks[k] < self.shape[k]:
                    candidates.append(
                        tuple(self.shape[k] if j == k else r for j, r in enumerate(ranks))
                    )
        return candidates

    def _best_step(self, ranks, params: int, kept: float, candidates: list):
        """``(key, ranks, params)`` of the affordable candidate with the best gain per cost."""
        best = None
        for new in candidates:
            new_params = tucker_params(self.shape, new)
            if new_params > self.budget or not self.feasible(new):
                continue
            gain = self.captured(new) - kept
            cost = new_params - params
            if gain <= self.tiny and cost >= 0:
                continue
            key = (math.inf, gain, -cost) if cost <= 0 else (gain / cost, gain, -cost)
            if best is None or key > best[0]:
                best = (key, new, new_params)
        return best

    def exchange(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """Polish ``ranks`` by exchanges (one mode down, another up) while the error drops."""
        # Local search: move rank between two modes (one down, the other up by 1-3)
        # while that captures more energy within the budget.
        kept = self.captured(ranks)
        for _ in range(50 * self.order):
            best = self._best_exchange(ranks, kept)
            if best is None:
                return ranks
            kept, ranks = best
        return ranks

    def _best_exchange(self, ranks: tuple[int, ...], kept: float):
        """``(captured, ranks)`` of the fitting exchange that captures the most energy, or None."""
        best = None
        for i in range(self.order):
            for j in range(self.order):
                if i == j or ranks[i] == 1:
                    continue
                for step in (1, 2, 3):
                    new = list(ranks)
                    new[i] -= 1
                    new[j] += step
                    new = tuple(new)
                    if self.fits(new) and self.captured(new) > kept + self.tiny:
                        if best is None or self.captured(new) > best[0]:
                            best = (self.captured(new), new)
        return best
