"""Tensor-train (TT-matrix) linear kernel: the input contracted core by core.

The weight ``W`` of shape ``(prod(out_shape), prod(in_shape))`` is a TT-matrix of
``d`` cores, core ``k`` of shape ``(r_{k-1}, out_shape[k], in_shape[k], r_k)``
(``r_0 = r_d = 1``):
``W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_d[:, o_d, i_d, :]``
with row-major multi-indices. :func:`tt_linear` never forms ``W`` (unless that is
modelled to be cheaper, see :func:`tt_schedule`): each core is one (batched) GEMM of
the whole running intermediate, and no opt_einsum planning runs per call.

Two layouts of the running intermediate (:attr:`TTPlan.layout`):

* ``'columns'`` -- the input transposed, features first and rows last: every step is
  ``core_matrix @ t`` batched over the modes not yet reached (or already produced),
  with the contracted pair ``(i_k, r_k)`` adjacent and the rows inside the GEMM's
  columns (one ``bmm`` with the core expanded over the batch), so no intermediate is
  ever permuted; the core is used as a view. One transposition of the input
  (first-core-first only) and one of the output (fused with the bias) remain. Two to
  four times as fast as ``'rows'`` on balanced trains (measured on CPU).
* ``'rows'`` -- rows first, one plain GEMM per core followed by an axis swap; used
  when every swap moves a size-1 axis (free), as in the low-rank form
  ``(out, 1), (1, in)``, which it runs as exactly two GEMMs with the bias fused.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..contract import shape_free_schedule
from ..ranks.tt import tt_linear_flops
from ..schedule import choose_schedule, measuring
from ._blocks import block_rows, in_row_blocks
from .svd import check_linear_input

__all__ = [
    "TTPlan",
    "TT_SCHEDULES",
    "tt_build_flops",
    "tt_dense_weight",
    "tt_linear",
    "tt_plan",
    "tt_schedule",
]

TT_SCHEDULES = ("last_core_first", "first_core_first", "weight_first")
"""The forward schedules :func:`tt_schedule` chooses from."""


def _shapes(
    cores: Sequence[torch.Tensor],
) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """``(out_shape, in_shape, bond ranks)`` of a list of cores."""
    outs = tuple(int(c.shape[1]) for c in cores)
    ins = tuple(int(c.shape[2]) for c in cores)
    ranks = tuple(int(c.shape[3]) for c in cores[:-1])
    return outs, ins, ranks


def _build_costs(out_shape: Sequence[int], in_shape: Sequence[int], ranks: Sequence[int]):
    """Multiply-accumulates of building the weight left to right and right to left."""
    sizes = [o * i for o, i in zip(out_shape, in_shape)]
    full = (1, *ranks, 1)
    d = len(sizes)
    left = sum(math.prod(sizes[: k + 1]) * full[k] * full[k + 1] for k in range(1, d))
    right = sum(math.prod(sizes[k:]) * full[k] * full[k + 1] for k in range(d - 1))
    return left, right


def tt_build_flops(out_shape: Sequence[int], in_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-accumulates of :func:`tt_dense_weight` (the cheaper end first).

    Examples:
        >>> tt_build_flops((4, 4), (4, 4), (3,))
        768
    """
    return min(_build_costs(out_shape, in_shape, ranks))


class TTPlan(NamedTuple):
    """The static part of a TT layer's forward schedule (see :func:`tt_plan`)."""

    out_shape: Tuple[int, ...]
    in_shape: Tuple[int, ...]
    ranks: Tuple[int, ...]
    order: str
    """``'last_core_first'`` or ``'first_core_first'``: the cheaper core-by-core order."""
    excess: int
    """Multiply-accumulates per row above the dense GEMM's (``<= 0``: never weight first)."""
    build: int
    """Multiply-accumulates of building the dense weight (:func:`tt_build_flops`)."""
    layout: Tuple[str, str]
    """``'rows'`` or ``'columns'`` for the last-core-first and first-core-first orders."""


def _rows_are_free(out_shape, in_shape, ranks, order: str) -> bool:
    """Whether every axis swap of the ``'rows'`` layout moves a size-1 axis."""
    d = len(out_shape)
    full = (1, *ranks, 1)
    if order == "last_core_first":
        swaps = [(in_shape[k - 1], math.prod(out_shape[k + 1 :])) for k in range(d - 1, 0, -1)]
        swaps.append((math.prod(out_shape[1:]), out_shape[0]))
    else:
        swaps = [(in_shape[0], math.prod(in_shape[1:]))]
        swaps += [
            (
                in_shape[k + 1],
                math.prod(in_shape[k + 2 :]) * math.prod(out_shape[: k + 1]) * full[k + 1],
            )
            for k in range(d - 1)
        ]
    return all(a == 1 or b == 1 for a, b in swaps)


