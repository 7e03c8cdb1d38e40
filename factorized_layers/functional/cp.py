"""CP N-d convolution kernel: ``in -> rank`` contraction, depthwise spatial filtering,
``rank -> out`` contraction, never building the dense kernel.

:func:`cp_convnd` composes the steps, each a small unit of this module; the
convolution arguments (stride, padding, dilation, ``padding_mode``) are handled by
:mod:`factorized_layers.functional._conv`, shared with every convolution family.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..contract import shape_free_schedule
from ..schedule import choose_schedule, measuring
from ._conv import (
    DEPTHWISE_CONV,
    check_padding_mode,
    conv_output_pixels,
    conv_padding_pairs,
    conv_tuple,
    pad_for_conv,
)

__all__ = [
    "cp_conv2d",
    "cp_conv_separable",
    "cp_convnd",
    "cp_merged_kernel",
]


def cp_conv_separable(kernel_size) -> bool:
    """Whether the depthwise step runs as one 1-D pass per spatial dimension.

    The merged kernel (outer product of the spatial factors) costs ``prod(kernel)``
    multiply-adds per channel and pixel in one pass; the separable form costs
    ``sum(kernel)`` in one pass per dimension. Measured on 2 shared CPU cores
    (channels-last depthwise convolutions, ranks 14-66, 14x14 to 56x56 images,
    ``benchmarks/bench_cp_conv2d.py --depthwise``), separable/merged time was
    1.2-2.0 at 3x3 and 5x5, 0.80-0.84 at 7x7, 0.50-0.61 at 9x9 and 0.30-0.42 at
    11x11; 7x5 (1.06-1.10) and 3x9 (0.97-1.06) were ties. The rule
    ``prod(kernel) > 3 * sum(kernel)`` (with two or more non-trivial dimensions)
    puts the crossover between 5x5 and 7x7 and keeps the ties merged (one pass).

    Examples:
        >>> cp_conv_separable((5, 5)), cp_conv_separable((7, 5)), cp_conv_separable((7, 7))
        (False, False, True)
    """
    kernel = tuple(kernel_size)
    if sum(k > 1 for k in kernel) < 2:
        return False
    return math.prod(kernel) > 3 * sum(kernel)


def cp_merged_kernel(spatial_factors) -> torch.Tensor:
    """The ``(rank, 1, *kernel_size)`` depthwise kernel: outer products of the factors.

    Examples:
        >>> cp_merged_kernel([torch.ones(3, 2), torch.ones(5, 2)]).shape
        torch.Size([2, 1, 3, 5])
    """
    kernel = spatial_factors[0].T
    rank = kernel.shape[0]
    for factor in spatial_factors[1:]:
        shape = (rank,) + (1,) * (kernel.dim() - 1) + (factor.shape[0],)
        kernel = kernel.unsqueeze(-1) * factor.T.reshape(shape)
    return kernel.unsqueeze(1)


_BATCHED_GEMM_MIN_MACS = 1 << 17
"""Multiply-adds per image from which :func:`cp_convnd` reads an NCHW input by one
batched GEMM over the images (no copy) rather than copying it into one tall GEMM.
Measured on 2 CPU threads: at 64->128, rank 37, 32x32 (2.4 M per image) the batched
GEMM saved the 4 MB copy; at 1 -> 32 channels, rank 6 on 8x8 digits (384 per image,
360 images) it was 4.3x slower, each image's GEMM costing more in overhead than work;
at 32x8x8 to rank 16 (33 K) the two were even."""

_BIAS_CHANNEL_MIN_OUTPUT = 1 << 20
"""Output elements from which :func:`cp_convnd` carries the bias as an extra rank
channel instead of adding it to the output afterwards (a pass over the output).
Measured on 2 CPU threads with glibc's heap pinned (``MALLOC_MMAP_THRESHOLD_``) so
that allocation did not dominate: at 64->128, 32x32, batch 16 (2 M output elements)
the channel took 0.84x (rank 37) and 0.96x (rank 93) of the time on NCHW input,
0.91x and 0.98x on channels_last; at 256->256, 14x14, batch 8 (0.4 M elements, in
cache) it took 1.02--1.08x."""


def cp_convnd(
    input: torch.Tensor,
    out_channel_factor: torch.Tensor,
    in_channel_factor: torch.Tensor,
    spatial_factors,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    separable: bool | None = None,
) -> torch.Tensor:
    """N-d convolution with a CP kernel, never building the dense kernel.

    ``weight[o, i, k_1, ..., k_n] = sum_r out[o, r] * in[i, r] * s_1[k_1, r] * ...``.
    Three steps:

    1. ``in -> rank``: one GEMM over the channel dimension whose output is laid out
       channels-last, ``(N, *spatial, rank)``; an NCHW input with enough work per
       image (:data:`_BATCHED_GEMM_MIN_MACS`) is read through a transposed view by a
       batched GEMM (``matmul`` would copy it first). Measured as fast as or
       faster than a 1x1 ``F.conv2d`` (up to 4x on NCHW input) and the equivalent
       opt_einsum contraction (up to 2x), ``benchmarks/bench_cp_conv2d.py
       --contraction``.
    2. Depthwise filtering with ``groups=rank``: the merged kernel
       (:func:`cp_merged_kernel`), or one 1-D pass per dimension when
       :func:`cp_conv_separable` says so (or ``separable=True``). Stride, dilation
       and padding are those of ``F.conv2d``: the padding (any ``padding_mode``, and
       the asymmetric part of ``'same'`` for even kernels) is applied to the
       ``rank``-channel tensor with ``F.pad`` like ``nn.Conv2d`` pads its input --
       it commutes with the per-pixel channel contraction and is cheaper there.
       Channels-last depthwise convolutions ran 2-9x faster than NCHW ones on CPU.
    3. ``rank -> out``: one GEMM written straight into the output's memory
       format: NCHW-contiguous for a contiguous input, channels-last for a
       channels-last input -- what ``nn.Conv2d`` returns. The bias enters the
       last GEMM (``baddbmm`` / ``F.linear``, which first copy it into the whole
       output) or, for outputs of :data:`_BIAS_CHANNEL_MIN_OUTPUT` elements or
       more, rides along as one more rank channel that is 1 after step 2.

    Large temporaries matter on CPU beyond their copies: glibc serves big blocks by
    ``mmap``, and every call then pays page faults on fresh memory. With the heap
    pinned (``MALLOC_MMAP_THRESHOLD_``) the NCHW path at 64->128, rank 37, 32x32,
    batch 16 took 1.48 ms against 1.62 ms for the previous copy-then-GEMM form;
    under the default allocator the previous form measured 2.1--7.0 ms.

    Args:
        input: ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``.
        out_channel_factor: ``(C_out, rank)``.
        in_channel_factor: ``(C_in, rank)``.
        spatial_factors: One ``(k_d, rank)`` factor per spatial dimension (1 to 3).
        bias: ``(C_out,)`` or ``None``.
        stride: ``int`` or tuple of ``n`` ints.
        padding: ``int``, tuple of ``n`` ints, ``'same'`` or ``'valid'``.
        dilation: ``int`` or tuple of ``n`` ints.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        separable: Force (``True``) or forbid (``False``) the separable depthwise
            passes; ``None`` applies :func:`cp_conv_separable`.

    Returns:
        The convolution, ``(N, C_out, *out_spatial)`` (or unbatched).

    Raises:
        ValueError: Wrong input rank or channel count, bad stride/padding/dilation
            arity or values, unknown ``padding_mode``.
        TypeError: A bias whose dtype differs from the factors'.

    Examples:
        >>> x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
        >>> out, inp = torch.randn(6, 3, dtype=x.dtype), torch.randn(4, 3, dtype=x.dtype)
        >>> h, w = torch.randn(3, 3, dtype=x.dtype), torch.randn(3, 3, dtype=x.dtype)
        >>> weight = torch.einsum("or,ir,hr,wr->oihw", out, inp, h, w)
        >>> y = cp_convnd(x, out, inp, (h, w), stride=2, padding=1)
        >>> torch.allclose(y, F.conv2d(x, weight, stride=2, padding=1))
        True
    """
    spatial_factors = tuple(spatial_factors)
    chosen = separable
    kernel_size, stride, dilation, pads, separable = _conv_options(
        input,
        in_channel_factor,
        spatial_factors,
        stride,
        padding,
        dilation,
        padding_mode,
        separable,
    )
    if chosen is None and len(spatial_factors) > 1 and measuring():
        arguments = (input, out_channel_factor, in_channel_factor, spatial_factors, bias)
        options = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
        candidates = {
            "separable": functools.partial(cp_convnd, *arguments, **options, separable=True),
            "merged": functools.partial(cp_convnd, *arguments, **options, separable=False),
        }
        # Per channel and pixel: k_1 + ... + k_n multiply-adds against k_1 * ... * k_n.
        modelled = {"separable": sum(kernel_size), "merged": math.prod(kernel_size)}
        key = (tuple(input.shape[1:]), tuple(f.shape for f in spatial_factors), stride, dilation)
        batch = input.shape[0] if input.dim() == len(spatial_factors) + 2 else 1
        default = "separable" if separable else "merged"
        separable = (
            choose_schedule("cp_conv", key, default, candidates, modelled, input, batch)
            == "separable"
        )
    unbatched = input.dim() == len(spatial_factors) + 1
    if unbatched:
        input = input.unsqueeze(0)
    channels_last = _is_channels_last(input)
    _check_bias_dtype(bias, out_channel_factor.dtype)
    depthwise_bias = None
    if (
        bias is not None
        and not shape_free_schedule()
        and _bias_channel_pays(input, out_channel_factor, pads, kernel_size, stride, dilation)
    ):
        in_channel_factor, spatial_factors, out_channel_factor, depthwise_bias = _with_bias_channel(
            in_channel_factor, spatial_factors, out_channel_factor, bias
        )
        bias = None
    # 1. in -> rank, written as (N, *spatial, rank).
    hidden = _contract_input_channels(input, in_channel_factor, channels_last)
    # 2. Depthwise filtering with groups=rank.
    hidden, conv_padding = pad_for_conv(hidden, pads, padding_mode)
    hidden = _depthwise(
        hidden, spatial_factors, depthwise_bias, stride, conv_padding, dilation, separable
    )
    # 3. rank -> out, in the memory format nn.Conv2d would return.
    output = _contract_output_channels(hidden, out_channel_factor, bias, channels_last)
    return output.squeeze(0) if unbatched else output


def _conv_options(
    input, in_channel_factor, spatial_factors, stride, padding, dilation, padding_mode, separable
):
    """Validate the arguments; ``(kernel_size, stride, dilation, pads, separable)`` resolved."""
    n = len(spatial_factors)
    if n not in DEPTHWISE_CONV:
        raise ValueError(f"expected 1 to 3 spatial factors, got {n}")
    in_channels = in_channel_factor.shape[0]
    if input.dim() not in (n + 1, n + 2) or input.shape[-n - 1] != in_channels:
        raise ValueError(
            f"expected input of shape (N, {in_channels}, *spatial) or ({in_channels}, *spatial) "
            f"with {n} spatial dimension(s), got {tuple(input.shape)}"
        )
    check_padding_mode(padding_mode)
    kernel_size = tuple(f.shape[0] for f in spatial_factors)
    stride = conv_tuple(stride, n, "stride")
    dilation = conv_tuple(dilation, n, "dilation")
    pads = conv_padding_pairs(padding, kernel_size, dilation, stride)
    if separable is None:
        separable = cp_conv_separable(kernel_size)
    return kernel_size, stride, dilation, pads, separable


def _is_channels_last(input: torch.Tensor) -> bool:
    """Whether a batched input is laid out channels-last (and not plainly contiguous)."""
    return not input.is_contiguous() and input.movedim(1, -1).is_contiguous()


def _check_bias_dtype(bias: torch.Tensor | None, dtype: torch.dtype) -> None:
    """``TypeError`` if ``bias`` is given with a dtype other than the factors'."""
    if bias is not None and bias.dtype != dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from the factors' dtype {dtype}")


