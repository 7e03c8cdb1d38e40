"""Convolution argument handling shared by every convolution family.

Normalises ``stride`` / ``padding`` / ``dilation`` as ``nn.ConvNd`` accepts them,
resolves ``'same'`` / ``'valid'`` into per-dimension ``(before, after)`` pairs,
computes output sizes, and applies the padding a convolution call cannot carry
(any ``padding_mode`` other than zeros, the asymmetric part of ``'same'``) with
``F.pad``. :data:`DEPTHWISE_CONV` maps a spatial rank to its ``F.convNd``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "DEPTHWISE_CONV",
    "PADDING_MODES",
    "check_padding_mode",
    "conv_output_pixels",
    "conv_output_size",
    "conv_padding_pairs",
    "conv_tuple",
    "pad_for_conv",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DEPTHWISE_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
"""``F.conv1d`` / ``F.conv2d`` / ``F.conv3d`` by number of spatial dimensions."""


def check_padding_mode(padding_mode: str) -> None:
    """``ValueError`` unless ``padding_mode`` is one of :data:`PADDING_MODES`."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


def conv_tuple(value, n: int, name: str, minimum: int = 1) -> tuple:
    """``value`` as an ``n``-tuple of ints ``>= minimum`` (``int`` values are repeated).

    Raises:
        ValueError: Wrong arity, non-integers, or values below ``minimum``.

    Examples:
        >>> conv_tuple(3, 2, "kernel_size")
        (3, 3)
        >>> conv_tuple((1, 2), 2, "stride")
        (1, 2)
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    try:
        items = (value,) * n if isinstance(value, int) else tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}") from None
    if len(items) != n or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} values must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in items)


def conv_padding_pairs(padding, kernel_size, dilation, stride=1) -> tuple:
    """Per-dimension ``(before, after)`` input padding of a convolution, as ``F.conv2d``.

    ``'valid'`` is no padding; ``'same'`` pads ``dilation * (kernel - 1)`` in total,
    ``total // 2`` before and the rest after (the extra element of an even kernel
    goes at the end, exactly as ``F.conv2d(..., padding='same')``); an int or tuple
    pads symmetrically.

    Raises:
        ValueError: Unknown string, wrong arity, negative padding, or ``'same'``
            with a stride other than 1 (as ``nn.Conv2d``).

    Examples:
        >>> conv_padding_pairs("same", (4, 3), (1, 2))
        ((1, 2), (2, 2))
        >>> conv_padding_pairs((1, 0), (3, 3), (1, 1))
        ((1, 1), (0, 0))
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            if any(s != 1 for s in conv_tuple(stride, n, "stride")):
                raise ValueError(
                    "padding='same' is not supported for strided convolutions, "
                    f"got stride={stride!r}"
                )
            totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
    return tuple((p, p) for p in conv_tuple(padding, n, "padding", minimum=0))


def conv_output_size(spatial, pads, kernel_size, stride, dilation) -> tuple:
    """Output size per spatial dimension of a convolution with these (resolved) options.

    Examples:
        >>> conv_output_size((9, 9), ((1, 1), (1, 1)), (3, 3), (2, 2), (1, 1))
        (5, 5)
    """
    return tuple(
        (size + before + after - d * (k - 1) - 1) // s + 1
        for size, (before, after), k, s, d in zip(spatial, pads, kernel_size, stride, dilation)
    )


def conv_output_pixels(spatial, pads, kernel_size, stride, dilation) -> int:
    """Output positions of a convolution with these (already resolved) options."""
    return math.prod(conv_output_size(spatial, pads, kernel_size, stride, dilation))


def pad_for_conv(input: torch.Tensor, pads, padding_mode: str):
    """Pad what ``F.convNd`` cannot; return the input and the padding left to the convolution.

    A ``padding_mode`` other than ``'zeros'`` or an asymmetric pair (``'same'`` with an
    even kernel) is applied here with ``F.pad``, as ``nn.Conv2d`` pads its input, and
    the convolution then gets no padding; otherwise the input is returned unchanged
    with the symmetric per-dimension padding for the convolution call.
    """
    if padding_mode != "zeros" or any(before != after for before, after in pads):
        flat = [p for pair in reversed(pads) for p in pair]
        mode = "constant" if padding_mode == "zeros" else padding_mode
        return F.pad(input, flat, mode=mode), (0,) * len(pads)
    return input, tuple(before for before, _ in pads)
