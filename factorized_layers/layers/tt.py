"""Tensor-train (TT-matrix / MPO) linear layer."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..decompose.tt import (
    allocate_tt_svd_ranks,
    tt_core_spectra,
    tt_round,
    tt_svd,
    whiten_tt_inputs,
    whitened_tt_svd,
)
from ..functional.tt import tt_dense_weight, tt_linear, tt_plan
from ..ranks import POLICY_TYPES, RankProfile, check_positive
from ..ranks.tt import (
    allocate_tt_ranks,
    check_tt_shapes,
    feasible_tt_ranks,
    resolve_tt_ranks,
    tt_linear_flops,
    tt_params,
)
from ..registry import Capabilities, register_layer
from ..sources import LinearSource
from ..tensorize import check_tensorization, tensorize
from .base import Calibration, FactorizedLayer, Fit, fast_parameter, names_bad_input
from .svd import SVDLinear
from .tucker import TensorizationCandidate, TensorizationReport

__all__ = ["TTLinear", "default_tt_shapes", "tt_tensorization_candidates"]

Shape = Tuple[int, ...]

DEFAULT_CORES = 2
"""Cores of the default tensorization (see :class:`TTLinear` for why two)."""


def _padded(modes: Shape, d: int, leading: bool) -> Shape:
    ones = (1,) * (d - len(modes))
    return ones + modes if leading else modes + ones


def default_tt_shapes(
    out_features: int, in_features: int, n_cores: int = DEFAULT_CORES
) -> Tuple[Shape, Shape]:
    """``(out_shape, in_shape)`` of ``n_cores`` modes each, near-balanced.

    Each side is split by :func:`~factorized_layers.tensorize.tensorize` into at most
    ``n_cores`` modes; a side with fewer prime factors (a prime stays one mode) is
    padded with size-1 modes, trailing on the output side and leading on the input
    side, so two primes give the low-rank form ``(out, 1), (1, in)``.

    Examples:
        >>> default_tt_shapes(1536, 384)
        ((48, 32), (24, 16))
        >>> default_tt_shapes(1536, 384, 3)
        ((16, 12, 8), (8, 8, 6))
        >>> default_tt_shapes(12, 7)
        ((4, 3), (1, 7))
    """
    n_cores = _check_cores(n_cores)
    outs = _padded(tensorize(out_features, n_cores), n_cores, leading=False)
    ins = _padded(tensorize(in_features, n_cores), n_cores, leading=True)
    return outs, ins


def tt_tensorization_candidates(
    out_features: int, in_features: int, max_cores: int = 3
) -> List[Tuple[Shape, Shape]]:
    """The tensorizations ``from_dense`` compares, low-rank form first.

    The low-rank form ``(out, 1), (1, in)`` (two cores, TT-SVD = truncated SVD), then
    :func:`default_tt_shapes` for ``2 .. max_cores`` cores; a core count is skipped
    when neither side has that many prime factors (it would add only size-1 modes).

    Examples:
        >>> tt_tensorization_candidates(1536, 384)
        [((1536, 1), (1, 384)), ((48, 32), (24, 16)), ((16, 12, 8), (8, 8, 6))]
        >>> tt_tensorization_candidates(7, 5)
        [((7, 1), (1, 5))]
    """
    max_cores = _check_cores(max_cores, "max_cores")
    out = [((out_features, 1), (1, in_features))]
    for d in range(2, max_cores + 1):
        if d > 2 and max(len(tensorize(out_features, d)), len(tensorize(in_features, d))) < d:
            continue
        pair = default_tt_shapes(out_features, in_features, d)
        if pair not in out:
            out.append(pair)
    return out


def _check_cores(value: object, name: str = "n_cores") -> int:
    value = check_positive(name, value)
    if value < 2:
        raise ValueError(f"{name} must be at least 2 (a TT-matrix has >= 2 cores), got {value}")
    return value


def _shapes(
    in_features: int,
    out_features: int,
    in_shape: object,
    out_shape: object,
    n_cores: object,
) -> Tuple[Shape, Shape]:
    """The tensorization of the constructor / fit arguments (validated)."""
    given = None
    if out_shape is not None:
        outs = check_tensorization("out_shape", out_shape, out_features)
        given = len(outs)
    if in_shape is not None:
        ins = check_tensorization("in_shape", in_shape, in_features)
        given = len(ins) if given is None else given
    if n_cores is not None:
        n_cores = _check_cores(n_cores)
        if given is not None and given != n_cores:
            raise ValueError(
                f"n_cores={n_cores} does not match the given shapes' {given} modes "
                f"(out_shape={out_shape}, in_shape={in_shape})"
            )
    d = given if given is not None else (n_cores or DEFAULT_CORES)
    default_outs, default_ins = default_tt_shapes(out_features, in_features, max(d, 2))
    outs = outs if out_shape is not None else default_outs
    ins = ins if in_shape is not None else default_ins
    return check_tt_shapes(outs, ins)


def _is_float(rank: object) -> bool:
    return (
        isinstance(rank, numbers.Real)
        and not isinstance(rank, numbers.Integral)
        and not isinstance(rank, bool)
    )


@register_layer
class TTLinear(FactorizedLayer):
    r"""Linear layer whose weight is a tensor train (TT-matrix, MPO) of ``d`` cores.

    With ``in_features = prod(in_shape)`` and ``out_features = prod(out_shape)`` (row-major
    multi-indices ``(o_1..o_d)``, ``(i_1..i_d)``), core ``k`` (parameter ``core_k``) has
    shape ``(r_{k-1}, out_shape[k], in_shape[k], r_k)`` with ``r_0 = r_d = 1`` and

    .. math:: W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] \, G_2[:, o_2, i_2, :]
              \cdots G_d[:, o_d, i_d, :] .

    The bond ranks ``(r_1, ..., r_{d-1})`` are the layer's ``rank``; only the cores
    are stored, ``sum_k r_{k-1} o_k i_k r_k`` entries. Two cores with
    ``out_shape=(out, 1)``, ``in_shape=(1, in)`` are a plain low-rank matrix (TT-SVD is
    then the truncated SVD); other shapes are sums of Kronecker products (``d = 2``)
    or longer trains.

    The forward pass (:func:`factorized_layers.functional.tt_linear`) contracts the
    input with one core at a time, each a single GEMM over the whole running
    intermediate, from the end of the train that costs fewer multiply-accumulates
    (:func:`factorized_layers.ranks.tt_linear_flops`); the dense weight is built first
    only where the cores cost more per row than the dense weight and the batch
    amortises the build.

    By default (no shapes) each side is split into ``n_cores = 2`` near-balanced
    modes (:func:`default_tt_shapes`, e.g. ``384 -> (24, 16)``,
    ``1536 -> (48, 32)``; primes are padded with size-1 modes). Two cores were chosen
    on all-MiniLM-L6-v2's 1536 x 384 layers at half the parameters (TT-SVD with the
    error-minimising rank split): two balanced cores gave a weight error of 0.60-0.61
    at 12-13 times the dense multiply-accumulates per row, three cores 0.645-0.65 at
    24-33 times, four 0.61-0.62 at 42-67 times (see ``benchmarks/bench_tt_linear.py``);
    the low-rank form ``(out, 1), (1, in)`` beats them all there (0.49-0.54 at half
    the dense FLOPs). :meth:`from_dense` with a ``float`` rank searches the
    tensorization itself (:func:`tt_tensorization_candidates`).

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        rank: ``int`` -- the largest bond rank (every bond clipped to what its
            unfoldings allow); a tuple -- one rank per bond (``d - 1``); ``float`` in
            ``(0, 1]`` -- a fraction of the dense weight's parameters with a uniform
            bond rank (:func:`factorized_layers.ranks.resolve_tt_ranks`;
            :meth:`from_dense` splits a float budget by error instead).
        in_shape: Modes of the input features (product ``in_features``), one per core.
        out_shape: Modes of the output features (product ``out_features``).
        n_cores: Cores of the default tensorization (default 2); must match given shapes.
        bias: If ``False``, the layer has no additive bias.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Attributes:
        core_k: ``(r_{k-1}, out_shape[k], in_shape[k], r_k)`` learnable cores.
        bias: ``(out_features,)`` learnable bias, or ``None``.
        rank: The concrete bond ranks (tuple of ``d - 1`` ints).
        tensorization_report: :class:`~factorized_layers.layers.tucker.TensorizationReport`
            of :meth:`from_dense` (its ``ranks`` are bond ranks; ``None`` for a layer
            built by the constructor).

    Examples:
        >>> layer = TTLinear(384, 1536, rank=8)
        >>> layer.out_shape, layer.in_shape, layer.rank
        ((48, 32), (24, 16), (8,))
        >>> layer.core_0.shape, layer.core_1.shape
        (torch.Size([1, 48, 24, 8]), torch.Size([8, 32, 16, 1]))
        >>> layer(torch.randn(2, 384)).shape
        torch.Size([2, 1536])
        >>> dense = nn.Linear(64, 48)
        >>> compressed = TTLinear.from_dense(dense, rank=0.5)
        >>> sum(c.numel() for c in compressed.cores()) <= 0.5 * 64 * 48
        True
    """

    source = LinearSource()
    capabilities = Capabilities(
        calibration=True,
        rank_profile=True,
        truncation=True,
        ridge_option="ridge",
        profile_options=("ridge",),
    )
    in_features: int
    out_features: int
    in_shape: Shape
    out_shape: Shape
    rank: Shape

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: object,
        *,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        n_cores: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = check_positive("in_features", in_features)
        self.out_features = check_positive("out_features", out_features)
        self.out_shape, self.in_shape = _shapes(
            in_features, out_features, in_shape, out_shape, n_cores
        )
        self.rank = resolve_tt_ranks(rank, self.out_shape, self.in_shape)
        self.tensorization_report: TensorizationReport | None = None
        self._plan = tt_plan(self.out_shape, self.in_shape, self.rank)
        self._names = tuple(f"core_{k}" for k in range(len(self.out_shape)))
        full = (1, *self.rank, 1)
        for k, (name, o, i) in enumerate(zip(self._names, self.out_shape, self.in_shape)):
            shape = (full[k], o, i, full[k + 1])
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def cores(self) -> Tuple[torch.Tensor, ...]:
        """The cores in train order."""
        return tuple(getattr(self, name) for name in self._names)

    def reset_parameters(self) -> None:
        """Initialise so that ``dense_weight()`` has ``nn.Linear``'s default variance.

        A weight entry is a sum over ``prod(r_k)`` paths of products of one entry per
        core, so with independent zero-mean entries its variance is
        ``prod(r_k) * prod(var_k)``. Core ``k`` is drawn uniformly with
        ``var_k = (1 / (3 in_features))^(1/d) / sqrt(r_{k-1} r_k)``, which gives
        ``nn.Linear``'s ``1 / (3 in_features)`` with the same scale in every core. The
        bias is drawn as ``nn.Linear``'s.
        """
        d = len(self._names)
        full = (1, *self.rank, 1)
        target = (1.0 / (3.0 * self.in_features)) ** (1.0 / d)
        for k, core in enumerate(self.cores()):
            variance = target / math.sqrt(full[k] * full[k + 1])
            bound = math.sqrt(3.0 * variance)
            nn.init.uniform_(core, -bound, bound)
        if self.bias is not None:
            bias_bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bias_bound, bias_bound)

    @names_bad_input
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return tt_linear(
            input,
            [fast_parameter(self, name) for name in self._names],
            fast_parameter(self, "bias"),
            plan=self._plan,
        )

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight the cores represent (differentiable)."""
        return tt_dense_weight(self.cores())

    def flops_per_position(self) -> int:
        """Multiply-accumulates per input row (token) of the cheaper core-by-core order."""
        return min(tt_linear_flops(self.out_shape, self.in_shape, self.rank))

    @classmethod
    def rank_profile(
        cls, linear: nn.Linear, *, calibration: Calibration = None, ridge: float = 1e-6
    ) -> RankProfile:
        """Parameter budgets with an error bound each, for rank policies and ``Budget``.

        Candidate ``r`` is the float budget ``r * (in + out) / (in * out)``: the
        parameters of the rank-``r`` low-rank form (two cores ``(out, 1), (1, in)``),
        for every ``r`` below the break-even rank, then the whole budget 1.0 (exact).
        :meth:`from_dense` at that budget tries the low-rank form among its
        tensorizations and keeps the best, whose error is at most the truncated-SVD
        optimum of rank ``r``: the profile's errors (that optimum) are upper bounds,
        so a policy's error target is met. With calibration they are the
        whitened-SVD optima of the *output* error (:meth:`SVDLinear.rank_profile` with
        the same ``calibration`` and ``ridge``), which the calibrated low-rank
        candidate reaches. Policies therefore search the tensorization and cannot be
        combined with ``in_shape``/``out_shape``/``n_cores``.

        Args:
            linear: The dense layer.
            calibration: ``InputStats`` of the layer's inputs, or their Gram matrix.
            ridge: Relative ridge of the whitening (used only with calibration).
        """
        svd_profile = SVDLinear.rank_profile(linear, calibration=calibration, ridge=ridge)
        dense = linear.in_features * linear.out_features
        keep = [i for i, params in enumerate(svd_profile.params) if params < dense]
        return dataclasses.replace(
            svd_profile,
            ranks=tuple(svd_profile.params[i] / dense for i in keep) + (1.0,),
            params=tuple(svd_profile.params[i] for i in keep) + (dense,),
            flops=tuple(svd_profile.flops[i] for i in keep) + (dense,),
            errors=tuple(svd_profile.errors[i] for i in keep) + (0.0,),
        )

    @classmethod
    def _resolve_rank(cls, linear, spec, gram, options):
        if isinstance(spec, POLICY_TYPES) and any(
            options.get(name) is not None for name in ("in_shape", "out_shape", "n_cores")
        ):
            raise ValueError(
                f"rank policy {spec!r} chooses among tensorizations itself; give an int, "
                "tuple or float rank together with in_shape/out_shape/n_cores"
            )
        return super()._resolve_rank(linear, spec, gram, options)

    @classmethod
    def fit_factors(
        cls,
        linear: nn.Linear,
        rank: object,
        *,
        gram: torch.Tensor | None = None,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        n_cores: int | None = None,
        max_cores: int = 3,
        compute_dtype: torch.dtype | None = None,
        ridge: float = 1e-6,
    ) -> Fit:
        """TT cores of a trained ``nn.Linear`` by TT-SVD: the fit of :meth:`from_dense`.

        ``TTLinear.from_dense(linear, rank, calibration=None, **options)`` takes these
        options.

        *Tensorization.* With ``in_shape``/``out_shape`` (a missing one gets the
        default of as many cores) or ``n_cores`` given, that tensorization is used.
        Without them and with a ``float`` rank, every candidate of
        :func:`tt_tensorization_candidates` (the low-rank form, then balanced shapes of
        ``2 .. max_cores`` cores) that fits the budget is decomposed, and among those
        whose core-by-core forward costs fewer multiply-accumulates per row than the
        dense layer (the low-rank form always does) the one with the lowest weight
        error is kept (with calibration, see below); an ``int`` or tuple rank uses
        :func:`default_tt_shapes` with 2 cores. The outcome is
        ``layer.tensorization_report``. On all-MiniLM-L6-v2's 1536 x 384 layers the
        search ends at the low-rank form: real weights there have little Kronecker
        structure (and balanced trains at half the parameters cost 12-32 times the
        dense FLOPs). On meta the plan is the low-rank form.

        *Ranks.* A ``float`` budget (fraction of ``in_features * out_features`` core
        parameters) is split across bonds to minimise the TT-SVD error
        (:func:`factorized_layers.decompose.allocate_tt_svd_ranks`, float32): exactly
        for two cores (Eckart--Young) and three (every ``r_1`` with its largest
        fitting ``r_2``, scored by the exact conditional spectra of the second SVD);
        for more cores on the bound ``sum_k sum_{j > r_k} s_{k,j}^2`` (``s_{k,j}``:
        singular values of the bond-``k`` unfolding): starting from the exact ranks,
        the singular value whose removal costs the least squared error per parameter
        saved is dropped until the cores fit, then bonds are grown and exchanged while
        the bound drops (:func:`factorized_layers.ranks.allocate_tt_ranks`). The
        parameters never exceed the budget.

        *Calibration.* With ``calibration`` (input statistics or a Gram ``X^T X``) the
        budget is split on the spectra of the weight whitened per input mode and the
        cores come from :func:`factorized_layers.decompose.whitened_tt_svd` (exact
        activation-whitened SVD for the low-rank form; a Kronecker approximation of
        the Gram otherwise, never worse on the data than the plain TT-SVD). Among
        tensorizations, the one kept has the lowest root mean square of output and
        weight error among those whose output error is at most the low-rank form's
        (the bound :meth:`rank_profile` promises).

        The decomposition runs under ``no_grad`` on the weight's device in float32
        (float64 for float64 weights or ``compute_dtype=torch.float64``), then the
        cores are cast back. A meta source gives a meta layer (the low-rank form for a
        float rank without shapes, else the default tensorization; uniform ranks)
        without computing.

        Args:
            linear: The trained layer (any ``nn.Linear`` subclass).
            rank: ``int`` (largest bond rank), tuple of bond ranks, ``float`` budget,
                or a rank policy evaluated on :meth:`rank_profile` (a float budget).
            gram: The ``(in, in)`` input Gram matrix from ``calibration``, or ``None``.
            in_shape: Input modes (product ``in_features``).
            out_shape: Output modes (product ``out_features``).
            n_cores: Cores of the default tensorization.
            max_cores: Most cores among the searched tensorizations.
            compute_dtype: ``torch.float32`` or ``torch.float64``.
            ridge: Relative ridge of the whitening (used only with calibration).

        Examples:
            >>> dense = nn.Linear(24, 16)
            >>> layer = TTLinear.from_dense(dense, rank=100)
            >>> torch.allclose(layer.dense_weight(), dense.weight, atol=1e-5)
            True
        """
        in_features, out_features = linear.in_features, linear.out_features
        weight = linear.weight
        meta = weight.device.type == "meta"
        max_cores = _check_cores(max_cores, "max_cores")
        search = in_shape is None and out_shape is None and n_cores is None
        budget = None
        if _is_float(rank):
            fraction = float(rank)
            if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
                raise ValueError(
                    f"a float rank is a fraction of parameters in (0, 1], got {rank!r}"
                )
            budget = int(math.floor(fraction * in_features * out_features + 1e-9))
        candidates = []
        if search and budget is not None:
            candidates = [
                (o, i)
                for o, i in tt_tensorization_candidates(out_features, in_features, max_cores)
                if tt_params(o, i, (1,) * (len(o) - 1)) <= budget
            ]
            # On meta (no values to compare) the plan is the low-rank form, which
            # always saves parameters and FLOPs below a budget of 1.
            candidates = candidates[:1] if meta else candidates
        if not candidates:
            candidates = [_shapes(in_features, out_features, in_shape, out_shape, n_cores)]
        results = [
            _decompose(weight, outs, ins, rank, budget, compute_dtype, gram, ridge)
            for outs, ins in candidates
        ]
        dense = in_features * out_features
        saving = [
            min(tt_linear_flops(c.out_shape, c.in_shape, c.ranks)) < dense for c, _ in results
        ]
        chosen = _choose([r[0] for r in results], gram is not None, saving)
        report = TensorizationReport(tuple(r[0] for r in results), chosen, budget)
        best, cores = results[chosen]
        config = {
            "in_features": in_features,
            "out_features": out_features,
            "rank": best.ranks,
            "in_shape": best.in_shape,
            "out_shape": best.out_shape,
            "bias": linear.bias is not None,
        }
        values = {f"core_{k}": core for k, core in enumerate(cores)}
        return Fit(config, values, {"tensorization_report": report})

    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this layer's structure (JSON-serialisable).

        ``TTLinear.from_config(layer.get_config())`` has the same parameter names and
        shapes (freshly initialised values);
        :func:`factorized_layers.checkpoint.save_factorized` stores it.
        """
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": list(self.rank),
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "bias": self.bias is not None,
        }

    def truncate_factors(self, rank: object) -> Fit:
        """The cores of :meth:`truncated`: lower bond ranks by TT-rounding of the own cores.

        :func:`~factorized_layers.decompose.tt_round` (QR right to left, truncated
        SVDs left to right) re-decomposes the cores, never the dense weight; the
        result is TT-SVD of ``dense_weight()`` at the new ranks, so a fine-tuned layer
        can be compressed further. A ``float`` budget is split across bonds as in
        :meth:`from_dense`, on the exact bond spectra of the current train
        (:func:`~factorized_layers.decompose.tt_core_spectra`). Same tensorization;
        device, dtype, bias, ``requires_grad`` flags and ``training`` are kept.

        Args:
            rank: ``int`` (largest bond rank), tuple of bond ranks, or ``float``
                fraction of the *dense* weight's parameters; each bond keeps at most
                its current rank.

        Examples:
            >>> layer = TTLinear(64, 64, rank=(8, 8), in_shape=(4, 4, 4), out_shape=(4, 4, 4))
            >>> layer.truncated(4).rank
            (4, 4)
        """
        outs, ins = self.out_shape, self.in_shape
        if _is_float(rank):
            dense = self.in_features * self.out_features
            fraction = float(rank)
            if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
                raise ValueError(
                    f"a float rank is a fraction of parameters in (0, 1], got {rank!r}"
                )
            budget = int(math.floor(fraction * dense + 1e-9))
            if self.core_0.device.type == "meta":
                requested = resolve_tt_ranks(rank, outs, ins)
            else:
                spectra = [s.tolist() for s in tt_core_spectra(self.cores())]
                # Spectra are padded to the current ranks: the limits are these ranks.
                requested = _allocate_current(spectra, outs, ins, self.rank, budget)
        else:
            requested = resolve_tt_ranks(rank, outs, ins)
        ranks = feasible_tt_ranks(outs, ins, [min(a, b) for a, b in zip(requested, self.rank)])
        result = tt_round(self.cores(), ranks)
        values = {name: core for name, core in zip(self._names, result.cores)}
        return Fit(dict(self.get_config(), rank=list(result.ranks)), values)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, in_shape={self.in_shape}, out_shape={self.out_shape}, "
            f"bias={self.bias is not None}"
        )


def _allocate_current(
    spectra: List[List[float]], outs: Shape, ins: Shape, current: Shape, budget: int
) -> Shape:
    """:func:`allocate_tt_ranks` for a train whose bonds are at most ``current``.

    Each bond's spectrum is zero beyond its current rank, so the padded spectra
    (zeros up to :func:`max_tt_ranks`) give the same bound; the allocation never
    keeps more than the current ranks because zeros cost parameters and save nothing.
    A budget below even all ranks 1 keeps ranks 1.
    """
    if tt_params(outs, ins, (1,) * len(current)) > budget:
        return (1,) * len(current)
    return allocate_tt_ranks(spectra, outs, ins, budget)


def _decompose(
    weight: torch.Tensor,
    out_shape: Shape,
    in_shape: Shape,
    rank: object,
    budget: int | None,
    compute_dtype: torch.dtype | None,
    gram: torch.Tensor | None,
    ridge: float,
) -> Tuple[TensorizationCandidate, Tuple[torch.Tensor, ...]]:
    """TT-SVD of ``weight`` in one tensorization (ranks allocated for a float budget)."""
    meta = weight.device.type == "meta"
    if meta or budget is None:
        ranks = resolve_tt_ranks(rank, out_shape, in_shape)
    else:
        ranked = (
            weight
            if gram is None
            else whiten_tt_inputs(
                weight, out_shape, in_shape, gram, ridge=ridge, compute_dtype=compute_dtype
            )
        )
        ranks = allocate_tt_svd_ranks(
            ranked, out_shape, in_shape, budget, compute_dtype=compute_dtype
        )
    output_error = None
    if gram is None:
        fit = tt_svd(weight, out_shape, in_shape, ranks, compute_dtype=compute_dtype)
    else:
        fit, output_error, _ = whitened_tt_svd(
            weight, out_shape, in_shape, ranks, gram, ridge=ridge, compute_dtype=compute_dtype
        )
    candidate = TensorizationCandidate(
        out_shape,
        in_shape,
        fit.ranks,
        tt_params(out_shape, in_shape, fit.ranks),
        fit.error,
        output_error,
    )
    return candidate, fit.cores


def _choose(
    candidates: Sequence[TensorizationCandidate], calibrated: bool, saving: Sequence[bool]
) -> int:
    """Index of the candidate :meth:`TTLinear.from_dense` keeps.

    Only candidates whose core-by-core forward costs fewer multiply-accumulates per
    row than the dense layer (``saving``) compete, when there is one. Without
    calibration: the lowest weight error. With calibration: among the candidates
    whose output error is at most the low-rank form's (the whitened-SVD optimum
    :meth:`TTLinear.rank_profile` promises), the lowest root mean square of output and
    weight error, as :class:`~factorized_layers.layers.tucker.TuckerLinear` does
    (the output error alone favours fits to the calibration data only).
    """
    pool = [i for i in range(len(candidates)) if saving[i]] or list(range(len(candidates)))
    if not calibrated:
        return min(pool, key=lambda i: (candidates[i].error, i))
    bound = min(
        (
            c.output_error
            for c in candidates
            if len(c.out_shape) == 2 and c.out_shape[1] == 1 and c.in_shape[0] == 1
        ),
        default=math.inf,
    )
    eligible = [i for i in pool if candidates[i].output_error <= bound]
    return min(
        eligible or pool,
        key=lambda i: (math.hypot(candidates[i].output_error, candidates[i].error), i),
    )
