"""Tucker-2 N-d convolution kernel: ``in -> r_in`` channel contraction, a dense ``r_in -> r_out``
convolution with the core, ``r_out -> out`` channel contraction, never building the dense kernel.

The two channel contractions are the GEMMs of the CP kernel
(:mod:`factorized_layers.functional.cp`: channels-last intermediates, the output in the
memory format ``nn.Conv2d`` returns); the convolution options (stride, padding,
dilation, ``padding_mode``) are handled by :mod:`factorized_layers.functional._conv`.
"""

from __future__ import annotations

import torch

from ._conv import DEPTHWISE_CONV, check_padding_mode, conv_padding_pairs, conv_tuple, pad_for_conv
from .cp import _check_bias_dtype, _contract_output_channels, _is_channels_last

__all__ = ["tucker_conv_weight", "tucker_convnd", "tucker_conv2d"]


def tucker_conv_weight(
    core: torch.Tensor,
    out_channel_factor: torch.Tensor | None,
    in_channel_factor: torch.Tensor | None,
) -> torch.Tensor:
    """The ``(C_out, C_in, *kernel_size)`` kernel of a Tucker-2 convolution (differentiable).

    ``weight[o, i, ...] = sum_{a, b} out[o, a] * in[i, b] * core[a, b, ...]``; a factor
    that is ``None`` is the identity (a folded full-rank mode). The result is contiguous.

    Examples:
        >>> core, out, inp = torch.randn(2, 3, 3, 3), torch.randn(5, 2), torch.randn(4, 3)
        >>> tucker_conv_weight(core, out, inp).shape
        torch.Size([5, 4, 3, 3])
        >>> torch.equal(tucker_conv_weight(core, None, None), core)
        True
    """
    weight = core
    if in_channel_factor is not None:
        weight = torch.matmul(weight.movedim(1, -1), in_channel_factor.mT).movedim(-1, 1)
    if out_channel_factor is not None:
        weight = torch.matmul(weight.movedim(0, -1), out_channel_factor.mT).movedim(-1, 0)
    # Contiguous: a kernel with channels-last strides would make F.conv2d (and the dense
    # layer of to_dense) return channels-last outputs for NCHW inputs.
    return weight.contiguous()


def _contract_input_channels(
    input: torch.Tensor, in_channel_factor: torch.Tensor, channels_last: bool
) -> torch.Tensor:
    """Step 1, ``in -> r_in``: ``(N, r_in, *spatial)`` laid out channels-last.

    A channels-last input is one GEMM on its ``(N, *spatial, C_in)`` view. An NCHW
    input is multiplied as it lies (``factor^T @ x[n]``, a batched GEMM with the long
    pixel dimension as columns) and the small ``r_in``-channel result is then copied
    channels-last: measured on one CPU thread (fastest of 15, heap pinned) this took
    0.5-0.9x the time of a GEMM reading the NCHW input transposed into channels-last
    rows (the CP kernel's step 1), e.g. 1.3 ms instead of 2.7 ms at 64 -> 13 channels,
    32x32, batch 32: a GEMM with only ``r_in`` output columns is slow.
    """
    if channels_last:
        return torch.matmul(input.movedim(1, -1), in_channel_factor).movedim(-1, 1)
    batch, spatial = input.shape[0], tuple(input.shape[2:])
    in_channels, rank = in_channel_factor.shape
    # bmm, not matmul: matmul folds the batch into one GEMM by copying the input
    # transposed when the factor requires grad (measured 1.5x slower layer).
    factor = in_channel_factor.mT.expand(batch, rank, in_channels)
    hidden = torch.bmm(factor, input.flatten(2)).view((batch, rank) + spatial)
    return hidden.movedim(1, -1).contiguous().movedim(-1, 1)


def _check_input(input, core, in_channel_factor) -> int:
    """``ValueError`` unless ``input`` is ``(N, C_in, *spatial)`` or ``(C_in, *spatial)``."""
    n = core.dim() - 2
    if n not in DEPTHWISE_CONV:
        raise ValueError(
            f"core must be (r_out, r_in, *kernel_size) with 1 to 3 spatial dimensions, "
            f"got shape {tuple(core.shape)}"
        )
    in_channels = core.shape[1] if in_channel_factor is None else in_channel_factor.shape[0]
    if input.dim() not in (n + 1, n + 2) or input.shape[-n - 1] != in_channels:
        raise ValueError(
            f"expected input of shape (N, {in_channels}, *spatial) or ({in_channels}, *spatial) "
            f"with {n} spatial dimension(s), got {tuple(input.shape)}"
        )
    return n


