"""Tensor-train (TT-matrix) decompositions of weight matrices: TT-SVD and TT-rounding.

A weight ``W`` of shape ``(prod(out_shape), prod(in_shape))`` is viewed as the
``d``-way tensor of the mode pairs ``(o_k, i_k)`` (:func:`tt_tensor`) and split into
cores ``(r_{k-1}, out_shape[k], in_shape[k], r_k)``:

* :func:`tt_svd` -- sequential truncated SVDs (Oseledets 2011), whose error is at
  most ``sqrt(sum_k sum_{j > r_k} s_{k,j}^2)`` with ``s_{k,j}`` the singular values of
  the bond-``k`` unfolding (:func:`tt_spectra`), and exactly the root of the sum of
  the squared singular values it discards;
* :func:`tt_round` -- TT-rounding of existing cores: right-to-left QR
  orthogonalisation, then left-to-right truncated SVDs; never forms the weight;
* :func:`tt_core_spectra` -- the bond spectra of a TT from its cores (the canonical
  sweep), for rank allocation on a trained layer;
* :func:`whitened_tt_svd` -- the output-error-aware TT-SVD with per-input-mode
  whitening (calibration).
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch

from ..functional.tt import tt_dense_weight
from ..ranks.tt import (
    allocate_tt_ranks,
    check_tt_shapes,
    feasible_tt_ranks,
    resolve_tt_ranks,
    tt_params,
)
from ._common import (
    _check_finite,
    _check_gram,
    _check_matrix,
    _compute_dtype,
    _normalized_gram,
    _whitening_eig,
)
from .whiten import normalized_whitening_eig

__all__ = [
    "TTDecomposition",
    "tt_tensor",
    "tt_spectra",
    "allocate_tt_svd_ranks",
    "tt_svd",
    "tt_round",
    "tt_core_spectra",
    "tt_to_matrix",
    "whiten_tt_inputs",
    "whitened_tt_svd",
]

Shape = Tuple[int, ...]


class TTDecomposition(NamedTuple):
    """A TT-matrix: ``cores[k]`` of shape ``(r_{k-1}, out_shape[k], in_shape[k], r_k)``."""

    cores: Tuple[torch.Tensor, ...]
    """The cores, ``r_0 = r_d = 1``."""
    error: float
    """Relative Frobenius error of the approximation (NaN on meta, 0 for a zero input)."""

    @property
    def ranks(self) -> Shape:
        """The bond ranks ``(r_1, ..., r_{d-1})``."""
        return tuple(int(c.shape[3]) for c in self.cores[:-1])


def tt_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``(prod(out_shape), prod(in_shape))`` matrix of TT cores (differentiable).

    Examples:
        >>> tt_to_matrix([torch.ones(1, 2, 3, 1), torch.ones(1, 4, 5, 1)]).shape
        torch.Size([8, 15])
    """
    return tt_dense_weight(cores)


def _check_weight_shapes(weight, out_shape, in_shape) -> Tuple[Shape, Shape]:
    """The checked shapes; ``ValueError`` unless their products are ``weight``'s sides."""
    outs, ins = check_tt_shapes(out_shape, in_shape)
    if tuple(weight.shape) != (math.prod(outs), math.prod(ins)):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not match out_shape={outs} "
            f"(product {math.prod(outs)}) and in_shape={ins} (product {math.prod(ins)})"
        )
    return outs, ins


def tt_tensor(
    weight: torch.Tensor, out_shape: Sequence[int], in_shape: Sequence[int]
) -> torch.Tensor:
    """``weight`` as the tensor of shape ``(o_1 i_1, ..., o_d i_d)`` TT-SVD decomposes.

    Examples:
        >>> w = torch.arange(24.0).reshape(4, 6)
        >>> tt_tensor(w, (2, 2), (3, 2)).shape
        torch.Size([6, 4])
    """
    outs, ins = _check_weight_shapes(weight, out_shape, in_shape)
    d = len(outs)
    order = [p for k in range(d) for p in (k, d + k)]
    return weight.reshape(outs + ins).permute(order).reshape([o * i for o, i in zip(outs, ins)])


def _setup(weight, out_shape, in_shape, compute_dtype) -> Tuple[Shape, Shape, torch.dtype]:
    _check_matrix(weight)
    outs, ins = _check_weight_shapes(weight, out_shape, in_shape)
    return outs, ins, _compute_dtype(weight, compute_dtype)


