"""Rank specifications and the parameter / FLOP arithmetic every layer shares.

A *rank spec* says how much of a weight to keep:

* ``int`` -- that rank exactly, ``1 <= rank <= min(rows, cols)``;
* ``float`` in ``(0, 1]`` -- the largest rank whose factor parameters are at most
  that fraction of the dense weight's parameters (never below 1).

All counts are plain Python integers so they can be used in shape arithmetic, in
reports and under ``torch.compile`` alike.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence, Tuple, Union

__all__ = [
    "check_positive",
    "RankSpec",
    "RankPolicy",
    "RankProfile",
    "Energy",
    "ErrorBound",
    "EVBMF",
    "Budget",
    "select_rank",
    "allocate_budget",
    "evbmf_rank",
    "resolve_matrix_rank",
    "low_rank_params",
    "low_rank_break_even",
    "dense_linear_flops",
    "low_rank_linear_flops",
    "cp_params",
    "cp_max_rank",
    "resolve_cp_rank",
    "dense_conv_flops",
    "cp_conv_flops",
]

RankSpec = Union[int, float]


def check_positive(name: str, value: int) -> int:
    """``value`` as an ``int``; ``ValueError`` naming ``name`` unless it is a positive integer."""
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


# --------------------------------------------------------------------------------------
# Rank policies: rules that pick a rank from what a layer's spectrum says.
# --------------------------------------------------------------------------------------


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

        May be empty: then no factorization of this layer pays off.
        """
        return self._subset(
            [
                i
                for i in range(len(self.ranks))
                if self.params[i] < self.dense_params and self.flops[i] < self.dense_flops
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


def _evbmf_tau(x: float, alpha: float) -> float:
    """Positive root of the EVBMF shrinkage equation (Nakajima et al. 2013, eq. 15)."""
    shifted = x - (1.0 + alpha)
    return 0.5 * (shifted + math.sqrt(max(shifted * shifted - 4.0 * alpha, 0.0)))


def _evbmf_free_energy(
    sigma2: float, s2: Sequence[float], rows: int, cols: int, residual: float, x_bar: float
) -> float:
    alpha = rows / cols
    energy = residual / (cols * sigma2) + (rows - len(s2)) * math.log(sigma2)
    for value in s2:
        x = value / (cols * sigma2)
        if x > x_bar:
            tau = _evbmf_tau(x, alpha)
            energy += x - tau + math.log((tau + 1.0) / x) + alpha * math.log(tau / alpha + 1.0)
        else:
            energy += x - math.log(x)
    return energy


def _golden_section_minimum(fn, low: float, high: float, iterations: int = 100) -> float:
    """Minimiser of a unimodal-ish ``fn`` on ``[low, high]`` by golden-section search."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
    return (a + b) / 2.0


def evbmf_rank(singular_values: Sequence[float], rows: int, cols: int, frobenius_sq: float) -> int:
    """Rank that empirical variational Bayesian matrix factorization keeps.

    Args:
        singular_values: Leading singular values of the matrix, descending (all of them,
            or a prefix; ``frobenius_sq`` accounts for the rest).
        rows: Rows of the matrix.
        cols: Columns of the matrix.
        frobenius_sq: Squared Frobenius norm of the whole matrix.

    Returns:
        The number of singular values above the EVBMF threshold (may be 0; callers clamp).

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> signal = torch.randn(60, 3, generator=g) @ torch.randn(3, 80, generator=g)
        >>> y = signal + 0.1 * torch.randn(60, 80, generator=g)
        >>> evbmf_rank(torch.linalg.svdvals(y).tolist(), 60, 80, float(y.square().sum()))
        3
    """
    L, M = (rows, cols) if rows <= cols else (cols, rows)
    s = sorted((float(v) for v in singular_values), reverse=True)[:L]
    if not s or s[0] <= 0.0:
        return 0
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    s2 = [v * v for v in s]
    residual = max(frobenius_sq - sum(s2), 0.0)
    # Search bounds for the noise variance (Nakajima et al. 2013, Sec. 4).
    upper = (sum(s2) + residual) / (L * M)
    h_bar = min(int(math.ceil(L / (1.0 + alpha))) - 1, len(s2)) - 1
    tail = s2[h_bar + 1 :] or [s2[-1]]
    lower = max(s2[min(h_bar + 1, len(s2) - 1)] / (M * x_bar), sum(tail) / len(tail) / M)
    lower = max(min(lower, upper), upper * 1e-12)
    s2 = [max(v, 1e-300) for v in s2]
    log_sigma2 = _golden_section_minimum(
        lambda t: _evbmf_free_energy(math.exp(t), s2, L, M, residual, x_bar),
        math.log(lower),
        math.log(upper),
    )
    threshold = math.sqrt(M * math.exp(log_sigma2) * (1.0 + tau_bar) * (1.0 + alpha / tau_bar))
    return sum(1 for v in s if v > threshold)


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


def _check_shape(shape) -> tuple:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive integers, got {shape!r}") from None
    if not dims:
        raise ValueError("shape must have at least one mode, got ()")
    return tuple(check_positive(f"shape[{i}]", d) for i, d in enumerate(dims))


def cp_params(shape, rank: int) -> int:
    """Number of entries in the factor matrices of a rank-``rank`` CP tensor of ``shape``.

    A CP (CANDECOMP/PARAFAC) tensor stores one ``(size, rank)`` factor per mode, so
    the count is ``rank * sum(shape)`` (weights folded into the factors).

    Args:
        shape: Mode sizes, e.g. ``(out_channels, in_channels, kh, kw)`` of a kernel.
        rank: Number of rank-1 terms.

    Examples:
        >>> cp_params((128, 64, 3, 3), 37)
        7326
    """
    return rank * sum(_check_shape(shape))


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


def dense_conv_flops(in_channels: int, out_channels: int, kernel_size) -> int:
    """Multiply-accumulates of a dense convolution per output pixel (bias excluded).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel extent per spatial dimension, e.g. ``(3, 3)``.

    Examples:
        >>> dense_conv_flops(64, 128, (3, 3))
        73728
    """
    return in_channels * out_channels * math.prod(_check_shape(kernel_size))


def cp_conv_flops(
    in_channels: int,
    out_channels: int,
    kernel_size,
    rank: int,
    stride=1,
    separable: bool = False,
) -> int:
    """Multiply-accumulates of a CP convolution per output pixel (bias excluded).

    The ``in -> rank`` contraction runs on every *input* pixel (``prod(stride)`` of
    them per output pixel), the depthwise spatial filtering costs ``prod(kernel_size)``
    per channel for the merged kernel and ``sum(kernel_size)`` for the separable one
    (counted at the output resolution), and ``rank -> out`` runs per output pixel.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel extent per spatial dimension.
        rank: CP rank.
        stride: ``int`` or per-dimension strides.
        separable: Count one 1-D depthwise pass per dimension instead of one merged kernel.

    Examples:
        >>> cp_conv_flops(64, 128, (3, 3), 37)
        7437
        >>> dense_conv_flops(64, 128, (3, 3)) / cp_conv_flops(64, 128, (3, 3), 37)
        9.913...
    """
    kernel = _check_shape(kernel_size)
    strides = (stride,) * len(kernel) if isinstance(stride, numbers.Integral) else stride
    spatial = sum(kernel) if separable else math.prod(kernel)
    return rank * (in_channels * math.prod(_check_shape(strides)) + spatial + out_channels)


# ---------------------------------------------------------------------------
# Tucker: parameter counts, rank resolution and error-minimising allocation
# ---------------------------------------------------------------------------


def _check_modes(shape) -> tuple[int, ...]:
    modes = tuple(shape)
    if not modes:
        raise ValueError("a Tucker shape needs at least one mode, got ()")
    return tuple(check_positive("mode size", m) for m in modes)


def tucker_params(shape, ranks) -> int:
    """Entries stored by a Tucker tensor of ``shape`` with multilinear ``ranks``.

    The core holds ``prod(ranks)`` entries and every mode with ``rank < size`` a
    ``(size, rank)`` factor. A full-rank mode's square factor is folded into the core
    (an invertible change of basis loses nothing), so it costs nothing.

    Examples:
        >>> tucker_params((1536, 384), (143, 143))
        295009
        >>> tucker_params((4, 5), (4, 2))
        18
    """
    return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks) if r < n)


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
    import itertools

    import torch

    shape = _check_modes(shape)
    order = len(shape)
    limits = tuple(int(m) for m in energy.shape)
    if limits != max_tucker_ranks(shape):
        raise ValueError(
            f"energy must have shape {max_tucker_ranks(shape)} for shape {shape}, got {limits}"
        )
    smallest = tucker_params(shape, (1,) * order)
    if smallest > budget:
        raise ValueError(
            f"a budget of {budget:.0f} parameters is below the smallest Tucker "
            f"factorization of shape {shape} (all ranks 1: {smallest})"
        )
    cumulative = energy.detach().to(torch.float64, copy=True)
    for dim in range(order):
        cumulative = cumulative.cumsum(dim)
    flat = cumulative.flatten().tolist()
    strides = [math.prod(limits[k + 1 :]) for k in range(order)]

    def captured(r: tuple[int, ...]) -> float:
        return flat[sum((min(x, m) - 1) * st for x, m, st in zip(r, limits, strides))]

    def feasible(r: tuple[int, ...]) -> bool:
        total = math.prod(r)
        return all(x == n or x * x <= total for x, n in zip(r, shape))

    moves = [
        subset
        for size in range(1, order + 1)
        for subset in itertools.combinations(range(order), size)
    ]
    tiny = 1e-15 * max(flat[-1], 1e-300)

    def greedy(jumps: bool, caps: tuple[int, ...]) -> tuple[int, ...]:
        ranks = (1,) * order
        params, kept = tucker_params(shape, ranks), captured(ranks)
        while True:
            candidates = []
            for subset in moves:
                if all(ranks[k] < caps[k] for k in subset):
                    candidates.append(
                        tuple(r + 1 if k in subset else r for k, r in enumerate(ranks))
                    )
            if jumps:
                for k in range(order):
                    if ranks[k] < shape[k]:
                        candidates.append(
                            tuple(shape[k] if j == k else r for j, r in enumerate(ranks))
                        )
            best = None
            for new in candidates:
                new_params = tucker_params(shape, new)
                if new_params > budget or not feasible(new):
                    continue
                gain = captured(new) - kept
                cost = new_params - params
                if gain <= tiny and cost >= 0:
                    continue
                key = (math.inf, gain, -cost) if cost <= 0 else (gain / cost, gain, -cost)
                if best is None or key > best[0]:
                    best = (key, new, new_params)
            if best is None:
                return ranks
            _, ranks, params = best
            kept = captured(ranks)

    def fits(r: tuple[int, ...]) -> bool:
        return (
            all(1 <= x <= n for x, n in zip(r, shape))
            and all(x == n or x <= m for x, n, m in zip(r, shape, limits))
            and feasible(r)
            and tucker_params(shape, r) <= budget
        )

    def exchange(ranks: tuple[int, ...]) -> tuple[int, ...]:
        # Local search: move rank between two modes (one down, the other up by 1-3)
        # while that captures more energy within the budget.
        kept = captured(ranks)
        for _ in range(50 * order):
            best = None
            for i in range(order):
                for j in range(order):
                    if i == j or ranks[i] == 1:
                        continue
                    for step in (1, 2, 3):
                        new = list(ranks)
                        new[i] -= 1
                        new[j] += step
                        new = tuple(new)
                        if fits(new) and captured(new) > kept + tiny:
                            if best is None or captured(new) > best[0]:
                                best = (captured(new), new)
            if best is None:
                return ranks
            kept, ranks = best
        return ranks

    # Jumping a mode to full size can free parameters (a matrix's U G V^T becomes
    # the cheaper (U G) V^T), but taken early it can also lock a large core in, and
    # growing a small mode to full size (folding it) can do the same. Run the greedy
    # with and without jumps and with ranks kept below the mode sizes, add the
    # balanced split, polish each by exchanges and keep the lowest error.
    below = tuple(min(m, n - 1) if n > 1 else 1 for m, n in zip(limits, shape))
    starts = [greedy(False, limits), greedy(True, limits), greedy(False, below)]
    fraction = budget / math.prod(shape)
    if fraction <= 1:
        try:
            starts.append(resolve_tucker_ranks(fraction, shape))
        except ValueError:
            pass
    results = [exchange(r) for r in starts if fits(r)]
    return max(results, key=captured)


def tucker_linear_flops(
    out_shape, in_shape, out_ranks, in_ranks, batch: int = 1
) -> tuple[int, int]:
    """Multiply-accumulates of the two Tucker linear schedules (bias excluded).

    *Input first*: the input's modes are multiplied by the in-factors one at a time
    (full-rank modes have none), then by the core as one ``(prod out_ranks) x
    (prod in_ranks)`` GEMM, then by the out-factors. *Weight first*: the dense weight
    is rebuilt the same way, then one ``F.linear``.

    Returns:
        ``(input_first, weight_first)``.

    Examples:
        >>> tucker_linear_flops((16, 12, 8), (8, 8, 6), (16, 12, 8), (8, 8, 6))
        (589824, 589824)
    """

    def chain(size: int, source, target) -> tuple[int, int]:
        # Mode by mode from `source` sizes to `target` sizes; equal sizes mean a
        # folded (identity) factor and cost no multiply-accumulates.
        macs = 0
        for a, b in zip(source, target):
            if a != b:
                macs += size * b
            size = size // a * b
        return macs, size

    in_macs, s = chain(math.prod(in_shape), in_shape, in_ranks)
    core = s * math.prod(out_ranks)
    out_macs, _ = chain(math.prod(out_ranks), out_ranks, out_shape)
    out_features, in_features = math.prod(out_shape), math.prod(in_shape)
    input_first = batch * (in_macs + core + out_macs)
    build_out = out_macs
    build_in, _ = chain(s, in_ranks, in_shape)
    weight_first = s * build_out + out_features * build_in + batch * out_features * in_features
    return input_first, weight_first


__all__ += [
    "tucker_params",
    "max_tucker_ranks",
    "resolve_tucker_ranks",
    "allocate_tucker_ranks",
    "tucker_linear_flops",
]
