"""Low-rank 2-D convolution kernel: two convolutions, never the dense kernel.

A rank-``r`` convolution kernel ``W (C_out, C_in, kH, kW)`` is applied as

* **channel low rank**: a ``kH x kW`` convolution ``C_in -> r`` (``input_factor``,
  ``(r, C_in, kH, kW)``) and a ``1 x 1`` convolution ``r -> C_out``
  (``output_factor``, ``(C_out, r, 1, 1)``), or
* **spatial low rank** (Jaderberg et al. 2014; AIMET's spatial SVD): a ``kH x 1``
  convolution ``C_in -> r`` (``(r, C_in, kH, 1)``) and a ``1 x kW`` convolution
  ``r -> C_out`` (``(C_out, r, 1, kW)``).

:func:`svd_conv2d_plan` splits ``nn.Conv2d``'s options between the two steps so that
the result is exactly the dense convolution's: with a ``1 x kW`` second step the
height options (stride, dilation, padding) go to the first step and the width
options to the second, otherwise everything goes to the first. A height-only
convolution treats every column alike, so padding the width of its output in any
``padding_mode`` equals padding the width of its input; ``'same'`` with an even
kernel pads the extra element at the end, as ``F.conv2d``.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from ._conv import check_padding_mode, conv_padding_pairs, conv_tuple

__all__ = [
    "SVDConvPlan",
    "check_conv2d_input",
    "run_svd_conv2d_plan",
    "svd_conv2d",
    "svd_conv2d_plan",
]

_Pairs = Tuple[Tuple[int, int], Tuple[int, int]]


class SVDConvPlan(NamedTuple):
    """The two convolutions of :func:`svd_conv2d` with their resolved options.

    ``*_pad`` is the ``F.pad`` list applied before that step (``None``: nothing to pad
    outside the convolution), ``*_padding`` the symmetric padding the convolution
    call itself carries, ``pad_mode`` the ``F.pad`` mode (``'constant'`` for zeros).
    """

    first_pad: Tuple[int, int, int, int] | None
    first_padding: Tuple[int, int]
    first_stride: Tuple[int, int]
    first_dilation: Tuple[int, int]
    second_pad: Tuple[int, int, int, int] | None
    second_padding: Tuple[int, int]
    second_stride: Tuple[int, int]
    second_dilation: Tuple[int, int]
    pad_mode: str


def _step_padding(pairs: _Pairs, padding_mode: str):
    """``(F.pad list or None, convolution padding)`` of one step's ``(before, after)`` pairs."""
    if all(before == 0 and after == 0 for before, after in pairs):
        return None, (0, 0)
    if padding_mode == "zeros" and all(before == after for before, after in pairs):
        return None, tuple(before for before, _ in pairs)
    (top, bottom), (left, right) = pairs
    return (left, right, top, bottom), (0, 0)


def svd_conv2d_plan(
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    width_on_second: bool = False,
) -> SVDConvPlan:
    """Split a dense convolution's options between the two steps of :func:`svd_conv2d`.

    Args:
        kernel_size: ``(kH, kW)`` of the dense kernel.
        stride: As ``nn.Conv2d``.
        padding: As ``nn.Conv2d`` (``int``, pair, ``'same'``, ``'valid'``).
        dilation: As ``nn.Conv2d``.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        width_on_second: The second step is a ``1 x kW`` convolution (spatial low
            rank with ``kW > 1``): it gets the width options. Otherwise the first step
            gets every option and the second is a plain ``1 x 1`` convolution.

    Raises:
        ValueError: Bad option values (as ``nn.Conv2d``), ``'same'`` with a stride.

    Examples:
        >>> plan = svd_conv2d_plan((3, 3), stride=(2, 1), padding=1, width_on_second=True)
        >>> plan.first_stride, plan.first_padding, plan.second_stride, plan.second_padding
        ((2, 1), (1, 0), (1, 1), (0, 1))
    """
    kernel_size = conv_tuple(kernel_size, 2, "kernel_size")
    stride = conv_tuple(stride, 2, "stride")
    dilation = conv_tuple(dilation, 2, "dilation")
    check_padding_mode(padding_mode)
    height, width = conv_padding_pairs(padding, kernel_size, dilation, stride)
    none = (0, 0)
    if width_on_second:
        first_pairs, second_pairs = (height, none), (none, width)
        first_stride, second_stride = (stride[0], 1), (1, stride[1])
        first_dilation, second_dilation = (dilation[0], 1), (1, dilation[1])
    else:
        first_pairs, second_pairs = (height, width), (none, none)
        first_stride, second_stride = stride, (1, 1)
        first_dilation, second_dilation = dilation, (1, 1)
    first_pad, first_padding = _step_padding(first_pairs, padding_mode)
    second_pad, second_padding = _step_padding(second_pairs, padding_mode)
    return SVDConvPlan(
        first_pad,
        first_padding,
        first_stride,
        first_dilation,
        second_pad,
        second_padding,
        second_stride,
        second_dilation,
        "constant" if padding_mode == "zeros" else padding_mode,
    )


