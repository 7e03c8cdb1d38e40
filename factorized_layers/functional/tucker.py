"""Tucker linear kernel: the input viewed as ``(*, *in_shape)``, one planned contraction.

:func:`tucker_plan` fixes what depends on shapes and ranks only (merged folded
modes, the batch-independent schedule choice); :func:`tucker_linear_input_first`
picks, per batch size, between the factor chain (input first) and building the
dense weight (:func:`tucker_dense_weight`) first; :func:`tucker_linear` runs the
chosen schedule.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Tuple

import opt_einsum
import torch
import torch.nn.functional as F

from ..contract import contraction_path, shape_free_schedule
from ..schedule import choose_schedule, measuring
from ._blocks import block_rows, in_row_blocks

__all__ = [
    "TuckerPlan",
    "tucker_plan",
    "tucker_schedule_costs",
    "tucker_linear",
    "tucker_dense_weight",
    "tucker_linear_equation",
    "tucker_linear_input_first",
    "tucker_linear_schedule",
    "tucker_linear_scheduled",
    "TUCKER_SCHEDULES",
]


def _tucker_structure(core: torch.Tensor, out_factors, in_factors):
    """Mode sizes and ranks implied by the core and the (possibly folded) factors."""
    n_out = len(out_factors)
    out_ranks = tuple(core.shape[:n_out])
    in_ranks = tuple(core.shape[n_out:])
    out_shape = tuple(r if f is None else f.shape[0] for f, r in zip(out_factors, out_ranks))
    in_shape = tuple(r if f is None else f.shape[0] for f, r in zip(in_factors, in_ranks))
    return out_shape, in_shape, out_ranks, in_ranks


@functools.lru_cache(maxsize=256)
def tucker_linear_equation(out_folded: Tuple[bool, ...], in_folded: Tuple[bool, ...]) -> str:
    """The einsum equation of a Tucker linear forward, operands in kernel order.

    Operands: the input ``(b, *in_shape)``, the in-factors that are not folded,
    the core ``(*out_ranks, *in_ranks)``, the out-factors that are not folded.
    A folded (full-rank) mode has no factor: the core carries the mode's own index.

    Examples:
        >>> tucker_linear_equation((False,), (False,))
        'ac,cd,bd,eb->ae'
        >>> tucker_linear_equation((False, True), (True,))
        'ad,bcd,eb->aec'
    """
    symbols = iter(
        opt_einsum.get_symbol(i) for i in range(4 * (len(out_folded) + len(in_folded)) + 1)
    )
    batch = next(symbols)
    out_rank = [next(symbols) for _ in out_folded]
    in_mode = [next(symbols) for _ in in_folded]
    in_rank = [m if folded else next(symbols) for m, folded in zip(in_mode, in_folded)]
    out_mode = [r if folded else next(symbols) for r, folded in zip(out_rank, out_folded)]
    terms = [batch + "".join(in_mode)]
    terms += [m + r for m, r, folded in zip(in_mode, in_rank, in_folded) if not folded]
    terms.append("".join(out_rank) + "".join(in_rank))
    terms += [m + r for m, r, folded in zip(out_mode, out_rank, out_folded) if not folded]
    return ",".join(terms) + "->" + batch + "".join(out_mode)


_ELEMENT_COST = 28
"""Multiply-accumulate equivalents charged per activation element that a *thin*
GEMM (inner or outer size below :data:`_THIN`), a rotation (see :func:`_rotated`)
or an unfused bias add reads or writes. FLOP counts alone (opt_einsum's model)
mispredict the Tucker chain on CPU: its per-mode GEMMs have sizes of 3--16 and are
memory-bound, while large GEMMs run at full speed. Fitted on 2-core CPU runs of the
MiniLM layers (``benchmarks/bench_tucker_linear.py``) at batch 4096: the four 3+3-mode
layers (1536x384 and 384x384 at two budgets; chain measured at 1.13--1.54x dense)
imply 24--31 since rotations are GEMMs (it was 37--47 when they were copies)."""

_THIN = 32


def tucker_schedule_costs(plan: TuckerPlan, batch: int) -> Tuple[int, int]:
    """Modelled cost ``(input_first, weight_first)`` of the two schedules of ``plan``.

    Cost = multiply-accumulates + :data:`_ELEMENT_COST` x elements read and written
    by the memory-bound steps, as :func:`tucker_linear`'s rotation chain executes
    them (folded modes merged; a folded mode costs a rotation; a whole folded input
    side is read without a copy), and of building the weight mode by mode. Pure
    integer arithmetic, so ``torch.compile`` can trace it.

    Examples:
        >>> plan = tucker_plan((1536,), (384,), (1536,), (153,))
        >>> first, weight = tucker_schedule_costs(plan, 4096)
        >>> first < weight
        True
    """
    g = _ELEMENT_COST
    two_mode = len(plan.out_modes) == 1 and len(plan.in_modes) == 1

    def chain(size: int, steps, rotate: bool) -> Tuple[int, int]:
        macs = moved = 0
        for a, b, factored in steps:
            new = size // a * b
            if factored:
                macs += size * b
                if min(a, b) < _THIN:
                    moved += size + new
            elif rotate:
                moved += 2 * size
            size = new
        return macs, moved

    in_steps = [(n, r, i >= 0) for n, r, i in reversed(plan.in_modes)]
    out_steps = [(r, n, i >= 0) for n, r, i in plan.out_modes]
    in_folded = len(plan.in_modes) == 1 and plan.in_modes[0][2] < 0
    in_macs, in_moved = (0, 0) if in_folded else chain(plan.in_features, in_steps, True)
    out_macs, out_moved = chain(plan.rows, out_steps, not two_mode)
    core_moved = plan.rows + plan.columns if min(plan.rows, plan.columns) < _THIN else 0
    bias_moved = 0 if two_mode else 2 * plan.out_features
    per_row = in_macs + out_macs + plan.rows * plan.columns
    per_row += g * (in_moved + out_moved + core_moved + bias_moved)
    # The weight is built without rotations: input modes on the core, then output modes.
    build_in = chain(plan.rows * plan.columns, [(r, n, i >= 0) for n, r, i in plan.in_modes], False)
    build_out = chain(plan.rows * plan.in_features, out_steps, False)
    build = build_out[0] + build_in[0] + g * (build_out[1] + build_in[1])
    return batch * per_row, build + batch * plan.in_features * plan.out_features


def tucker_linear_input_first(plan: TuckerPlan, batch: int) -> bool:
    """Whether to contract the input first (factor chain) or build the dense weight first.

    opt_einsum plans the contraction (:func:`tucker_linear_equation` on these shapes,
    batch size included, through :mod:`factorized_layers.contract`'s cache); if its
    FLOP-optimal path builds the whole weight before touching the input, so do we.
    Otherwise the memory-aware :func:`tucker_schedule_costs` decides, because the
    chain's thin GEMMs can lose to one dense GEMM at large batches although they need
    fewer FLOPs. The eager decision is cached per (plan, batch size). Under
    ``torch.compile`` (symbolic batch, untraceable cache lock) only the cost model is
    used, which dynamo turns into a shape guard rather than a graph break.

    Examples:
        >>> tucker_linear_input_first(tucker_plan((16, 12, 8), (8, 8, 6), (8, 6, 4), (4, 4, 3)), 1)
        True
        >>> tucker_linear_input_first(tucker_plan((24,), (24,), (24,), (23,)), 4096)
        False
    """
    if shape_free_schedule():
        per_row_first, weight_first = tucker_schedule_costs(plan, 1)
        return per_row_first <= weight_first - tucker_schedule_costs(plan, 0)[1]
    if batch == 0:
        return True
    if torch.compiler.is_compiling():
        input_first, weight_first = tucker_schedule_costs(plan, batch)
        return input_first <= weight_first
    return _eager_input_first(plan, batch)


@functools.lru_cache(maxsize=4096)
def _eager_input_first(plan: TuckerPlan, batch: int) -> bool:
    """:func:`tucker_linear_input_first` outside ``torch.compile``: cost model, then opt_einsum."""
    input_first, weight_first = tucker_schedule_costs(plan, batch)
    if input_first > weight_first:
        return False
    out_folded = tuple(r == n for r, n in zip(plan.out_ranks, plan.out_shape))
    in_folded = tuple(r == n for r, n in zip(plan.in_ranks, plan.in_shape))
    shapes = [(batch, *plan.in_shape)]
    shapes += [(n, r) for n, r, f in zip(plan.in_shape, plan.in_ranks, in_folded) if not f]
    shapes.append((*plan.out_ranks, *plan.in_ranks))
    shapes += [(n, r) for n, r, f in zip(plan.out_shape, plan.out_ranks, out_folded) if not f]
    path = contraction_path(tucker_linear_equation(out_folded, in_folded), *shapes)
    # Follow operand positions: each step removes its operands and appends the result.
    alive = list(range(len(shapes)))
    for step in path[:-1]:
        if 0 in [alive[i] for i in step]:
            return True
        alive = [a for i, a in enumerate(alive) if i not in step] + [-1]
    return False


_GEMM_ROTATION_MAX_MODE = 128
"""Largest mode a CPU rotation moves by a GEMM with the identity rather than a copy.

Rotating ``(n, rest)`` to ``(rest, n)`` (a transposing copy) read 1.7 ns per element
for n = 6 and 0.9 for n = 48 on 2 CPU threads, where ``mm(view.mT, eye(n))`` --
whose packing is cache-blocked -- took 0.4 and 0.55 ns; at n = 384 the GEMM's
``n`` multiply-adds per element made it 3x slower than the copy."""

_GEMM_ROTATION_MIN_SIZE = 1 << 12
"""Below this many elements a rotation is a plain copy (the identity costs an op)."""


def _rotated(t: torch.Tensor, mode_first: bool) -> torch.Tensor:
    """``t.mT.contiguous()`` for a 2-D ``t``, by a GEMM with the identity where faster.

    ``mode_first`` says which side of ``t`` is the mode being moved (the other
    side holds the batch). The identity only ever spans the mode: a GEMM adds
    ``0 * x`` terms, so an inf or NaN in one row would otherwise spread to every
    other row of the batch.
    """
    n = t.shape[0] if mode_first else t.shape[1]
    if (
        shape_free_schedule()
        or t.device.type != "cpu"
        or n > _GEMM_ROTATION_MAX_MODE
        or t.numel() < _GEMM_ROTATION_MIN_SIZE
    ):
        return t.mT.contiguous()
    eye = torch.eye(n, dtype=t.dtype, device=t.device)
    return torch.mm(t.mT, eye) if mode_first else torch.mm(eye, t.mT)


def _end_to_front(t: torch.Tensor, factors, sizes, targets, rows: int) -> torch.Tensor:
    """Multiply the trailing modes of ``t`` (``rows`` x modes) by ``factors``, last first.

    Each step views the tensor as ``(rest, n)`` with the mode last and writes
    ``factor^T @ view^T`` as ``(r, rest)``: the mode moves to the front, the next
    one becomes last, and no activation is ever permuted.
    """
    size = rows * math.prod(sizes)
    for k in reversed(range(len(sizes))):
        t = t.reshape(size // sizes[k], sizes[k])
        factor = factors[k]
        t = _rotated(t, False) if factor is None else torch.mm(factor.mT, t.mT)
        size = size // sizes[k] * targets[k]
    return t


def _front_to_end(t: torch.Tensor, factors, sizes, targets, cols: int) -> torch.Tensor:
    """Multiply the leading modes of ``t`` (modes x ``cols``) by ``factors``, first first.

    Each step views the tensor as ``(n, rest)`` and writes ``view^T @ factor^T`` as
    ``(rest, m)``: the mode moves to the end. ``factors[k]`` maps ``sizes[k]`` to
    ``targets[k]`` and has shape ``(targets[k], sizes[k])`` (``None``: identity).
    """
    size = cols * math.prod(sizes)
    for k in range(len(sizes)):
        t = t.reshape(sizes[k], size // sizes[k])
        factor = factors[k]
        t = _rotated(t, True) if factor is None else torch.mm(t.mT, factor.mT)
        size = size // sizes[k] * targets[k]
    return t


def tucker_dense_weight(
    core: torch.Tensor, out_factors, in_factors, *, plan: TuckerPlan | None = None
) -> torch.Tensor:
    """The ``(out_features, in_features)`` matrix of a Tucker linear weight (differentiable).

    Args:
        core: ``(*out_ranks, *in_ranks)``.
        out_factors: One ``(out_shape[k], out_ranks[k])`` matrix per output mode, or
            ``None`` for a folded full-rank mode.
        in_factors: One ``(in_shape[k], in_ranks[k])`` matrix (or ``None``) per input mode.
        plan: The :func:`tucker_plan` of these shapes, if the caller keeps one.

    Examples:
        >>> core, u, v = torch.randn(2, 3), torch.randn(5, 2), torch.randn(4, 3)
        >>> torch.allclose(tucker_dense_weight(core, [u], [v]), u @ core @ v.T, atol=1e-6)
        True
    """
    if plan is None:
        plan = tucker_plan(*_tucker_structure(core, out_factors, in_factors))
    return _planned_dense_weight(plan, core, out_factors, in_factors)


class TuckerPlan(NamedTuple):
    """Static execution plan of a Tucker linear layer (depends on shapes and ranks only).

    Runs of neighbouring folded (full-rank, factor-less) modes are merged into one
    mode: a free reshape of the core that saves one rotation per merged mode.
    """

    out_shape: Tuple[int, ...]
    in_shape: Tuple[int, ...]
    out_ranks: Tuple[int, ...]
    in_ranks: Tuple[int, ...]
    out_modes: Tuple[Tuple[int, int, int], ...]
    """Merged output modes as ``(size, rank, factor index or -1 when folded)``."""
    in_modes: Tuple[Tuple[int, int, int], ...]
    """Merged input modes as ``(size, rank, factor index or -1 when folded)``."""
    in_features: int
    out_features: int
    rows: int
    """``prod(out_ranks)``: rows of the core matrix."""
    columns: int
    """``prod(in_ranks)``: columns of the core matrix."""
    always_input_first: bool = False
    """The modelled input-first cost per row is at most the dense one, so the chain
    wins at every batch size and no per-batch decision is needed."""
    small_products_per_row: int = 0
    """Small matrix products per input row in :func:`_modes_in_place` (its batched GEMMs)."""


def _merge(shape, ranks) -> Tuple[Tuple[int, int, int], ...]:
    """``(size, rank, factor index or -1)`` per mode, runs of folded modes merged into one."""
    merged: list = []
    for k, (n, r) in enumerate(zip(shape, ranks)):
        if r == n and merged and merged[-1][2] == -1:
            merged[-1] = (merged[-1][0] * n, merged[-1][1] * r, -1)
        else:
            merged.append((n, r, -1 if r == n else k))
    return tuple(merged)


def _build_plan(out_shape, in_shape, out_ranks, in_ranks) -> TuckerPlan:
    """The uncached :class:`TuckerPlan` of these mode sizes and ranks."""
    in_features, out_features = math.prod(in_shape), math.prod(out_shape)
    plan = TuckerPlan(
        tuple(out_shape),
        tuple(in_shape),
        tuple(out_ranks),
        tuple(in_ranks),
        _merge(out_shape, out_ranks),
        _merge(in_shape, in_ranks),
        in_features,
        out_features,
        math.prod(out_ranks),
        math.prod(in_ranks),
    )
    # Both costs are affine in the batch size with the same zero-batch ordering
    # (input first costs nothing, the weight build something), so comparing the
    # per-row slopes settles every batch size at once.
    input_first, weight_first = tucker_schedule_costs(plan, 1)
    build = tucker_schedule_costs(plan, 0)[1]
    return plan._replace(
        always_input_first=input_first <= weight_first - build,
        small_products_per_row=_small_products_per_row(plan),
    )


def _small_products_per_row(plan: TuckerPlan) -> int:
    """Per row, the matrices :func:`_mode_product` multiplies in :func:`_modes_in_place`."""
    count, pre, post = 0, 1, plan.in_features
    for size, rank, index in plan.in_modes:
        post //= size
        count += pre if index >= 0 and post > 1 else 0
        pre *= rank
    pre, post = plan.rows, 1
    for size, rank, index in reversed(plan.out_modes):
        pre //= rank
        count += pre if index >= 0 and post > 1 else 0
        post *= size
    return count


_cached_plan = functools.lru_cache(maxsize=512)(_build_plan)


def tucker_plan(out_shape, in_shape, out_ranks, in_ranks) -> TuckerPlan:
    """The (cached) :class:`TuckerPlan` for these mode sizes and ranks.

    Examples:
        >>> plan = tucker_plan((16, 12, 8), (8, 8, 6), (10, 9, 8), (8, 8, 6))
        >>> plan.out_modes, plan.in_modes
        (((16, 10, 0), (12, 9, 1), (8, 8, -1)), ((384, 384, -1),))
    """
    key = (tuple(out_shape), tuple(in_shape), tuple(out_ranks), tuple(in_ranks))
    if torch.compiler.is_compiling():
        return _build_plan(*key)
    return _cached_plan(*key)


def _pick(factors, modes):
    """The factor of each merged mode (``None`` for a folded one)."""
    return [None if index < 0 else factors[index] for _, _, index in modes]


def _mode_product(t: torch.Tensor, factor: torch.Tensor, pre: int, size: int, post: int):
    """``factor`` (``(target, size)``) applied to the middle mode of ``t`` viewed as
    ``(pre, size, post)``, the mode keeping its place (nothing is permuted): one
    GEMM, or one batched GEMM over ``pre``. Returns a new tensor."""
    if post == 1:
        return torch.mm(t.reshape(pre, size), factor.mT)
    if pre == 1:
        return torch.mm(factor, t.reshape(size, post))
    # matmul would fold ``pre`` into the rows through two transposing copies.
    return torch.bmm(factor.expand(pre, *factor.shape), t.reshape(pre, size, post))


def _planned_dense_weight(plan: TuckerPlan, core, out_factors, in_factors) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight, built mode by mode along ``plan``."""
    # Every mode keeps its place (input modes on the core's columns first, while the
    # tensor is smallest, then output modes with the input features trailing), so the
    # weight comes out in (out, in) order without rotations.
    t = core
    pre, post = plan.rows, plan.columns
    for size, rank, index in plan.in_modes:
        post //= rank
        if index >= 0:
            t = _mode_product(t, in_factors[index], pre, rank, post)
        pre *= size
    pre, post = 1, plan.rows
    for size, rank, index in plan.out_modes:
        post //= rank
        if index >= 0:
            t = _mode_product(t, out_factors[index], pre, rank, post * plan.in_features)
        pre *= size
    return t.reshape(plan.out_features, plan.in_features)


def tucker_linear(
    input: torch.Tensor,
    core: torch.Tensor,
    out_factors,
    in_factors,
    bias: torch.Tensor | None = None,
    *,
    plan: TuckerPlan | None = None,
) -> torch.Tensor:
    """``F.linear(input, tucker_dense_weight(core, out_factors, in_factors), bias)``, planned.

    The input ``(*, in_features)`` is viewed as ``(B, *in_shape)``. *Input first*
    (the usual plan) runs as a chain of GEMMs: the non-folded input modes, the core
    as a single ``(prod out_ranks, prod in_ranks)`` GEMM, the non-folded output
    modes. With few rows (at most :data:`_IN_PLACE_MAX_PRODUCTS` small matrix
    products in all) every mode keeps its place and is one (batched) GEMM on a
    view. Otherwise each GEMM reads the previous result as a plain or transposed
    matrix and the contracted mode rotates to the front (input side) or the end
    (output side), so nothing is permuted; a folded mode between factored ones is
    rotated by a copy, or on CPU by a GEMM with the identity (faster for modes up
    to 128). A layer whose sides reduce to one mode each (``U G V^T``) runs as
    chained ``F.linear`` calls. *Weight first*: the dense weight is built mode by
    mode without rotations, then one ``F.linear``; see
    :func:`tucker_linear_input_first` for the choice.

    Args:
        input: ``(*, in_features)``.
        core: ``(*out_ranks, *in_ranks)``.
        out_factors: Sequence of ``(out_shape[k], out_ranks[k])`` matrices or ``None``.
        in_factors: Sequence of ``(in_shape[k], in_ranks[k])`` matrices or ``None``.
        bias: ``(out_features,)`` or ``None``.
        plan: The :func:`tucker_plan` of these shapes, if the caller keeps one
            (saves recomputing it on every call).

    Returns:
        ``(*, out_features)``.

    Raises:
        ValueError: If the last input dimension is not ``in_features``.

    Examples:
        >>> core = torch.randn(3, 2, 2, 2)
        >>> outs, ins = [torch.randn(4, 3), None], [torch.randn(3, 2), torch.randn(5, 2)]
        >>> x = torch.randn(7, 15)
        >>> w = tucker_dense_weight(core, outs, ins)
        >>> torch.allclose(tucker_linear(x, core, outs, ins), x @ w.T, atol=1e-5)
        True
    """
    if plan is None:
        plan = tucker_plan(*_tucker_structure(core, out_factors, in_factors))
    in_features = plan.in_features
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(f"expected input of shape (*, {in_features}), got {tuple(input.shape)}")
    batch = input.numel() // in_features
    operands = (input, batch, plan, core, out_factors, in_factors, bias)
    if len(plan.out_modes) == 1 and len(plan.in_modes) == 1:
        return _single_mode_linear(*operands)
    schedule = tucker_linear_schedule(plan, batch)
    if measuring():
        schedule = _measured(schedule, operands)
    return _SCHEDULES[schedule](*operands)


def tucker_linear_schedule(plan: TuckerPlan, batch: int) -> str:
    """The schedule :func:`tucker_linear` runs by default (one of :data:`TUCKER_SCHEDULES`).

    ``"chain"`` (one mode per side: ``U G V^T`` as chained ``F.linear``), else
    ``"in_place"`` for few rows, ``"rotation"`` (in blocks of rows, see
    :mod:`._blocks`); ``"weight_first"`` where :func:`tucker_linear_input_first`
    says so.

    Examples:
        >>> plan = tucker_plan((16, 12, 8), (8, 8, 6), (8, 6, 4), (4, 4, 3))
        >>> tucker_linear_schedule(plan, 1), tucker_linear_schedule(plan, 4096)
        ('in_place', 'rotation')
    """
    first = plan.always_input_first or _input_first(plan, batch)
    if len(plan.out_modes) == 1 and len(plan.in_modes) == 1:
        return "chain" if first else "weight_first"
    if not first:
        return "weight_first"
    if batch * plan.small_products_per_row <= _IN_PLACE_MAX_PRODUCTS and not shape_free_schedule():
        return "in_place"
    return "rotation"


def _chunked_rotation_chain(
    input, batch: int, plan: TuckerPlan, core, out_factors, in_factors, bias
):
    """:func:`_rotation_chain` on blocks of rows that stay in cache (see :mod:`._blocks`)."""
    output = in_row_blocks(
        input.reshape(batch, plan.in_features),
        plan.out_features,
        lambda: _chunk_rows(plan, input.element_size()),
        lambda rows: _rotation_chain(
            rows, rows.shape[0], plan, core, out_factors, in_factors, bias
        ),
    )
    return output.reshape(*input.shape[:-1], plan.out_features)


@functools.lru_cache(maxsize=512)
def _chunk_rows(plan: TuckerPlan, element_size: int) -> int:
    """Rows per block of the rotation chain (:func:`._blocks.block_rows`)."""
    widest = max(plan.in_features, plan.out_features, plan.rows, plan.columns)
    return block_rows(widest, element_size)


def _weight_first(input, batch: int, plan: TuckerPlan, core, out_factors, in_factors, bias):
    """Build the dense weight mode by mode, then one ``F.linear``."""
    return F.linear(input, _planned_dense_weight(plan, core, out_factors, in_factors), bias)


def _measured(default: str, operands) -> str:
    """:func:`~factorized_layers.schedule.choose_schedule` over the Tucker schedules."""
    input, batch, plan = operands[:3]
    input_first, weight_first = tucker_schedule_costs(plan, batch)
    modelled = {"weight_first": weight_first, "rotation": input_first}
    if len(plan.out_modes) == 1 and len(plan.in_modes) == 1:
        modelled["chain"] = modelled.pop("rotation")
    # Keeping modes in place batches many tiny GEMMs; it won up to batch 4096 on some
    # MiniLM shapes (benchmarks/bench_schedule.py), but time it only while bounded.
    elif batch * plan.small_products_per_row <= 1024 * _IN_PLACE_MAX_PRODUCTS:
        modelled["in_place"] = input_first
    candidates = {name: functools.partial(_SCHEDULES[name], *operands) for name in modelled}
    return choose_schedule("tucker_linear", plan, default, candidates, modelled, input, batch)


def _single_mode_linear(input, batch: int, plan: TuckerPlan, core, out_factors, in_factors, bias):
    """One (merged) mode per side: ``U G V^T`` as chained ``F.linear`` calls, or weight first."""
    operands = (input, batch, plan, core, out_factors, in_factors, bias)
    if plan.out_modes[0][2] < 0 and plan.in_modes[0][2] < 0:
        return F.linear(input, core.reshape(plan.rows, plan.columns), bias)
    schedule = tucker_linear_schedule(plan, batch)
    if measuring():
        schedule = _measured(schedule, operands)
    return _SCHEDULES[schedule](*operands)


def _single_mode_chain(input, batch: int, plan: TuckerPlan, core, out_factors, in_factors, bias):
    """``U G V^T`` applied to the input as chained ``F.linear`` calls."""
    out_modes, in_modes = plan.out_modes, plan.in_modes
    matrix = core if core.dim() == 2 else core.reshape(plan.rows, plan.columns)
    u = None if out_modes[0][2] < 0 else out_factors[out_modes[0][2]]
    v = None if in_modes[0][2] < 0 else in_factors[in_modes[0][2]]
    h = input if v is None else torch.matmul(input, v)
    if u is None:
        return F.linear(h, matrix, bias)
    return F.linear(F.linear(h, matrix), u, bias)


def _rotation_chain(input, batch: int, plan: TuckerPlan, core, out_factors, in_factors, bias):
    """Input first with rotations: input modes to the front, core GEMM, output modes to the end."""
    out_modes, in_modes = plan.out_modes, plan.in_modes
    lead = input.shape[:-1]
    if len(in_modes) == 1 and in_modes[0][2] < 0:
        t = input.reshape(batch, plan.in_features).mT  # (S, B) as a view: no copy
    else:
        t = _end_to_front(
            input,
            _pick(in_factors, in_modes),
            [n for n, _, _ in in_modes],
            [r for _, r, _ in in_modes],
            batch,
        ).reshape(plan.columns, batch)
    t = torch.mm(core.reshape(plan.rows, plan.columns), t)  # (R, B)
    t = _front_to_end(
        t,
        _pick(out_factors, out_modes),
        [r for _, r, _ in out_modes],
        [n for n, _, _ in out_modes],
        batch,
    )  # (B, out)
    out = t.reshape(*lead, plan.out_features)
    return out if bias is None else out + bias


_IN_PLACE_MAX_PRODUCTS = 64
"""Most small matrix products for which :func:`_modes_in_place` beats the rotation chain.

Measured on the MiniLM layers with (8, 8, 6) tensorizations at batches 1--64 (2 CPU
threads): it won up to 24--64 products (up to batch 64 for 384x384 with ranks
(3, 8, 6 | 8, 8, 6), batch 2 for 1536x384) and lost from about 90."""


def _modes_in_place(input, batch: int, plan: TuckerPlan, core, out_factors, in_factors, bias):
    """The chain with every mode kept in place: the fewest kernel calls.

    Each mode is one GEMM, or one batched GEMM over the rows and the modes before
    it, on a view; nothing is rotated. With few rows (or when every factored mode
    is the last of its side, so that no GEMM is batched) this beats the rotation
    chain, whose copies and views cost more than its arithmetic there. The output
    modes run last to first so that, for one row, the final GEMM (the first mode,
    a plain matrix product) takes the bias.
    """
    t = input
    pre, post = batch, plan.in_features
    for size, rank, index in plan.in_modes:
        post //= size
        if index >= 0:
            t = _mode_product(t, in_factors[index].mT, pre, size, post)
        pre *= rank
    matrix = core.reshape(plan.rows, plan.columns)
    if batch == 1:
        # Matrix-vector: 3.2 us against 4.0 us for a one-row GEMM at 42x384 (2 threads).
        t = torch.mv(matrix, t.reshape(plan.columns))
    else:
        t = F.linear(t.reshape(batch, plan.columns), matrix)
    modes = plan.out_modes
    first = 0 if batch == 1 and modes[0][2] >= 0 and bias is not None else -1
    pre, post = batch * plan.rows, 1
    for k in range(len(modes) - 1, -1, -1):
        size, rank, index = modes[k]
        pre //= rank
        if k == first:
            t = torch.addmm(bias.view(size, post), out_factors[index], t.reshape(rank, post))
            bias = None
        elif index >= 0:
            t = _mode_product(t, out_factors[index], pre, rank, post)
        post *= size
    t = t.reshape(input.shape[:-1] + (plan.out_features,))
    return t if bias is None else t + bias


_SCHEDULES = {
    "weight_first": _weight_first,
    "in_place": _modes_in_place,
    "rotation": _chunked_rotation_chain,
    "chain": _single_mode_chain,
}
TUCKER_SCHEDULES = tuple(_SCHEDULES)
"""Names of the schedules :func:`tucker_linear` can run (see :func:`tucker_linear_schedule`)."""


def tucker_linear_scheduled(
    schedule: str, input, core, out_factors, in_factors, bias=None, *, plan: TuckerPlan
) -> torch.Tensor:
    """:func:`tucker_linear` forced to run ``schedule`` (benchmarks and tests compare them).

    ``"chain"`` applies to one mode per side only; the others to more than one.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {TUCKER_SCHEDULES}, got {schedule!r}")
    single = len(plan.out_modes) == 1 and len(plan.in_modes) == 1
    if (schedule == "chain") != single and schedule in ("chain", "in_place", "rotation"):
        raise ValueError(
            f"schedule {schedule!r} does not apply to a plan with {len(plan.out_modes)} "
            f"output and {len(plan.in_modes)} input mode(s)"
        )
    if input.dim() == 0 or input.shape[-1] != plan.in_features:
        raise ValueError(
            f"expected input of shape (*, {plan.in_features}), got {tuple(input.shape)}"
        )
    batch = input.numel() // plan.in_features
    return _SCHEDULES[schedule](input, batch, plan, core, out_factors, in_factors, bias)


def _input_first(plan: TuckerPlan, batch) -> bool:
    """:func:`tucker_linear_input_first`, as the dispatch in :func:`tucker_linear` calls it."""
    return tucker_linear_input_first(plan, batch)