def _svdvals(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values (descending); a very wide or tall matrix goes through its float64 Gram."""
    rows, cols = matrix.shape
    if max(rows, cols) >= 8 * min(rows, cols):
        wide = matrix.double()
        gram = wide @ wide.mT if rows <= cols else wide.mT @ wide
        values = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)
        return values.to(matrix.dtype)
    return torch.linalg.svdvals(matrix)


def tt_spectra(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    *,
    compute_dtype: torch.dtype | None = None,
) -> List[torch.Tensor]:
    """Singular values of every bond unfolding of :func:`tt_tensor` ``(weight)``.

    Bond ``k`` (``1 <= k < d``) unfolds the tensor into a ``prod(s[:k]) x prod(s[k:])``
    matrix, ``s_j = out_shape[j] * in_shape[j]``. Their tails bound the TT-SVD error
    (:func:`factorized_layers.ranks.allocate_tt_ranks` splits budgets on them).

    Returns:
        ``d - 1`` descending float tensors (compute dtype, on ``weight``'s device).

    Examples:
        >>> s = tt_spectra(torch.randn(12, 10), (4, 3), (2, 5))
        >>> [v.shape[0] for v in s]
        [8]
    """
    outs, ins, dtype = _setup(weight, out_shape, in_shape, compute_dtype)
    tensor = tt_tensor(weight.detach().to(dtype), outs, ins)
    sizes = tensor.shape
    return [
        _svdvals(tensor.reshape(math.prod(sizes[:k]), math.prod(sizes[k:])))
        for k in range(1, len(sizes))
    ]


def _three_core_ranks(tensor: torch.Tensor, outs: Shape, ins: Shape, budget: int) -> Shape:
    """The bond ranks of three cores with the lowest exact TT-SVD error within ``budget``.

    TT-SVD's second SVD acts on the rows ``a < r_1`` of ``diag(S) V^T`` (first
    unfolding ``U S V^T``), each reshaped to ``(s_2, s_3)``; its squared singular values
    are the eigenvalues of ``sum_{a < r_1} S_a^2 V_a^T V_a`` (``s_3 x s_3``). A cumulative
    sum over ``a`` gives them for every ``r_1`` at once, so the exact error
    ``sum_{j >= r_1} S_j^2 + sum_{j >= r_2} lambda_j(r_1)`` is minimised by scanning
    ``r_1`` with the largest ``r_2`` that fits.
    """
    s1, s2, s3 = tensor.shape
    wide = tensor.reshape(s1, s2 * s3).double()
    U, S, Vh = torch.linalg.svd(wide, full_matrices=False)
    blocks = (S[:, None] * Vh).reshape(-1, s2, s3)
    grams = torch.cumsum(blocks.mT @ blocks, dim=0)
    conditional = torch.linalg.eigvalsh((grams + grams.mT) / 2).clamp_min(0).flip(-1)
    squares = S.square()
    tails = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)]).tolist()
    cond_tails = torch.cat(
        [conditional.flip(-1).cumsum(-1).flip(-1), conditional.new_zeros(len(S), 1)], dim=-1
    ).tolist()
    best = None
    for r1 in range(1, len(S) + 1):
        room = budget - outs[0] * ins[0] * r1
        if room <= 0:
            break
        r2 = min(room // (r1 * s2 + s3), r1 * s2, s3)
        if r2 < 1 or r1 > r2 * s2:  # r_1 > r_2 s_2 is dead weight
            continue
        error = tails[r1] + cond_tails[r1 - 1][r2]
        if best is None or error < best[0] * (1 - 1e-12):
            best = (error, (r1, int(r2)))
    if best is None:
        raise ValueError(
            f"a budget of {budget} parameters is below the smallest TT-matrix with "
            f"out_shape={outs}, in_shape={ins} (all ranks 1: {tt_params(outs, ins, (1, 1))})"
        )
    return feasible_tt_ranks(outs, ins, best[1])


def allocate_tt_svd_ranks(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    budget: int,
    *,
    compute_dtype: torch.dtype | None = None,
) -> Shape:
    """Bond ranks within ``budget`` core parameters for TT-SVD of ``weight``.

    Two cores: the bound of :func:`~factorized_layers.ranks.allocate_tt_ranks` is the
    exact error (Eckart--Young on the one unfolding). Three cores: the exact TT-SVD
    error of every ``r_1`` with its largest fitting ``r_2`` (conditional spectra of the
    second SVD from a cumulative Gram), so the result is the error-minimising split
    for TT-SVD. More cores: the greedy split of
    :func:`~factorized_layers.ranks.allocate_tt_ranks` on the unfolding bound.

    Examples:
        >>> w = torch.randn(24, 24, dtype=torch.float64)
        >>> ranks = allocate_tt_svd_ranks(w, (4, 3, 2), (2, 3, 4), 200)
        >>> tt_params((4, 3, 2), (2, 3, 4), ranks) <= 200
        True
    """
    outs, ins, dtype = _setup(weight, out_shape, in_shape, compute_dtype)
    if weight.device.type == "meta":
        raise ValueError("allocate_tt_svd_ranks needs the weight's values, got a meta tensor")
    budget = int(budget)
    if len(outs) == 3:
        tensor = tt_tensor(weight.detach().to(dtype), outs, ins)
        ranks = _three_core_ranks(tensor, outs, ins, budget)
        return ranks
    spectra = [v.tolist() for v in tt_spectra(weight, outs, ins, compute_dtype=compute_dtype)]
    return allocate_tt_ranks(spectra, outs, ins, budget)


def _sweep(
    matrix: torch.Tensor, outs: Shape, ins: Shape, ranks: Sequence[int], first: int
) -> Tuple[List[torch.Tensor], float]:
    """Truncated SVDs left to right from core ``first`` on.

    ``matrix`` is the ``(r_{first-1} s_first, rest)`` remainder; returns the cores
    ``first .. d-1`` and the sum of the squared discarded singular values.
    """
    d = len(outs)
    cores: List[torch.Tensor] = []
    discarded = 0.0
    r_prev = matrix.shape[0] // (outs[first] * ins[first])
    for k in range(first, d - 1):
        matrix = matrix.reshape(r_prev * outs[k] * ins[k], -1)
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(ranks[k], S.shape[0])
        discarded += float(S[r:].double().square().sum())
        cores.append(U[:, :r].reshape(r_prev, outs[k], ins[k], r))
        matrix = S[:r, None] * Vh[:r]
        r_prev = r
    cores.append(matrix.reshape(r_prev, outs[-1], ins[-1], 1))
    return cores, discarded


def _meta_cores(outs: Shape, ins: Shape, ranks: Shape, device, dtype) -> Tuple[torch.Tensor, ...]:
    full = (1, *ranks, 1)
    return tuple(
        torch.empty(full[k], o, i, full[k + 1], device=device, dtype=dtype)
        for k, (o, i) in enumerate(zip(outs, ins))
    )


def _padded(cores: List[torch.Tensor], ranks: Shape) -> Tuple[torch.Tensor, ...]:
    """Cores zero-padded to ``ranks`` where the SVD returned fewer vectors (rank-deficient)."""
    full = (1, *ranks, 1)
    out = []
    for k, core in enumerate(cores):
        a, o, i, b = core.shape
        if (a, b) != (full[k], full[k + 1]):
            padded = core.new_zeros(full[k], o, i, full[k + 1])
            padded[:a, :, :, :b] = core
            core = padded
        out.append(core)
    return tuple(out)


def tt_svd(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    ranks: object,
    *,
    compute_dtype: torch.dtype | None = None,
) -> TTDecomposition:
    """TT-SVD of a weight matrix: sequential truncated SVDs, left to right.

    The tensor :func:`tt_tensor` ``(weight)`` is unfolded as ``(s_1, rest)``, its
    truncated SVD ``U S V^T`` gives core 1 ``= U``, and ``S V^T`` (reshaped to
    ``(r_1 s_2, rest)``) is decomposed next, up to core ``d``. The relative error is
    exactly ``sqrt(sum of the squared discarded singular values) / ||W||`` and at
    most ``sqrt(sum_k sum_{j > r_k} s_{k,j}^2) / ||W||`` (Oseledets 2011, Thm 2.2),
    ``s_{k,j}`` the singular values of the bond unfoldings (:func:`tt_spectra`). At
    :func:`~factorized_layers.ranks.max_tt_ranks` it is exact.

    Args:
        weight: ``(prod(out_shape), prod(in_shape))`` floating matrix (any device,
            meta included).
        out_shape: Output modes, one per core (``d >= 2``).
        in_shape: Input modes, one per core.
        ranks: Bond ranks: ``int`` (largest), tuple of ``d - 1`` or ``float`` fraction,
            see :func:`~factorized_layers.ranks.resolve_tt_ranks`.
        compute_dtype: ``torch.float32`` or ``torch.float64``; default float64 for
            float64 weights, float32 otherwise.

    Returns:
        :class:`TTDecomposition` in ``weight``'s dtype (cores in the resolved ranks;
        a rank-deficient weight gets zero-padded cores).

    Raises:
        ValueError: Bad shapes or ranks (naming the values), NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> w = torch.randn(12, 10, dtype=torch.float64)
        >>> exact = tt_svd(w, (4, 3), (2, 5), 8)
        >>> exact.ranks, exact.error < 1e-12
        ((8,), True)
        >>> tt_svd(w, (4, 3), (2, 5), 2).error <= 1
        True
    """
    outs, ins, dtype = _setup(weight, out_shape, in_shape, compute_dtype)
    ranks = resolve_tt_ranks(ranks, outs, ins)
    if weight.device.type == "meta":
        return TTDecomposition(_meta_cores(outs, ins, ranks, "meta", weight.dtype), math.nan)
    tensor = tt_tensor(weight.detach().to(dtype), outs, ins)
    norm = float(tensor.double().norm())
    cores, discarded = _sweep(tensor.reshape(outs[0] * ins[0], -1), outs, ins, ranks, 0)
    error = math.sqrt(discarded) / norm if norm > 0 else 0.0
    return TTDecomposition(tuple(c.to(weight.dtype) for c in _padded(cores, ranks)), error)


def _check_cores(cores: Sequence[torch.Tensor]) -> Tuple[Shape, Shape, Shape]:
    """``(out_shape, in_shape, ranks)`` of a valid list of TT cores; ``ValueError`` otherwise."""
    cores = list(cores)
    if len(cores) < 2:
        raise ValueError(f"a TT-matrix needs at least 2 cores, got {len(cores)}")
    for k, core in enumerate(cores):
        if not isinstance(core, torch.Tensor) or core.dim() != 4:
            shape = tuple(core.shape) if isinstance(core, torch.Tensor) else type(core).__name__
            raise ValueError(f"core {k} must be a 4-D tensor (r_prev, out, in, r), got {shape}")
        _check_finite(core, f"core {k}")
    full = [1] + [int(c.shape[3]) for c in cores]
    for k, core in enumerate(cores):
        if core.shape[0] != full[k]:
            raise ValueError(
                f"core {k} has shape {tuple(core.shape)}: its first rank must be {full[k]} "
                f"(the previous core's last rank, 1 for the first core)"
            )
    if full[-1] != 1:
        raise ValueError(f"the last core's last rank must be 1, got {full[-1]}")
    outs = tuple(int(c.shape[1]) for c in cores)
    ins = tuple(int(c.shape[2]) for c in cores)
    return outs, ins, tuple(full[1:-1])


def _right_orthogonal(cores: Sequence[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """Cores ``2..d`` made right-orthonormal by QR (right to left); the weight is unchanged."""
    work = [c.detach().to(dtype) for c in cores]
    for k in range(len(work) - 1, 0, -1):
        r_prev, o, i, r = work[k].shape
        # G_k = R^T Q^T with Q^T's rows orthonormal; R^T moves into core k-1.
        Q, R = torch.linalg.qr(work[k].reshape(r_prev, o * i * r).mT, mode="reduced")
        work[k] = Q.mT.reshape(Q.shape[1], o, i, r)
        previous = work[k - 1]
        a, po, pi, _ = previous.shape
        work[k - 1] = (previous.reshape(a * po * pi, r_prev) @ R.mT).reshape(a, po, pi, Q.shape[1])
    return work


def tt_core_spectra(
    cores: Sequence[torch.Tensor], *, compute_dtype: torch.dtype | None = None
) -> List[torch.Tensor]:
    """Singular values of every bond unfolding of the TT the cores represent.

    The cores are brought to the right-orthonormal form (QR, right to left), then a
    left-to-right sweep of untruncated SVDs leaves, at bond ``k``, a left-orthonormal
    prefix, a right-orthonormal suffix and a ``(r_k x r_k)`` diagonal: its entries are
    the singular values of the bond-``k`` unfolding (zero-padded to ``r_k``). Costs
    ``O(d r^3 max(s))``; the weight is never formed.

    Examples:
        >>> cores = [torch.randn(1, 3, 2, 4, dtype=torch.float64),
        ...          torch.randn(4, 2, 5, 1, dtype=torch.float64)]
        >>> values = tt_core_spectra(cores)[0]
        >>> reference = torch.linalg.svdvals(tt_tensor(tt_to_matrix(cores), (3, 2), (2, 5)))
        >>> torch.allclose(values, reference[:4], atol=1e-10)
        True
    """
    outs, ins, ranks = _check_cores(cores)
    dtype = _compute_dtype(cores[0], compute_dtype)
    work = _right_orthogonal(cores, dtype)
    spectra = []
    matrix = work[0].reshape(outs[0] * ins[0], -1)
    for k in range(len(work) - 1):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        padded = S.new_zeros(ranks[k])
        padded[: S.shape[0]] = S
        spectra.append(padded)
        nxt = work[k + 1]
        carried = (S[:, None] * Vh) @ nxt.reshape(nxt.shape[0], -1)
        matrix = carried.reshape(carried.shape[0] * outs[k + 1] * ins[k + 1], -1)
    return spectra


def tt_round(
    cores: Sequence[torch.Tensor],
    ranks: object,
    *,
    compute_dtype: torch.dtype | None = None,
) -> TTDecomposition:
    """TT-rounding: the cores re-truncated to lower bond ranks, from the cores alone.

    Right-to-left QR makes cores ``2..d`` right-orthonormal (the weight unchanged),
    then truncated SVDs run left to right as in :func:`tt_svd`; because the suffix
    is orthonormal each truncation is that of the current unfolding of the weight
    itself, so the result equals TT-SVD of the represented matrix at these ranks
    (Oseledets 2011, Alg. 2) and its relative error is exactly the root of the
    discarded squared singular values over the TT's norm. The dense weight is
    never formed.

    Args:
        cores: TT cores (``(r_{k-1}, o_k, i_k, r_k)``, ``r_0 = r_d = 1``).
        ranks: Target bond ranks (``int``, tuple or ``float``, as in :func:`tt_svd`);
            each bond keeps at most its current rank.
        compute_dtype: As in :func:`tt_svd`.

    Returns:
        :class:`TTDecomposition` in the cores' dtype and device; ``error`` relative to
        the input TT.

    Examples:
        >>> w = torch.randn(12, 10, dtype=torch.float64)
        >>> rounded = tt_round(tt_svd(w, (4, 3), (2, 5), 8).cores, 3)
        >>> abs(rounded.error - tt_svd(w, (4, 3), (2, 5), 3).error) < 1e-10
        True
    """
    outs, ins, current = _check_cores(cores)
    requested = resolve_tt_ranks(ranks, outs, ins)
    target = feasible_tt_ranks(outs, ins, [min(a, b) for a, b in zip(requested, current)])
    dtype = _compute_dtype(cores[0], compute_dtype)
    out_dtype = cores[0].dtype
    if cores[0].device.type == "meta":
        return TTDecomposition(_meta_cores(outs, ins, target, "meta", out_dtype), math.nan)
    work = _right_orthogonal(cores, dtype)
    norm = float(work[0].double().norm())
    first = work[0].reshape(outs[0] * ins[0], -1)
    # The sweep carries S V^T into the (right-orthonormal) next core before its SVD.
    cores_out: List[torch.Tensor] = []
    discarded = 0.0
    matrix, r_prev = first, 1
    for k in range(len(work) - 1):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(target[k], S.shape[0])
        discarded += float(S[r:].double().square().sum())
        cores_out.append(U[:, :r].reshape(r_prev, outs[k], ins[k], r))
        nxt = work[k + 1]
        carried = (S[:r, None] * Vh[:r]) @ nxt.reshape(nxt.shape[0], -1)
        matrix = carried.reshape(r * outs[k + 1] * ins[k + 1], -1)
        r_prev = r
    cores_out.append(matrix.reshape(r_prev, outs[-1], ins[-1], 1))
    error = math.sqrt(discarded) / norm if norm > 0 else 0.0
    return TTDecomposition(tuple(c.to(out_dtype) for c in _padded(cores_out, target)), error)


def _input_roots(
    gram: torch.Tensor, in_shape: Shape, ridge: float, dtype: torch.dtype
) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """Per input mode ``k``: ``(S_k, S_k^{-1})`` with ``S_k S_k^T`` the mode-``k`` Gram.

    The mode Gram is the partial trace of the (unit-mean-diagonal) input Gram over the
    other input modes; ``S_k = E diag(sqrt(lambda + ridge * mean(lambda)))``, so its
    inverse ``diag(1 / ...) E^T`` exists for any ``ridge > 0``.
    """
    features = math.prod(in_shape)
    wide = _normalized_gram(gram, gram.device, torch.float64).reshape(in_shape + in_shape)
    d = len(in_shape)
    roots, inverses = [], []
    for k in range(d):
        others = [j for j in range(d) if j != k]
        mode = wide.permute([k, *others, d + k, *[d + j for j in others]])
        rest = features // in_shape[k]
        mode = mode.reshape(in_shape[k], rest, in_shape[k], rest)
        if rest == 1:  # the whole input: the (cached, under whitening_cache) full root
            vectors, values = normalized_whitening_eig(gram, gram.device, torch.float64, ridge)
        else:
            mode_gram = mode.diagonal(dim1=1, dim2=3).sum(-1) / rest
            vectors, values = _whitening_eig(mode_gram, ridge)
        roots.append((vectors * values).to(dtype))
        inverses.append((vectors / values).mT.to(dtype))
    return tuple(roots), tuple(inverses)


def _times_input_modes(
    weight: torch.Tensor, outs: Shape, ins: Shape, matrices: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """``W`` with input mode ``k`` multiplied from the right by ``matrices[k]`` (``None``: skip)."""
    tensor = weight.reshape(outs + ins)
    for k, matrix in enumerate(matrices):
        if matrix is not None:
            axis = len(outs) + k
            tensor = torch.movedim(torch.movedim(tensor, axis, -1) @ matrix, -1, axis)
    return tensor.reshape(weight.shape)


def _check_positive_ridge(ridge: float) -> None:
    if (
        isinstance(ridge, bool)
        or not isinstance(ridge, (int, float))
        or not (math.isfinite(ridge) and ridge > 0)
    ):
        raise ValueError(f"ridge must be a finite positive float, got {ridge!r}")


def whiten_tt_inputs(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    gram: torch.Tensor,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W (S_1 (x) ... (x) S_d)``: every input mode times the root of its mode Gram.

    ``S_k S_k^T`` is the partial trace of the (normalised) input Gram over the other
    input modes, plus a relative ``ridge``. For a Kronecker-structured Gram the
    Frobenius error of a TT of the result is exactly the output error on the data
    (up to scale); otherwise its Kronecker approximation. Its :func:`tt_spectra` rank
    calibrated TT budgets.

    Returns:
        The whitened ``(out, in)`` matrix in the compute dtype.

    Examples:
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> eye = torch.eye(4, dtype=torch.float64)
        >>> torch.allclose(whiten_tt_inputs(w, (3, 2), (2, 2), eye, ridge=1e-12), w, atol=1e-6)
        True
    """
    outs, ins, dtype = _setup(weight, out_shape, in_shape, compute_dtype)
    _check_gram(gram, math.prod(ins))
    _check_positive_ridge(ridge)
    if weight.device.type == "meta":
        return torch.empty(weight.shape, device="meta", dtype=dtype)
    roots, _ = _input_roots(gram.detach().to(weight.device), ins, ridge, dtype)
    return _times_input_modes(weight.detach().to(dtype), outs, ins, roots)


