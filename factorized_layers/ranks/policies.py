"""Rank policies: rules that pick a rank from what a layer's spectrum says.

:class:`Energy`, :class:`ErrorBound`, :class:`EVBMF` and :class:`Budget`, the
:class:`RankProfile` a layer offers them (candidate ranks with their costs and
errors), :func:`select_rank` for one layer and :func:`allocate_budget` for a global
budget across layers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence, Tuple, Union

from .evbmf import evbmf_rank
from .spec import RankSpec, check_positive

__all__ = [
    "RankPolicy",
    "RankProfile",
    "Energy",
    "ErrorBound",
    "EVBMF",
    "Budget",
    "POLICY_TYPES",
    "select_rank",
    "allocate_budget",
]


def _check_fraction(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (math.isfinite(value) and low_ok and value <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Energy:
    """Smallest rank that keeps at least ``fraction`` of the spectral energy.

    Energy of rank ``r`` is ``sum_{i<=r} s_i^2 / sum_i s_i^2``: the squared Frobenius
    norm kept by the best rank-``r`` approximation.

    Examples:
        >>> Energy(0.95)
        Energy(fraction=0.95)
    """

    fraction: float

    def __post_init__(self) -> None:
        _check_fraction("Energy fraction", self.fraction)


@dataclasses.dataclass(frozen=True)
class ErrorBound:
    """Smallest rank whose relative Frobenius reconstruction error is at most ``max_error``.

    Examples:
        >>> ErrorBound(0.2)
        ErrorBound(max_error=0.2)
    """

    max_error: float

    def __post_init__(self) -> None:
        _check_fraction("ErrorBound max_error", self.max_error, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class EVBMF:
    """Automatic rank by empirical variational Bayesian matrix factorization.

    Nakajima et al. 2013: with ``Y`` of shape ``L x M`` (``L <= M``), ``a = L / M`` and
    ``t = 2.5129 sqrt(a)``, singular values above ``sqrt(M s2 (1 + t)(1 + a / t))`` are
    kept, where the noise variance ``s2`` minimises the closed-form free energy (a
    bounded 1-D search). The rank is never below ``min_rank`` (VBMF implementations
    that return 0 leave a layer unusable).

    Examples:
        >>> EVBMF()
        EVBMF(min_rank=1)
    """

    min_rank: int = 1

    def __post_init__(self) -> None:
        if (
            isinstance(self.min_rank, bool)
            or not isinstance(self.min_rank, int)
            or self.min_rank < 1
        ):
            raise ValueError(f"EVBMF min_rank must be a positive integer, got {self.min_rank!r}")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Global budget: ranks allocated across all targeted layers of a model.

    Exactly one of ``params`` and ``flops`` is given: the fraction of the targeted
    layers' dense parameters (or FLOPs) to keep in total. ``factorize_`` spends it
    greedily where it removes the most normalised reconstruction error per parameter
    (or FLOP), and may keep a layer dense when that is the best use of the budget.
    Given to a single layer's ``from_dense``, it acts as that fraction of the layer.

    With calibration batches and ``sensitivity=True`` (the default), ``factorize_``
    weighs each layer's error by how much it changes the *model's* output: it
    measures, with one backward pass per calibration batch, the mean squared gradient
    ``h`` of a probe loss with respect to the layer's outputs (the Fisher information
    of the logits for models that return ``logits``, else a random projection of the
    output: the Gauss--Newton curvature of the KL divergence or of the squared output
    error), and minimises ``sum_l h_l ||W_l X_l||^2 e_l^2``, the second-order estimate
    of the loss increase, where ``e_l`` is layer ``l``'s relative output error
    (:attr:`factorized_layers.calibrate.InputStats.sensitivity`).

    Examples:
        >>> Budget(params=0.5)
        Budget(params=0.5, flops=None, sensitivity=True)
    """

    params: float | None = None
    flops: float | None = None
    sensitivity: bool = True

    def __post_init__(self) -> None:
        if (self.params is None) == (self.flops is None):
            raise ValueError(
                f"Budget needs exactly one of params= or flops=, got params={self.params!r}, "
                f"flops={self.flops!r}"
            )
        if not isinstance(self.sensitivity, bool):
            raise TypeError(f"Budget sensitivity must be a bool, got {self.sensitivity!r}")
        if self.params is not None:
            _check_fraction("Budget params", self.params)
        else:
            _check_fraction("Budget flops", self.flops)

    @property
    def fraction(self) -> float:
        """The kept fraction, whichever quantity it applies to."""
        return self.params if self.params is not None else self.flops

    @property
    def quantity(self) -> str:
        """``'params'`` or ``'flops'``."""
        return "params" if self.params is not None else "flops"