def check_conv2d_input(input: torch.Tensor, in_channels: int) -> None:
    """``ValueError`` unless ``input`` is ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``.

    The message matches the other convolution families' (e.g. ``CPConv2d``).
    """
    if input.dim() not in (3, 4) or input.shape[-3] != in_channels:
        raise ValueError(
            f"expected input of shape (N, {in_channels}, *spatial) or ({in_channels}, *spatial) "
            f"with 2 spatial dimension(s), got {tuple(input.shape)}"
        )


def run_svd_conv2d_plan(
    input: torch.Tensor,
    input_factor: torch.Tensor,
    output_factor: torch.Tensor,
    bias: torch.Tensor | None,
    plan: SVDConvPlan,
) -> torch.Tensor:
    """The two convolutions of ``plan`` (no argument checks: :func:`svd_conv2d` does them)."""
    if plan.first_pad is not None:
        input = F.pad(input, plan.first_pad, mode=plan.pad_mode)
    hidden = F.conv2d(
        input, input_factor, None, plan.first_stride, plan.first_padding, plan.first_dilation
    )
    if plan.second_pad is not None:
        hidden = F.pad(hidden, plan.second_pad, mode=plan.pad_mode)
    return F.conv2d(
        hidden, output_factor, bias, plan.second_stride, plan.second_padding, plan.second_dilation
    )


def svd_conv2d(
    input: torch.Tensor,
    input_factor: torch.Tensor,
    output_factor: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """2-D convolution with a low-rank kernel, as two convolutions.

    Equals ``nn.Conv2d``'s output (``F.conv2d`` after ``F.pad`` in ``padding_mode``
    when it is not ``'zeros'``) with the kernel
    ``W[o, i, h, w] = sum_r output_factor[o, r, 0, w'] * input_factor[r, i, h, w'']``
    where the kernel width ``kW`` belongs to exactly one factor:

    * channel low rank: ``input_factor (r, C_in, kH, kW)``, ``output_factor (C_out, r, 1, 1)``;
    * spatial low rank: ``input_factor (r, C_in, kH, 1)``, ``output_factor (C_out, r, 1, kW)``.

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``.
        input_factor: ``(r, C_in, kH, kW1)``, the first convolution's kernel.
        output_factor: ``(C_out, r, 1, kW2)`` with ``kW1 == 1`` or ``kW2 == 1``.
        bias: ``(C_out,)`` or ``None``.
        stride: As ``F.conv2d``.
        padding: As ``F.conv2d`` (``int``, pair, ``'same'``, ``'valid'``).
        dilation: As ``F.conv2d``.
        padding_mode: As ``nn.Conv2d``.

    Returns:
        ``(N, C_out, H_out, W_out)`` (or unbatched), ``nn.Conv2d``'s output size.

    Raises:
        ValueError: Wrong input or factor shapes, bad convolution options.
        TypeError: A bias whose dtype differs from the factors'.

    Examples:
        >>> x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
        >>> a, b = torch.randn(3, 4, 3, 1, dtype=x.dtype), torch.randn(5, 3, 1, 3, dtype=x.dtype)
        >>> weight = torch.einsum("rih,orw->oihw", a[..., 0], b[:, :, 0])
        >>> y = svd_conv2d(x, a, b, stride=2, padding=1, padding_mode="reflect")
        >>> torch.allclose(y, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, stride=2))
        True
    """
    if input_factor.dim() != 4 or output_factor.dim() != 4:
        raise ValueError(
            "input_factor must be (rank, C_in, kH, kW1) and output_factor (C_out, rank, 1, kW2), "
            f"got shapes {tuple(input_factor.shape)} and {tuple(output_factor.shape)}"
        )
    rank, in_channels, kh, kw1 = input_factor.shape
    if (
        output_factor.shape[1] != rank
        or output_factor.shape[2] != 1
        or min(kw1, output_factor.shape[3]) != 1
    ):
        raise ValueError(
            f"output_factor must be (C_out, {rank}, 1, kW2) with kW2 == 1 unless "
            f"input_factor's width {kw1} is 1, got {tuple(output_factor.shape)}"
        )
    if bias is not None and bias.dtype != output_factor.dtype:
        raise TypeError(
            f"bias dtype {bias.dtype} differs from the factors' dtype {output_factor.dtype}"
        )
    check_conv2d_input(input, in_channels)
    kw2 = output_factor.shape[3]
    plan = svd_conv2d_plan(
        (kh, kw1 * kw2), stride, padding, dilation, padding_mode, width_on_second=kw2 > 1
    )
    return run_svd_conv2d_plan(input, input_factor, output_factor, bias, plan)