def _project_onto_left(left: Sequence[torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """``L^T T``: the last core of ``tensor`` given left-orthonormal cores ``1..d-1``."""
    matrix = tensor
    r_prev = 1
    for core in left:
        a, o, i, r = core.shape
        matrix = core.reshape(a * o * i, r).mT @ matrix.reshape(a * o * i, -1)
        r_prev = r
    return matrix.reshape(r_prev, -1)


def _output_errors(
    work: torch.Tensor, gram: torch.Tensor, candidates: Sequence[Sequence[torch.Tensor]]
) -> List[Tuple[float, float]]:
    """Per candidate ``(relative output error on the full Gram, relative weight error)``."""
    wide = work.double()
    full_gram = _normalized_gram(gram, work.device, torch.float64)
    total = float(torch.einsum("oi,ij,oj->", wide, full_gram, wide))
    norm = float(wide.norm())
    results = []
    for cores in candidates:
        diff = wide - tt_dense_weight([c.to(work.dtype) for c in cores]).double()
        lost = float(torch.einsum("oi,ij,oj->", diff, full_gram, diff))
        output = math.sqrt(max(lost, 0.0) / total) if total > 0 else 0.0
        results.append((output, float(diff.norm()) / norm if norm > 0 else 0.0))
    return results


def whitened_tt_svd(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    ranks: object,
    gram: torch.Tensor,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> Tuple[TTDecomposition, float, float]:
    """TT-SVD for the output error on calibration data, by per-input-mode whitening.

    With ``X`` the inputs and ``G = X^T X``, the output error of an approximation
    ``W~`` is ``||(W - W~) S||_F`` for any ``S S^T = G``. For a Kronecker-structured
    ``S = S_1 (x) ... (x) S_d`` (one factor per input mode) it is the Frobenius error
    of a TT of ``W S``, whose cores map back exactly. Here ``S_k`` is the root of the
    mode-``k`` Gram (:func:`whiten_tt_inputs`: the Kronecker approximation of the
    data's Gram). TT-SVD of ``W S`` gives left-orthonormal cores ``1..d-1``, which are
    mapped back by ``S_k^{-1}`` (small mode matrices); the last core is the projection
    of ``W (S_1 (x) ... (x) S_{d-1} (x) I)`` onto them, so the last input mode needs no
    inverse. For the low-rank form (``in_shape = (1, in)``) this is the exact
    activation-whitened SVD optimum (SVD-LLM). The plain :func:`tt_svd` is evaluated
    on the *full* Gram too and the fit with the lower output error is returned, so
    calibration never does worse than the plain fit on the calibration data.

    Args:
        weight: ``(prod(out_shape), prod(in_shape))`` weight.
        out_shape: Output modes.
        in_shape: Input modes.
        ranks: Bond ranks, as in :func:`tt_svd`.
        gram: ``(in, in)`` input Gram matrix ``X^T X``.
        ridge: Relative ridge of the mode whitening (``> 0`` keeps ``S_k`` invertible).
        compute_dtype: As in :func:`tt_svd`.

    Returns:
        ``(decomposition, output_error, plain_output_error)``: the chosen
        decomposition (its ``error`` the relative *weight* error), its relative
        output error ``||(W - W~) S|| / ||W S||`` and the plain TT-SVD's.

    Examples:
        >>> w = torch.randn(12, 10, dtype=torch.float64)
        >>> x = torch.randn(200, 10, dtype=torch.float64) * torch.linspace(0.1, 3, 10)
        >>> fit, calibrated, plain = whitened_tt_svd(w, (4, 3), (2, 5), 3, x.T @ x)
        >>> calibrated <= plain
        True
    """
    outs, ins, dtype = _setup(weight, out_shape, in_shape, compute_dtype)
    _check_gram(gram, math.prod(ins))
    _check_positive_ridge(ridge)
    plain = tt_svd(weight, outs, ins, ranks, compute_dtype=compute_dtype)
    if weight.device.type == "meta":
        return plain, math.nan, math.nan
    ranks = plain.ranks
    work = weight.detach().to(dtype)
    roots, inverses = _input_roots(gram.detach().to(work.device), ins, ridge, dtype)
    whitened = tt_tensor(_times_input_modes(work, outs, ins, roots), outs, ins)
    left, _ = _sweep(whitened.reshape(outs[0] * ins[0], -1), outs, ins, ranks, 0)
    left = left[:-1]
    partial = _times_input_modes(work, outs, ins, list(roots[:-1]) + [None])
    last = _project_onto_left(left, tt_tensor(partial, outs, ins))
    cores = [torch.einsum("aojb,ji->aoib", core, inverse) for core, inverse in zip(left, inverses)]
    cores.append(last.reshape(left[-1].shape[3], outs[-1], ins[-1], 1))
    cores = list(_padded(cores, ranks))
    (calibrated, weight_error), (plain_output, _) = _output_errors(
        work, gram, [cores, [c.to(dtype) for c in plain.cores]]
    )
    if calibrated <= plain_output:
        chosen = TTDecomposition(tuple(c.to(weight.dtype) for c in cores), weight_error)
        return chosen, calibrated, plain_output
    return plain, plain_output, plain_output