RankPolicy = Union[Energy, ErrorBound, EVBMF, Budget]
POLICY_TYPES = (Energy, ErrorBound, EVBMF, Budget)


@dataclasses.dataclass(frozen=True)
class RankProfile:
    """What a layer offers to rank policies: candidate ranks and their costs and errors.

    Candidates are ordered by increasing parameter count. ``errors[i]`` is the relative
    Frobenius reconstruction error of candidate ``i`` (exact for truncated SVD; a
    documented estimate for other factorizations). ``spectrum`` holds the singular
    values of the layer's matrix view (``rows x cols``) used by :class:`EVBMF`.
    """

    ranks: Tuple[Any, ...]
    params: Tuple[int, ...]
    flops: Tuple[int, ...]
    errors: Tuple[float, ...]
    dense_params: int
    dense_flops: int
    spectrum: Tuple[float, ...] = ()
    rows: int = 0
    cols: int = 0

    def __post_init__(self) -> None:
        n = len(self.ranks)
        if not len(self.params) == len(self.flops) == len(self.errors) == n:
            raise ValueError(f"RankProfile needs equally long candidate lists, got {n} ranks")

    @classmethod
    def from_spectrum(
        cls,
        singular_values: Sequence[float],
        rows: int,
        cols: int,
        *,
        params_per_rank: int,
        flops_per_rank: int,
        dense_params: int,
        dense_flops: int,
        max_rank: int | None = None,
    ) -> RankProfile:
        """Profile of a low-rank matrix factorization: ranks ``1..max_rank``, exact errors.

        Args:
            singular_values: All singular values of the ``rows x cols`` matrix, descending.
            rows: Rows of the matrix.
            cols: Columns of the matrix.
            params_per_rank: Parameters added by each unit of rank.
            flops_per_rank: Multiply-accumulates per output position added by each unit.
            dense_params: Parameters of the dense weight.
            dense_flops: Multiply-accumulates per output position of the dense layer.
            max_rank: Largest candidate (default ``min(rows, cols)``).
        """
        s2 = [float(v) ** 2 for v in singular_values]
        total = sum(s2)
        top = min(rows, cols) if max_rank is None else max_rank
        tail = [0.0] * (top + 1)
        running = sum(s2[top:])
        for r in range(top, -1, -1):
            tail[r] = running
            if r > 0 and r - 1 < len(s2):
                running += s2[r - 1]
        ranks = tuple(range(1, top + 1))
        errors = tuple(math.sqrt(tail[r] / total) if total > 0 else 0.0 for r in ranks)
        return cls(
            ranks=ranks,
            params=tuple(r * params_per_rank for r in ranks),
            flops=tuple(r * flops_per_rank for r in ranks),
            errors=errors,
            dense_params=dense_params,
            dense_flops=dense_flops,
            spectrum=tuple(float(v) for v in singular_values),
            rows=rows,
            cols=cols,
        )

    def _subset(self, keep: Sequence[int]) -> RankProfile:
        return dataclasses.replace(
            self,
            ranks=tuple(self.ranks[i] for i in keep),
            params=tuple(self.params[i] for i in keep),
            flops=tuple(self.flops[i] for i in keep),
            errors=tuple(self.errors[i] for i in keep),
        )

    def saving(self) -> RankProfile:
        """Only the candidates with fewer parameters *and* FLOPs than the dense layer.

        A dense layer without multiply-adds (a lookup table, ``dense_flops == 0``) is
        judged by parameters alone. May be empty: then no factorization pays off.
        """
        return self._subset(
            [
                i
                for i in range(len(self.ranks))
                if self.params[i] < self.dense_params
                and (self.dense_flops == 0 or self.flops[i] < self.dense_flops)
            ]
        )

    def restrict_to_multiples(self, multiple_of: int) -> RankProfile:
        """Keep only integer candidates divisible by ``multiple_of`` (plus the largest).

        The largest candidate is always kept so that the profile is never empty.
        """
        multiple_of = check_positive("multiple_of", multiple_of)
        if multiple_of == 1:
            return self
        if not any(isinstance(r, int) for r in self.ranks):
            raise ValueError(
                f"multiple_of={multiple_of} applies to integer ranks; this profile's "
                f"candidates are {type(self.ranks[0]).__name__} budgets"
            )
        last = len(self.ranks) - 1
        return self._subset(
            [
                i
                for i, r in enumerate(self.ranks)
                if i == last or (isinstance(r, int) and r % multiple_of == 0)
            ]
        )


