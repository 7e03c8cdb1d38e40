"""SVD linear kernel: ``F.linear(input, B @ A, bias)`` as two GEMMs when that is cheaper.

The order (input first or weight first) is the one opt_einsum plans for
:data:`SVD_LINEAR_EQUATION` on the call's shapes, through
:mod:`factorized_layers.contract`'s cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import contraction_path, shape_free_schedule
from ..ranks import dense_linear_flops, low_rank_break_even, low_rank_linear_flops

__all__ = ["svd_linear", "svd_linear_input_first"]

SVD_LINEAR_EQUATION = "bi,ri,or->bo"


def svd_linear_input_first(batch: int, in_features: int, out_features: int, rank: int) -> bool:
    """Whether ``x @ A.T @ B.T`` (input first) beats ``x @ (B @ A).T`` (weight first).

    The order is what opt_einsum plans for ``"bi,ri,or->bo"`` on these shapes. When
    the rank saves parameters (``rank <= rows * cols / (rows + cols)``) input-first
    is cheaper for every batch size, so the answer is known without planning; above
    that break-even the cached opt_einsum plan for this batch size decides. Under
    ``torch.compile`` (where the batch size may be symbolic and the cache's lock
    cannot be traced) the same choice is made by comparing multiply-accumulate
    counts, which dynamo turns into a shape guard instead of a graph break.

    Examples:
        >>> svd_linear_input_first(1, 1536, 384, 64)
        True
        >>> svd_linear_input_first(4096, 384, 384, 384)
        False
    """
    if rank <= low_rank_break_even(out_features, in_features):
        return True
    if shape_free_schedule():
        return False  # above break-even the weight-first slope per row is the smaller one
    if batch == 0:
        return True
    if torch.compiler.is_compiling():
        input_first = low_rank_linear_flops(in_features, out_features, rank, batch)
        weight_first = rank * in_features * out_features + dense_linear_flops(
            in_features, out_features, batch
        )
        return input_first <= weight_first
    path = contraction_path(
        SVD_LINEAR_EQUATION, (batch, in_features), (rank, in_features), (out_features, rank)
    )
    return path[0] == (0, 1)


def svd_linear(
    input: torch.Tensor,
    input_factor: torch.Tensor,
    output_factor: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(input, output_factor @ input_factor, bias)`` as two GEMMs.

    Args:
        input: ``(*, in_features)``.
        input_factor: ``(rank, in_features)``.
        output_factor: ``(out_features, rank)``.
        bias: ``(out_features,)`` or ``None``.

    Returns:
        ``(*, out_features)``.

    Raises:
        ValueError: If the last input dimension is not ``in_features``.

    Examples:
        >>> x, A, B = torch.randn(5, 8), torch.randn(2, 8), torch.randn(3, 2)
        >>> torch.allclose(svd_linear(x, A, B), x @ (B @ A).T, atol=1e-6)
        True
    """
    rank, in_features = input_factor.shape
    check_linear_input(input, in_features)
    out_features = output_factor.shape[0]
    batch = input.numel() // in_features
    if svd_linear_input_first(batch, in_features, out_features, rank):
        return F.linear(F.linear(input, input_factor), output_factor, bias)
    return F.linear(input, output_factor @ input_factor, bias)


def check_linear_input(input: torch.Tensor, in_features: int) -> None:
    """``ValueError`` unless ``input`` has shape ``(*, in_features)``."""
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(f"expected input of shape (*, {in_features}), got {tuple(input.shape)}")
