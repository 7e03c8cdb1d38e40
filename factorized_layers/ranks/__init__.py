"""Rank specifications, rank policies and the parameter / FLOP arithmetic every layer shares.

A *rank spec* says how much of a weight to keep:

* ``int`` -- that rank exactly, ``1 <= rank <= min(rows, cols)``;
* ``float`` in ``(0, 1]`` -- the largest rank whose factor parameters are at most
  that fraction of the dense weight's parameters (never below 1).

All counts are plain Python integers so they can be used in shape arithmetic, in
reports and under ``torch.compile`` alike.

Modules:

* :mod:`~factorized_layers.ranks.spec` -- :data:`RankSpec`, the shared validators
  and rank-spec resolution for matrices (:func:`resolve_matrix_rank`) and CP tensors
  (:func:`resolve_cp_rank`, :func:`cp_max_rank`);
* :mod:`~factorized_layers.ranks.costs` -- parameter and FLOP counts of dense,
  low-rank (SVD), CP and Tucker weights and layers;
* :mod:`~factorized_layers.ranks.tucker` -- Tucker multilinear ranks: their limits,
  rank-spec resolution and the error-minimising :func:`allocate_tucker_ranks`;
* :mod:`~factorized_layers.ranks.tt` -- tensor-train bond ranks: limits, costs, rank-spec
  resolution and the error-minimising :func:`allocate_tt_ranks`;
* :mod:`~factorized_layers.ranks.policies` -- the rank policies :class:`Energy`,
  :class:`ErrorBound`, :class:`EVBMF` and :class:`Budget`, :class:`RankProfile`,
  :func:`select_rank` and the global :func:`allocate_budget`;
* :mod:`~factorized_layers.ranks.evbmf` -- the EVBMF maths behind :func:`evbmf_rank`.
"""

from . import policies
from .costs import (
    cp_conv_flops,
    cp_params,
    dense_conv_flops,
    dense_linear_flops,
    low_rank_break_even,
    low_rank_linear_flops,
    low_rank_params,
    tucker_linear_flops,
    tucker_params,
)
from .evbmf import evbmf_rank
from .policies import (
    EVBMF,
    Budget,
    Energy,
    ErrorBound,
    RankPolicy,
    RankProfile,
    allocate_budget,
    select_rank,
)
from .spec import RankSpec, check_positive, cp_max_rank, resolve_cp_rank, resolve_matrix_rank
from .tt import allocate_tt_ranks, max_tt_ranks, resolve_tt_ranks, tt_linear_flops, tt_params
from .tucker import allocate_tucker_ranks, max_tucker_ranks, resolve_tucker_ranks

# Public, though not in ``__all__`` (as in the single-module ``ranks``): the policy
# classes, for ``isinstance`` checks.
POLICY_TYPES = policies.POLICY_TYPES

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
    "tucker_params",
    "max_tucker_ranks",
    "resolve_tucker_ranks",
    "allocate_tucker_ranks",
    "tucker_linear_flops",
    "max_tt_ranks",
    "resolve_tt_ranks",
    "allocate_tt_ranks",
    "tt_params",
    "tt_linear_flops",
]