def select_rank(spec: Union[RankSpec, RankPolicy], profile: RankProfile) -> Any:
    """Pick one of ``profile.ranks`` according to a rank spec or policy.

    * ``int``: that rank, which must be one of the candidates' range;
    * ``float`` / :class:`Budget`: the largest candidate whose parameters (FLOPs for
      ``Budget(flops=...)``) are at most that fraction of the dense layer's (the
      smallest candidate if none fits);
    * :class:`Energy` / :class:`ErrorBound`: the smallest candidate meeting the bound
      (the largest candidate if none does);
    * :class:`EVBMF`: the smallest integer candidate at least the EVBMF rank of the
      profile's spectrum (and ``min_rank``); for budget candidates, candidate ``i``
      stands for matrix rank ``i + 1``.

    Raises:
        TypeError: For anything else.
        ValueError: For out-of-range values.
    """
    if isinstance(spec, bool):
        raise TypeError(f"rank must be an int, a float or a rank policy, got bool {spec!r}")
    if isinstance(spec, numbers.Integral):
        ints = [r for r in profile.ranks if isinstance(r, int)]
        low, high = min(ints), max(ints)
        if not low <= spec <= high:
            raise ValueError(f"rank must be in [{low}, {high}], got {spec}")
        at_most = [r for r in ints if r <= spec]
        return max(at_most)
    if isinstance(spec, Budget) or isinstance(spec, numbers.Real):
        if isinstance(spec, Budget):
            fraction, costs, dense = spec.fraction, profile.params, profile.dense_params
            if spec.quantity == "flops":
                costs, dense = profile.flops, profile.dense_flops
        else:
            fraction = _check_fraction("a float rank (fraction of parameters)", spec)
            costs, dense = profile.params, profile.dense_params
        fitting = [i for i, c in enumerate(costs) if c <= fraction * dense * (1 + 1e-12)]
        return profile.ranks[fitting[-1] if fitting else 0]
    if isinstance(spec, (Energy, ErrorBound)):
        bound = (
            math.sqrt(max(1.0 - spec.fraction, 0.0)) if isinstance(spec, Energy) else spec.max_error
        )
        for rank, error in zip(profile.ranks, profile.errors):
            if error <= bound + 1e-12:
                return rank
        return profile.ranks[-1]
    if isinstance(spec, EVBMF):
        if not profile.spectrum:
            raise ValueError("EVBMF needs a layer whose rank profile carries a spectrum")
        frobenius_sq = sum(v * v for v in profile.spectrum)
        found = evbmf_rank(profile.spectrum, profile.rows, profile.cols, frobenius_sq)
        target = max(found, spec.min_rank)
        if all(isinstance(r, int) for r in profile.ranks):
            # The smallest integer candidate reaching the EVBMF rank (candidates may have
            # been restricted, e.g. to multiples of 8).
            return next((r for r in profile.ranks if r >= target), profile.ranks[-1])
        # Budget candidates: candidate i stands for matrix rank i + 1.
        return profile.ranks[min(target, len(profile.ranks)) - 1]
    raise TypeError(
        "rank must be an int, a float in (0, 1], or one of Energy, ErrorBound, EVBMF, Budget; "
        f"got {type(spec).__name__} {spec!r}"
    )