def _bias_channel_pays(input, out_channel_factor, pads, kernel_size, stride, dilation) -> bool:
    """Whether the output has :data:`_BIAS_CHANNEL_MIN_OUTPUT` elements or more."""
    batch, spatial = input.shape[0], tuple(input.shape[2:])
    pixels = conv_output_pixels(spatial, pads, kernel_size, stride, dilation)
    return batch * out_channel_factor.shape[0] * pixels >= _BIAS_CHANNEL_MIN_OUTPUT


def _with_bias_channel(in_channel_factor, spatial_factors, out_channel_factor, bias):
    """The factors with the bias as one more rank channel, and the depthwise bias.

    The channel is zero after step 1 (zero column), 1 after step 2 (zero kernel,
    depthwise bias 1), weighted by the bias in step 3's GEMM. No pass over the
    whole output adds it afterwards.
    """
    (in_channels, rank), out_channels = in_channel_factor.shape, out_channel_factor.shape[0]
    depthwise_bias = torch.cat([in_channel_factor.new_zeros(rank), in_channel_factor.new_ones(1)])
    in_channel_factor = torch.cat(
        [in_channel_factor, in_channel_factor.new_zeros(in_channels, 1)], 1
    )
    spatial_factors = tuple(torch.cat([f, f.new_zeros(f.shape[0], 1)], 1) for f in spatial_factors)
    out_channel_factor = torch.cat([out_channel_factor, bias.reshape(out_channels, 1)], 1)
    return in_channel_factor, spatial_factors, out_channel_factor, depthwise_bias