def tucker_convnd(
    input: torch.Tensor,
    core: torch.Tensor,
    out_channel_factor: torch.Tensor | None,
    in_channel_factor: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """N-d convolution with a Tucker-2 kernel (Kim et al. 2016), never building the kernel.

    ``weight = core x_0 out_channel_factor x_1 in_channel_factor``
    (:func:`tucker_conv_weight`). Three steps:

    1. ``in -> r_in``: one GEMM over the channels whose result is laid out
       channels-last (for an NCHW input a batched GEMM on the input as it lies, then a
       copy of the small ``r_in``-channel result);
    2. the dense ``r_in -> r_out`` convolution with the core, carrying stride,
       dilation and padding exactly as ``F.conv2d`` (a ``padding_mode`` other than
       zeros, or the asymmetric part of ``'same'``, is applied with ``F.pad`` to the
       ``r_in``-channel tensor: it commutes with the per-pixel channel contraction
       and is cheaper there);
    3. ``r_out -> out`` and the bias: one GEMM (``baddbmm`` / ``F.linear``) written
       straight into the memory format ``nn.Conv2d`` returns for the input
       (NCHW-contiguous or channels-last). Carrying the bias as one more ``r_out`` channel
       of the core convolution instead, as the CP kernel does for large outputs, was
       slower here at every size measured (single-thread CPU time, 1.05-1.8x).

    A folded mode (factor ``None``, rank = channels) skips its GEMM; without an output
    factor the core convolution adds the bias.

    Measured (single-thread CPU time, fastest of 15 runs, glibc's heap pinned with
    ``MALLOC_MMAP_THRESHOLD_`` so that page faults on fresh temporaries do not count) at
    64 -> 128 channels, 3x3, 32x32, ranks (49, 24) (4x fewer multiply-adds), batch 8
    and 32, NCHW and channels-last input: 1.9-2.1x faster than ``nn.Conv2d`` and
    1.15-1.37x faster than TensorLy-Torch's Tucker convolution (the same three
    operations with an NCHW core convolution and 1x1 ``conv1d`` calls); with the default
    allocator 1.4-2.0x. The core convolution ran 1.2-1.6x faster channels-last than
    NCHW; 1x1 ``F.conv2d`` calls instead of the GEMMs were as fast or slower.

    Args:
        input: ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``.
        core: ``(r_out, r_in, *kernel_size)``, 1 to 3 spatial dimensions.
        out_channel_factor: ``(C_out, r_out)`` or ``None`` (``C_out = r_out``).
        in_channel_factor: ``(C_in, r_in)`` or ``None`` (``C_in = r_in``).
        bias: ``(C_out,)`` or ``None``.
        stride: ``int`` or tuple of ``n`` ints.
        padding: ``int``, tuple of ``n`` ints, ``'same'`` or ``'valid'``.
        dilation: ``int`` or tuple of ``n`` ints.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Returns:
        ``(N, C_out, *out_spatial)`` (or unbatched), in the memory format of
        ``F.conv2d``'s result for this input.

    Raises:
        ValueError: Wrong input rank or channel count, bad stride/padding/dilation,
            unknown ``padding_mode``.
        TypeError: A bias whose dtype differs from the core's.

    Examples:
        >>> x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
        >>> core = torch.randn(3, 2, 3, 3, dtype=x.dtype)
        >>> out, inp = torch.randn(5, 3, dtype=x.dtype), torch.randn(6, 2, dtype=x.dtype)
        >>> y = tucker_convnd(x, core, out, inp, stride=2, padding=1)
        >>> weight = tucker_conv_weight(core, out, inp)
        >>> torch.allclose(y, torch.nn.functional.conv2d(x, weight, stride=2, padding=1))
        True
    """
    n = _check_input(input, core, in_channel_factor)
    check_padding_mode(padding_mode)
    kernel_size = tuple(core.shape[2:])
    stride = conv_tuple(stride, n, "stride")
    dilation = conv_tuple(dilation, n, "dilation")
    pads = conv_padding_pairs(padding, kernel_size, dilation, stride)
    _check_bias_dtype(bias, core.dtype)
    unbatched = input.dim() == n + 1
    if unbatched:
        input = input.unsqueeze(0)
    channels_last = _is_channels_last(input)
    core_bias = None
    if bias is not None and out_channel_factor is None:
        core_bias, bias = bias, None
    # 1. in -> r_in, channels-last.
    hidden = input
    if in_channel_factor is not None:
        hidden = _contract_input_channels(input, in_channel_factor, channels_last)
    # 2. The core convolution (with the bias when no output factor follows).
    hidden, conv_padding = pad_for_conv(hidden, pads, padding_mode)
    hidden = DEPTHWISE_CONV[n](hidden, core, core_bias, stride, conv_padding, dilation)
    # 3. r_out -> out, in the memory format nn.Conv2d returns for this input.
    if out_channel_factor is not None:
        output = _contract_output_channels(hidden, out_channel_factor, bias, channels_last)
    else:
        output = hidden if channels_last else hidden.contiguous()
    return output.squeeze(0) if unbatched else output


def tucker_conv2d(
    input: torch.Tensor,
    core: torch.Tensor,
    out_channel_factor: torch.Tensor | None,
    in_channel_factor: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """2-D convolution with a Tucker-2 kernel: :func:`tucker_convnd` with a 4-D core.

    Equals ``F.conv2d(input, tucker_conv_weight(core, out, in), bias, stride, padding,
    dilation)`` (after ``F.pad`` in ``padding_mode`` when it is not ``'zeros'``).

    Examples:
        >>> x = torch.randn(1, 4, 8, 8)
        >>> core, out, inp = torch.randn(3, 2, 3, 3), torch.randn(5, 3), torch.randn(4, 2)
        >>> tucker_conv2d(x, core, out, inp, padding="same").shape
        torch.Size([1, 5, 8, 8])
    """
    if core.dim() != 4:
        raise ValueError(f"core must be (r_out, r_in, kH, kW), got shape {tuple(core.shape)}")
    return tucker_convnd(
        input, core, out_channel_factor, in_channel_factor, bias, stride, padding, dilation,
        padding_mode,
    )  # fmt: skip