@functools.lru_cache(maxsize=512)
def tt_plan(
    out_shape: Tuple[int, ...], in_shape: Tuple[int, ...], ranks: Tuple[int, ...]
) -> TTPlan:
    """The (cached) :class:`TTPlan` of a TT-matrix structure.

    Examples:
        >>> plan = tt_plan((1536, 1), (1, 384), (153,))
        >>> plan.order, plan.layout
        ('last_core_first', ('rows', 'columns'))
        >>> tt_plan((16, 16, 16), (16, 16, 16), (8, 8)).layout
        ('columns', 'columns')
    """
    out_shape, in_shape, ranks = tuple(out_shape), tuple(in_shape), tuple(ranks)
    last_first, first_first = tt_linear_flops(out_shape, in_shape, ranks)
    per_row = min(last_first, first_first)
    dense = math.prod(out_shape) * math.prod(in_shape)
    order = "last_core_first" if last_first <= first_first else "first_core_first"
    build = tt_build_flops(out_shape, in_shape, ranks)
    layout = tuple(
        "rows" if _rows_are_free(out_shape, in_shape, ranks, o) else "columns"
        for o in ("last_core_first", "first_core_first")
    )
    return TTPlan(out_shape, in_shape, ranks, order, per_row - dense, build, layout)


def tt_schedule(plan: TTPlan, batch: int) -> str:
    """Which of :data:`TT_SCHEDULES` :func:`tt_linear` runs for ``batch`` input rows.

    The cheaper (in multiply-accumulates, :func:`~factorized_layers.ranks.tt_linear_flops`)
    of the two core-by-core orders; the dense weight is built first only where the
    cores cost more per row than the dense weight and the batch is large enough for
    ``batch * excess`` to exceed the build. Under ``torch.compile`` the same integer
    comparison becomes a shape guard.

    Examples:
        >>> tt_schedule(tt_plan((1536, 1), (1, 384), (153,)), 32)
        'last_core_first'
        >>> tt_schedule(tt_plan((48, 32), (24, 16), (192,)), 4096)
        'weight_first'
    """
    if plan.excess > 0 and (shape_free_schedule() or batch * plan.excess > plan.build):
        return "weight_first"
    return plan.order


def _measured(default: str, input, cores, bias, plan: TTPlan, rows: int) -> str:
    """:func:`~factorized_layers.schedule.choose_schedule` over :data:`TT_SCHEDULES`."""
    last_first, first_first = tt_linear_flops(plan.out_shape, plan.in_shape, plan.ranks)
    modelled = {
        "last_core_first": rows * last_first,
        "first_core_first": rows * first_first,
        "weight_first": plan.build + rows * math.prod(plan.out_shape) * math.prod(plan.in_shape),
    }
    candidates = {
        name: functools.partial(tt_linear, input, cores, bias, plan=plan, schedule=name)
        for name in modelled
    }
    return choose_schedule("tt_linear", plan, default, candidates, modelled, input, rows)