def _contract_input_channels(input, in_channel_factor, channels_last: bool) -> torch.Tensor:
    """Step 1, ``in -> rank``: ``(N, rank, *spatial)`` viewing a channels-last tensor."""
    if channels_last:
        hidden = torch.matmul(input.movedim(1, -1), in_channel_factor)
    else:
        batch, spatial = input.shape[0], tuple(input.shape[2:])
        in_channels, rank = in_channel_factor.shape
        columns = input.flatten(2).transpose(1, 2)
        if (
            not shape_free_schedule()
            and math.prod(spatial) * in_channels * rank >= _BATCHED_GEMM_MIN_MACS
        ):
            # bmm reads the transposed (N, pixels, C_in) view in place; matmul would
            # first copy it to fold the batch into the rows.
            hidden = torch.bmm(columns, in_channel_factor.expand(batch, in_channels, rank))
        else:
            hidden = torch.matmul(columns, in_channel_factor)
        hidden = hidden.view((batch,) + spatial + (rank,))
    return hidden.movedim(-1, 1)


def _depthwise(hidden, spatial_factors, depthwise_bias, stride, padding, dilation, separable):
    """Step 2: depthwise filtering with ``groups=rank``, merged or one pass per dimension."""
    n, rank = len(spatial_factors), hidden.shape[1]
    conv = DEPTHWISE_CONV[n]
    if not separable:
        kernel = cp_merged_kernel(spatial_factors)
        return conv(hidden, kernel, depthwise_bias, stride, padding, dilation, rank)
    for d, factor in enumerate(spatial_factors):
        shape = [1] * n
        shape[d] = factor.shape[0]
        step, dil, pad = [1] * n, [1] * n, [0] * n
        step[d], dil[d], pad[d] = stride[d], dilation[d], padding[d]
        kernel = factor.T.reshape([rank, 1] + shape)
        last = d == n - 1
        hidden = conv(hidden, kernel, depthwise_bias if last else None, tuple(step),
                      tuple(pad), tuple(dil), rank)  # fmt: skip
    return hidden


