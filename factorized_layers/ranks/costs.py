"""Parameter and FLOP (multiply-accumulate) counts of dense and factorized weights.

Low-rank matrices (SVD), CP tensors and convolutions, and Tucker tensors and linears.
All counts are plain Python integers.
"""

from __future__ import annotations

import math
import numbers

from .spec import _check_shape

__all__ = [
    "low_rank_params",
    "low_rank_break_even",
    "dense_linear_flops",
    "low_rank_linear_flops",
    "cp_params",
    "dense_conv_flops",
    "cp_conv_flops",
    "tucker_params",
    "tucker_linear_flops",
]


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