def tt_dense_weight(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``(prod(out_shape), prod(in_shape))`` matrix a list of TT cores represents.

    Differentiable; the cores are multiplied from the end of the train that costs
    fewer multiply-accumulates (:func:`tt_build_flops`), then the interleaved
    ``(o_1, i_1, ..., o_d, i_d)`` modes are permuted to ``(o_1..o_d, i_1..i_d)``.

    Examples:
        >>> a, b = torch.randn(1, 2, 3, 4), torch.randn(4, 5, 6, 1)
        >>> w = tt_dense_weight([a, b])
        >>> expected = torch.einsum("xoiy,ypjz->opij", a, b).reshape(10, 18)
        >>> w.shape, torch.allclose(w, expected, atol=1e-5)
        (torch.Size([10, 18]), True)
    """
    outs, ins, ranks = _shapes(cores)
    d = len(cores)
    left, right = _build_costs(outs, ins, ranks)
    if left <= right:
        result = cores[0].reshape(outs[0] * ins[0], cores[0].shape[3])
        for core in cores[1:]:
            r, o, i, r_next = core.shape
            result = (result @ core.reshape(r, o * i * r_next)).reshape(-1, r_next)
    else:
        result = cores[-1].reshape(cores[-1].shape[0], outs[-1] * ins[-1])
        for core in reversed(cores[:-1]):
            r, o, i, r_next = core.shape
            result = (core.reshape(r * o * i, r_next) @ result).reshape(r, -1)
    interleaved = result.reshape([n for pair in zip(outs, ins) for n in pair])
    order = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    return interleaved.permute(order).reshape(math.prod(outs), math.prod(ins))


def _gemm(t: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return t @ matrix if bias is None else torch.addmm(bias, t, matrix)


def _rows_last_core_first(
    x: torch.Tensor, cores: Sequence[torch.Tensor], ins, bias: torch.Tensor | None
) -> torch.Tensor:
    """Core ``d`` first; the running tensor is ``(rows * i_{<k}, O_{>k}, i_k * r_k)``.

    ``bias`` is fused into the last GEMM when its output needs no transposition (every
    output mode but the first of size 1, as in the low-rank form); otherwise added.
    """
    rows = x.shape[0]
    d = len(cores)
    produced = 1  # prod(out_shape[k+1:])
    t = x
    for k in range(d - 1, -1, -1):
        r_prev, o, i, r = cores[k].shape
        # (i_k, r_k) -> (o_k, r_{k-1}): the GEMM's result keeps r_{k-1} innermost (a
        # view of the core, not a copy, for the first and for r_{k-1} = 1 cores).
        matrix = cores[k].permute(2, 3, 1, 0).reshape(i * r, o * r_prev)
        pending = math.prod(ins[:k])  # input modes not yet contracted
        flat = t.reshape(rows * pending * produced, i * r)
        if k == 0:
            if produced == 1:
                return _gemm(flat, matrix, bias)
            out = (flat @ matrix).reshape(rows, produced, o).transpose(1, 2)
            out = out.reshape(rows, produced * o)
            return out if bias is None else out + bias
        previous = ins[k - 1]
        y = (flat @ matrix).reshape(rows * (pending // previous), previous, produced, o, r_prev)
        # Bring the next input mode next to r_{k-1}: (.., o_k, O_{>k}, i_{k-1}, r_{k-1}).
        t = y.transpose(1, 3)
        produced *= o
    raise AssertionError("unreachable")  # pragma: no cover


def _rows_first_core_first(
    x: torch.Tensor, cores: Sequence[torch.Tensor], ins, bias: torch.Tensor | None
) -> torch.Tensor:
    """Core 1 first; the running tensor is ``(rows * I_{>k}, O_{<k}, r_{k-1} * i_k)``.

    ``bias`` is fused into the last GEMM when the other output modes are of size 1.
    """
    rows = x.shape[0]
    d = len(cores)
    produced = 1  # prod(out_shape[:k])
    remaining = math.prod(ins[1:])
    # (rows, i_1, I_{>1}) -> (rows, I_{>1}, i_1): the contracted mode last.
    t = x.reshape(rows, ins[0], remaining).transpose(1, 2)
    for k in range(d):
        r_prev, o, i, r = cores[k].shape
        matrix = cores[k].permute(0, 2, 1, 3).reshape(r_prev * i, o * r)
        flat = t.reshape(rows * remaining * produced, r_prev * i)
        if k == d - 1:
            if produced == 1:
                return _gemm(flat, matrix, bias)
            out = (flat @ matrix).reshape(rows, produced * o)
            return out if bias is None else out + bias
        y = flat @ matrix
        produced *= o
        following = ins[k + 1]
        remaining //= following
        # (rows, i_{k+1}, I_{>k+1}, O_{<=k}, r_k) -> (rows, I_{>k+1}, O_{<=k}, r_k, i_{k+1}).
        t = y.reshape(rows, following, remaining * produced * r).transpose(1, 2)
    raise AssertionError("unreachable")  # pragma: no cover


def _shared_bmm(matrix: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """``matrix @ batch[b]`` for every ``b``: one ``bmm`` with the matrix expanded.

    ``torch.matmul(matrix, batch)`` would fold the batch into one GEMM by transposing
    (copying) the whole intermediate twice; measured twice as slow on CPU.
    """
    return torch.bmm(matrix.expand(batch.shape[0], *matrix.shape), batch)


def _columns_last_core_first(
    x: torch.Tensor, cores: Sequence[torch.Tensor], ins, bias: torch.Tensor | None
) -> torch.Tensor:
    """Core ``d`` first on ``x^T``; the running tensor is ``(I_{<k}, i_k r_k, O_{>k} rows)``."""
    rows = x.shape[0]
    t = x.T  # (in_features, rows): a view; each step's batched GEMM takes it strided
    produced = 1
    for k in range(len(cores) - 1, -1, -1):
        r_prev, o, i, r = cores[k].shape
        batch = math.prod(ins[:k])
        matrix = cores[k].reshape(r_prev * o, i * r)  # a view of the core
        t = _shared_bmm(matrix, t.reshape(batch, i * r, produced * rows))
        produced *= o
    out = t.reshape(produced, rows).T
    return out.contiguous() if bias is None else out + bias


def _columns_first_core_first(
    x: torch.Tensor, cores: Sequence[torch.Tensor], ins, bias: torch.Tensor | None
) -> torch.Tensor:
    """Core 1 first on ``x^T``; the running tensor is ``(O_{<k}, r_{k-1} i_k, I_{>k} rows)``."""
    rows = x.shape[0]
    t = x.T.contiguous()  # (in_features, rows)
    produced, remaining = 1, math.prod(ins)
    for core in cores:
        r_prev, o, i, r = core.shape
        remaining //= i
        matrix = core.permute(1, 3, 0, 2).reshape(o * r, r_prev * i)
        t = _shared_bmm(matrix, t.reshape(produced, r_prev * i, remaining * rows))
        produced *= o
    out = t.reshape(produced, rows).T
    return out.contiguous() if bias is None else out + bias


_CHAINS = {
    ("last_core_first", "rows"): _rows_last_core_first,
    ("last_core_first", "columns"): _columns_last_core_first,
    ("first_core_first", "rows"): _rows_first_core_first,
    ("first_core_first", "columns"): _columns_first_core_first,
}


def tt_linear(
    input: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    plan: TTPlan | None = None,
    schedule: str | None = None,
) -> torch.Tensor:
    """``F.linear(input, tt_dense_weight(cores), bias)`` without forming the weight.

    Args:
        input: ``(*, prod(in_shape))``.
        cores: ``d >= 2`` cores, core ``k`` of shape ``(r_{k-1}, out_shape[k],
            in_shape[k], r_k)``, ``r_0 = r_d = 1``.
        bias: ``(prod(out_shape),)`` or ``None``.
        plan: The cores' :func:`tt_plan` (computed when ``None``).
        schedule: One of :data:`TT_SCHEDULES`; default :func:`tt_schedule`'s choice.

    Returns:
        ``(*, prod(out_shape))``.

    Raises:
        ValueError: If the last input dimension is not ``prod(in_shape)`` or the
            schedule is unknown.

    Examples:
        >>> cores = [torch.randn(1, 4, 3, 5), torch.randn(5, 2, 6, 1)]
        >>> x = torch.randn(7, 18)
        >>> torch.allclose(tt_linear(x, cores), x @ tt_dense_weight(cores).T, atol=1e-4)
        True
    """
    if plan is None:
        plan = tt_plan(*_shapes(cores))
    outs, ins = plan.out_shape, plan.in_shape
    in_features, out_features = math.prod(ins), math.prod(outs)
    check_linear_input(input, in_features)
    leading = input.shape[:-1]
    rows = math.prod(leading)
    if schedule is None:
        schedule = tt_schedule(plan, rows)
        if measuring():
            schedule = _measured(schedule, input, cores, bias, plan, rows)
    if schedule == "weight_first":
        return F.linear(input, tt_dense_weight(cores), bias)
    if schedule not in ("last_core_first", "first_core_first"):
        raise ValueError(f"schedule must be one of {TT_SCHEDULES}, got {schedule!r}")
    layout = plan.layout[0 if schedule == "last_core_first" else 1]
    chain = _CHAINS[schedule, layout]
    out = in_row_blocks(
        input.reshape(rows, in_features),
        out_features,
        lambda: _block_rows(plan, input.element_size()),
        lambda x: chain(x, cores, ins, bias),
    )
    return out.reshape(*leading, out_features)


@functools.lru_cache(maxsize=512)
def _block_rows(plan: TTPlan, element_size: int) -> int:
    """Rows per block of the core chains (:func:`._blocks.block_rows`)."""
    outs, ins, ranks = plan.out_shape, plan.in_shape, (1, *plan.ranks, 1)
    modes = range(len(outs) + 1)
    widest = max(
        max(math.prod(ins[:k]) * math.prod(outs[k:]) * ranks[k] for k in modes),
        max(math.prod(ins[k:]) * math.prod(outs[:k]) * ranks[k] for k in modes),
    )
    return block_rows(widest, element_size)