def _contract_output_channels(hidden, out_channel_factor, bias, channels_last: bool):
    """Step 3, ``rank -> out`` (and the bias), in the memory format of the input."""
    batch, out_spatial = hidden.shape[0], tuple(hidden.shape[2:])
    out_channels, rank = out_channel_factor.shape
    rows = hidden.movedim(1, -1)
    if channels_last:
        return F.linear(rows, out_channel_factor, bias).movedim(-1, 1)
    columns = rows.reshape(batch, -1, rank).transpose(1, 2)
    factor = out_channel_factor.expand(batch, out_channels, rank)
    if bias is None:
        output = torch.bmm(factor, columns)
    else:
        # A small output: the bias channel costs more kernel calls than baddbmm's
        # copy of the broadcast bias into the output.
        output = torch.baddbmm(bias.view(1, out_channels, 1), factor, columns)
    return output.view((batch, out_channels) + out_spatial)


def cp_conv2d(
    input: torch.Tensor,
    out_channel_factor: torch.Tensor,
    in_channel_factor: torch.Tensor,
    height_factor: torch.Tensor,
    width_factor: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    separable: bool | None = None,
) -> torch.Tensor:
    """2-D convolution with a CP kernel: :func:`cp_convnd` with two spatial factors.

    Equals ``F.conv2d(input, weight, bias, stride, padding, dilation)`` (after
    ``F.pad`` in ``padding_mode`` when it is not ``'zeros'``) with
    ``weight = einsum("or,ir,hr,wr->oihw", out_channel_factor, in_channel_factor,
    height_factor, width_factor)``.

    Args:
        input: ``(N, C_in, H, W)`` or ``(C_in, H, W)``.
        out_channel_factor: ``(C_out, rank)``.
        in_channel_factor: ``(C_in, rank)``.
        height_factor: ``(kH, rank)``.
        width_factor: ``(kW, rank)``.
        bias: ``(C_out,)`` or ``None``.
        stride: As ``F.conv2d``.
        padding: As ``F.conv2d`` (``int``, pair, ``'same'``, ``'valid'``).
        dilation: As ``F.conv2d``.
        padding_mode: As ``nn.Conv2d``.
        separable: See :func:`cp_convnd`.

    Returns:
        ``(N, C_out, H_out, W_out)`` (or unbatched).

    Examples:
        >>> x = torch.randn(1, 4, 8, 8)
        >>> factors = [torch.randn(n, 2) for n in (5, 4, 2, 3)]
        >>> cp_conv2d(x, *factors, padding="same").shape
        torch.Size([1, 5, 8, 8])
    """
    return cp_convnd(
        input,
        out_channel_factor,
        in_channel_factor,
        (height_factor, width_factor),
        bias,
        stride,
        padding,
        dilation,
        padding_mode,
        separable,
    )