def allocate_budget(
    profiles: Sequence[RankProfile],
    budget: Budget,
    weights: Sequence[float] | None = None,
) -> list:
    """Choose one candidate per layer to minimise total error under a global budget.

    The objective is the sum over layers of the squared relative reconstruction
    error (each layer's lost energy as a fraction of its own), times the layer's
    weight when ``weights`` are given (e.g. its measured sensitivity), subject to the total
    parameters (or FLOPs) of all layers being at most ``budget.fraction`` of their
    dense total. Each layer may also stay dense (zero error, dense cost).

    Greedy on marginal error per unit of cost: every layer starts at its cheapest
    candidate; at each step the layer whose best affordable move (to any larger
    candidate, not only the next one, so that non-convex error curves such as the
    jump to "dense" are handled) removes the most error per unit of cost advances.
    For truncated SVD the error curve is convex and this is the exact optimum of the
    relaxed problem. It stops when no affordable move reduces the error, so the
    total ends within one candidate step of the budget.

    Args:
        profiles: One :class:`RankProfile` per layer.
        budget: The global :class:`Budget`.
        weights: Non-negative weight of each layer's squared error (default all 1).

    Returns:
        Per layer, the index of the chosen candidate in ``profile.ranks``, or ``None``
        to keep the layer dense.

    Raises:
        ValueError: If even the smallest candidates exceed the budget.

    Examples:
        >>> fast = RankProfile.from_spectrum([0.5**i for i in range(8)], 8, 8,
        ...     params_per_rank=16, flops_per_rank=16, dense_params=64, dense_flops=64)
        >>> flat = RankProfile.from_spectrum([1.0] * 8, 8, 8,
        ...     params_per_rank=16, flops_per_rank=16, dense_params=64, dense_flops=64)
        >>> allocate_budget([fast, flat], Budget(params=0.5))  # rank 2 each
        [1, 1]
        >>> allocate_budget([fast, flat], Budget(params=0.75))  # the flat one stays dense
        [1, None]
    """
    use_flops = budget.quantity == "flops"
    if weights is None:
        weights = [1.0] * len(profiles)
    weights = [float(w) for w in weights]
    if len(weights) != len(profiles) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(
            f"weights must be {len(profiles)} finite non-negative numbers, got {weights!r}"
        )
    options = []  # per layer: (costs, weighted squared errors, candidate indices; None = dense)
    for profile, weight in zip(profiles, weights):
        costs = profile.flops if use_flops else profile.params
        dense_cost = profile.dense_flops if use_flops else profile.dense_params
        layer = sorted(
            (c, weight * e * e, i)
            for i, (c, e) in enumerate(zip(costs, profile.errors))
            if c < dense_cost
        )
        layer.append((dense_cost, 0.0, None))
        options.append(layer)
    limit = budget.fraction * sum(layer[-1][0] for layer in options) * (1 + 1e-12)
    chosen = [0] * len(options)
    spent = sum(layer[0][0] for layer in options)
    if spent > limit:
        raise ValueError(
            f"{budget!r} allows {limit:.0f} {budget.quantity} but the smallest factorization "
            f"of the targeted layers needs {spent}: raise the budget"
        )

    def best_move(layer: int) -> Tuple[float, int]:
        """(error removed per unit cost, target position) of the best affordable move."""
        here_cost, here_error, _ = options[layer][chosen[layer]]
        best = (0.0, -1)
        for position in range(chosen[layer] + 1, len(options[layer])):
            cost, error, _ = options[layer][position]
            if spent + cost - here_cost > limit:
                break
            gain = (here_error - error) / max(cost - here_cost, 1e-300)
            if gain > best[0]:
                best = (gain, position)
        return best

    moves = [best_move(layer) for layer in range(len(options))]
    while True:
        layer = max(range(len(options)), key=lambda k: moves[k][0], default=None)
        if layer is None or moves[layer][1] < 0:
            break
        target = moves[layer][1]
        step = options[layer][target][0] - options[layer][chosen[layer]][0]
        if spent + step > limit:  # the budget shrank since this move was planned
            moves[layer] = best_move(layer)
            continue
        spent += step
        chosen[layer] = target
        moves[layer] = best_move(layer)
    return [options[layer][index][2] for layer, index in enumerate(chosen)]
