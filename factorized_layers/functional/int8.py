"""Symmetric int8 kernels: row-wise quantization and the dynamic int8 linear map.

A factor is stored as ``int8`` values with one float32 scale per slice along its first
dimension (per output channel of a linear map), ``factor ~ values * scale``, the
values in ``[-127, 127]`` (symmetric, so zero is exact and no zero point is needed).
:func:`int8_linear` quantizes its input per row at run time ("dynamic" activation
quantization) and multiplies int8 by int8 with int32 accumulation
(``torch._int_mm``), then rescales: the CPU int8 GEMM path of PyTorch itself, which
``torch.export`` traces as one ``aten._int_mm`` node.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..decompose._common import all_finite
from .svd import check_linear_input

__all__ = ["INT8_MAX", "dequantize_rows", "int8_linear", "quantize_rows"]

INT8_MAX = 127
"""Largest magnitude of a symmetric int8 value (-128 is never used)."""

_TINY = torch.finfo(torch.float32).tiny


def quantize_rows(tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values, scale)`` with ``values * scale ~ tensor``, one scale per slice of dim 0.

    The scale of a slice is its largest magnitude over 127 (computed in float32);
    an all-zero slice gets the smallest normal float32 as its scale, so it
    dequantizes to exact zeros.

    Args:
        tensor: A floating tensor with two or more dimensions.

    Returns:
        ``values`` (``int8``, same shape) and ``scale`` (``float32``, shape
        ``(tensor.shape[0], 1, ..., 1)``).

    Raises:
        TypeError: If ``tensor`` is not floating point.
        ValueError: If it has fewer than two dimensions or holds NaN or Inf.

    Examples:
        >>> w = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
        >>> values, scale = quantize_rows(w)
        >>> values
        tensor([[  64, -127],
                [   0,    0]], dtype=torch.int8)
        >>> torch.allclose(dequantize_rows(values, scale), w, atol=1.0 / 254)
        True
    """
    if not tensor.is_floating_point():
        raise TypeError(f"quantize_rows expects a floating tensor, got {tensor.dtype}")
    if tensor.dim() < 2:
        raise ValueError(
            f"quantize_rows expects a tensor with 2 or more dimensions, got shape "
            f"{tuple(tensor.shape)}"
        )
    data = tensor.detach().float()
    if not all_finite(data):
        raise ValueError("cannot quantize a tensor that holds NaN or Inf")
    peak = data.abs().amax(dim=tuple(range(1, data.dim())), keepdim=True)
    scale = (peak / INT8_MAX).clamp_min(_TINY)
    values = torch.round(data / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scale


def dequantize_rows(
    values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``values * scale`` in ``dtype`` (the product is formed in float32)."""
    return (values.float() * scale).to(dtype)


def int8_linear(
    input: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(input, values * scale, bias)`` with int8 activations and weights.

    Each input row is quantized symmetrically with its own scale (largest magnitude
    over 127), multiplied by the int8 weight with int32 accumulation, and rescaled
    by both scales in float32; the result has the input's dtype. Inference only
    (``torch._int_mm`` has no gradient).

    Args:
        input: ``(*, in_features)``, floating point, finite.
        values: ``(out_features, in_features)`` ``int8``.
        scale: ``(out_features, 1)`` ``float32``.
        bias: ``(out_features,)`` or ``None``.

    Returns:
        ``(*, out_features)`` in ``input.dtype``.

    Raises:
        ValueError: If the last input dimension is not ``in_features``.

    Examples:
        >>> w, x = torch.randn(6, 16), torch.randn(3, 16)
        >>> values, scale = quantize_rows(w)
        >>> y = int8_linear(x, values, scale)
        >>> bool((y - x @ w.T).abs().max() < 0.1)
        True
    """
    out_features, in_features = values.shape
    check_linear_input(input, in_features)
    rows = input.reshape(-1, in_features).float()
    row_scale = (rows.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(_TINY)
    quantized = torch.round(rows / row_scale).to(torch.int8)
    if values.device.type == "cuda" and (
        rows.shape[0] <= 16 or in_features % 8 or out_features % 8
    ):
        # cuBLAS int8 GEMMs need more than 16 rows and sizes divisible by 8.
        accumulated = quantized.float() @ values.T.float()
    else:
        # (out, 1).T has strides (1, 1), which the CPU kernel misreads: view it row-major.
        weight = values.reshape(1, out_features) if in_features == 1 else values.T
        accumulated = torch._int_mm(quantized, weight).float()
    output = accumulated * row_scale * scale.reshape(1, out_features)
    if bias is not None:
        output = output + bias.float()
    return output.to(input.dtype).reshape(*input.shape[:-1], out_features)
