"""The module database: one :class:`ModuleInfo` per registered factorized layer class.

In the style of PyTorch's ``common_modules.py``: each entry names the class, its cases
(how to build the dense source, the rank, the input shape), an independent
``reference_fn`` (the dense functional op on ``dense_weight()``) and the inputs the
forward pass must refuse. Generic tests in ``test_modules.py`` run over every case x
dtype x device, and a conformance test checks that every registered class has an
entry. A new family adds its entry here and gets the generic tests for free.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import (
    CPConv1d,
    CPConv2d,
    CPConv3d,
    SVDConv2d,
    SVDEmbedding,
    SVDLinear,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)


@dataclasses.dataclass(frozen=True)
class ModuleCase:
    """One configuration of a layer class."""

    name: str
    make_dense: Callable[..., nn.Module]
    """``make_dense(device=..., dtype=...)``: the trained dense source."""
    rank: object
    input_shape: Tuple[int, ...]
    reduction_terms: int
    """Length of the longest sum behind one output value (for tolerances)."""
    full_rank: object = None
    """A rank spec at which ``from_dense`` must reproduce the dense layer exactly
    (``None``: the family has no exact rank for this case, e.g. CP-ALS)."""
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Options of ``from_dense`` (e.g. a seed)."""
    true_gradient: bool = True
    """``False`` where the layer's semantics alter gradients on purpose (``padding_idx``
    and ``scale_grad_by_freq`` of a lookup): no gradcheck then."""


@dataclasses.dataclass(frozen=True)
class ErrorInput:
    """A forward input of the wrong shape (or dtype) and the error it must raise."""

    input_shape: Tuple[int, ...]
    match: str
    dtype: torch.dtype = torch.float32
    error: type = ValueError


def float_input(shape: Tuple[int, ...], device: str, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal activations (the input of a linear or convolution layer)."""
    return torch.randn(shape, device=device, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """Everything the generic tests need to know about one layer class."""

    layer_cls: type
    cases: Tuple[ModuleCase, ...]
    reference_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """``reference_fn(layer, x)``: the dense op with ``layer.dense_weight()``."""
    error_inputs: Tuple[ErrorInput, ...]
    """Inputs (for the first case) every forward must refuse."""
    make_input: Callable[[Tuple[int, ...], str, torch.dtype], torch.Tensor] = float_input
    """``make_input(shape, device, dtype)``: a valid forward input (indices for a lookup)."""
    calibration: bool = True
    """Whether the class declares ``capabilities.calibration``."""


@dataclasses.dataclass(frozen=True)
class Case:
    """A (class, case) pair, the unit the generic tests are parametrized over."""

    info: ModuleInfo
    case: ModuleCase

    @property
    def layer_cls(self) -> type:
        return self.info.layer_cls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.case, name)

    def input(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A valid forward input of this case's shape."""
        return self.info.make_input(self.case.input_shape, device, dtype)

    def __str__(self) -> str:
        return self.case.name


def _linear(in_features: int, out_features: int, bias: bool = True) -> Callable[..., nn.Module]:
    def make(**factory_kwargs) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias, **factory_kwargs)

    return make


def _conv(cls: type, *args: Any, **kwargs: Any) -> Callable[..., nn.Module]:
    def make(**factory_kwargs) -> nn.Module:
        return cls(*args, **kwargs, **factory_kwargs)

    return make


def _linear_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dense_weight(), layer.bias)


_CONV_OPS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.convNd`` on the dense kernel, with ``padding_mode`` applied as ``nn.ConvNd`` does."""
    weight, padding = layer.dense_weight(), layer.padding
    if layer.padding_mode != "zeros":
        pads = [p for p in reversed(padding) for _ in range(2)]
        x = F.pad(x, pads, mode=layer.padding_mode)
        padding = 0
    op = _CONV_OPS[weight.dim() - 2]
    return op(x, weight, layer.bias, layer.stride, padding, layer.dilation)


_LINEAR_ERRORS = (
    ErrorInput((3, 23), r"expected input of shape \(\*, 24\), got shape \(3, 23\)"),
    ErrorInput((3, 24), r"expected input of dtype torch\.float32", torch.float64, TypeError),
    ErrorInput((3, 24), r"expected a floating-point input", torch.int64, TypeError),
    ErrorInput((24, 2), r"expected input of shape \(\*, 24\)"),
)


def _conv_errors(in_channels: int, dims: int) -> Tuple[ErrorInput, ...]:
    spatial = (6,) * dims
    return (
        ErrorInput((2, in_channels + 1) + spatial, rf"\(N, {in_channels}, \*spatial\)"),
        ErrorInput((2, 1, in_channels) + spatial, rf"{dims} spatial dimension"),
        ErrorInput((2, in_channels) + spatial, "dtype torch.float32", torch.float64, TypeError),
    )


def _index_input(num_embeddings: int) -> Callable[..., torch.Tensor]:
    def make(shape: Tuple[int, ...], device: str, dtype: torch.dtype) -> torch.Tensor:
        # Every index, then random ones: the padding row and the last row are looked up.
        indices = torch.randint(num_embeddings, shape, device=device)
        if device != "meta":
            flat = indices.view(-1)
            flat[: min(flat.numel(), num_embeddings)] = torch.arange(
                min(flat.numel(), num_embeddings), device=device
            )
        return indices

    return make


def _embedding_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.embedding(x, layer.dense_weight(), layer.padding_idx)


MODULE_DB: Tuple[ModuleInfo, ...] = (
    ModuleInfo(
        SVDLinear,
        (
            ModuleCase("svd_linear", _linear(24, 16), 5, (3, 24), 24, full_rank=16),
            ModuleCase(
                "svd_linear_nobias", _linear(16, 24, bias=False), 0.3, (2, 3, 16), 24, full_rank=16
            ),
            ModuleCase("svd_linear_1d_input", _linear(7, 9), 2, (7,), 9, full_rank=7),
            ModuleCase("svd_linear_wide_rank1", _linear(3, 40), 1, (4, 3), 40, full_rank=3),
        ),
        _linear_reference,
        _LINEAR_ERRORS,
    ),
    ModuleInfo(
        TuckerLinear,
        (
            ModuleCase("tucker_linear", _linear(24, 16), 0.5, (3, 24), 24, full_rank=24),
            ModuleCase(
                "tucker_linear_nobias", _linear(16, 24, bias=False), 2, (2, 3, 16), 24, full_rank=24
            ),
            ModuleCase("tucker_linear_prime_in", _linear(7, 12), 2, (7,), 12, full_rank=12),
        ),
        _linear_reference,
        _LINEAR_ERRORS,
    ),
    ModuleInfo(
        TTLinear,
        (
            ModuleCase("tt_linear", _linear(24, 16), 0.5, (3, 24), 24, full_rank=64),
            ModuleCase(
                "tt_linear_3cores_nobias", _linear(16, 24, bias=False), 3, (2, 3, 16), 48,
                full_rank=64, options={"n_cores": 3},
            ),
            ModuleCase("tt_linear_prime_in", _linear(7, 12), 2, (7,), 12, full_rank=64),
        ),
        _linear_reference,
        _LINEAR_ERRORS,
    ),
    ModuleInfo(
        CPConv1d,
        (
            ModuleCase(
                "cp_conv1d", _conv(nn.Conv1d, 6, 8, 5, padding=2), 4, (2, 6, 12), 30,
                options={"seed": 0},
            ),
            ModuleCase(
                "cp_conv1d_strided_reflect_nobias",
                _conv(nn.Conv1d, 4, 6, 3, stride=2, padding=1, padding_mode="reflect", bias=False),
                0.5, (4, 11), 12, options={"seed": 0},
            ),
        ),
        _conv_reference,
        _conv_errors(6, 1),
    ),
    ModuleInfo(
        CPConv2d,
        (
            ModuleCase(
                "cp_conv2d", _conv(nn.Conv2d, 6, 8, 3, padding=1), 5, (2, 6, 7, 7), 54,
                options={"seed": 0},
            ),
            ModuleCase(
                "cp_conv2d_valid_dilated_nobias",
                _conv(nn.Conv2d, 5, 4, (3, 2), dilation=(1, 2), padding="valid", bias=False),
                0.4, (1, 5, 8, 9), 30, options={"seed": 0},
            ),
            ModuleCase(
                "cp_conv2d_circular_unbatched",
                _conv(nn.Conv2d, 3, 4, 3, stride=(2, 1), padding=1, padding_mode="circular"),
                3, (3, 6, 5), 27, options={"seed": 0},
            ),
        ),
        _conv_reference,
        _conv_errors(6, 2),
    ),
    ModuleInfo(
        CPConv3d,
        (
            ModuleCase(
                "cp_conv3d", _conv(nn.Conv3d, 4, 6, 3, padding=1), 4, (2, 4, 5, 5, 5), 108,
                options={"seed": 0},
            ),
            ModuleCase(
                "cp_conv3d_anisotropic_nobias",
                _conv(nn.Conv3d, 3, 5, (1, 3, 2), stride=(1, 2, 1), bias=False),
                0.5, (1, 3, 4, 7, 6), 18, options={"seed": 0},
            ),
        ),
        _conv_reference,
        _conv_errors(4, 3),
    ),
    ModuleInfo(
        SVDEmbedding,
        (
            ModuleCase("svd_embedding", _conv(nn.Embedding, 30, 12), 5, (4, 9), 5, full_rank=12),
            ModuleCase(
                "svd_embedding_padding", _conv(nn.Embedding, 30, 12, padding_idx=-1), 0.3, (2, 20),
                5, full_rank=12, true_gradient=False,
            ),
            ModuleCase(
                "svd_embedding_wide_scaled", _conv(nn.Embedding, 30, 40, scale_grad_by_freq=True),
                0.2, (45,), 5, full_rank=30, true_gradient=False,
            ),
        ),
        _embedding_reference,
        (
            ErrorInput((2, 3), r"torch\.long or torch\.int indices, got torch\.float32",
                       error=TypeError),
        ),
        make_input=_index_input(30),
        calibration=False,
    ),
    ModuleInfo(
        SVDConv2d,
        (
            ModuleCase(
                "svd_conv2d_channel", _conv(nn.Conv2d, 6, 8, 3, padding=1), 4, (2, 6, 7, 7), 54,
                full_rank=8,
            ),
            ModuleCase(
                "svd_conv2d_spatial_strided_dilated_reflect_nobias",
                _conv(nn.Conv2d, 5, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                      padding_mode="reflect", bias=False),
                0.3, (1, 5, 9, 13), 75, full_rank=15, options={"mode": "spatial"},
            ),
            ModuleCase(
                "svd_conv2d_1x1_strided_unbatched", _conv(nn.Conv2d, 8, 12, 1, stride=2), 3,
                (8, 7, 6), 8, full_rank=8,
            ),
            ModuleCase(
                "svd_conv2d_spatial_same_even_kernel",
                _conv(nn.Conv2d, 4, 6, (4, 3), padding="same", dilation=(2, 1)), 5, (2, 4, 8, 7),
                48, full_rank=16, options={"mode": "spatial"},
            ),
        ),
        _conv_reference,
        _conv_errors(6, 2),
    ),
    ModuleInfo(
        TuckerConv2d,
        (
            ModuleCase(
                "tucker_conv2d", _conv(nn.Conv2d, 6, 8, 3, padding=1), (4, 3), (2, 6, 7, 7), 54,
                full_rank=(8, 6),
            ),
            ModuleCase(
                "tucker_conv2d_same_dilated_even_kernel_nobias",
                _conv(nn.Conv2d, 5, 8, (3, 2), dilation=(2, 1), padding="same", bias=False),
                0.4, (1, 5, 8, 9), 30, full_rank=1.0,
            ),
            ModuleCase(
                "tucker_conv2d_strided_reflect_folded_in_unbatched",
                _conv(nn.Conv2d, 4, 6, 3, stride=2, padding=1, padding_mode="reflect"), (3, 4),
                (4, 9, 8), 36, full_rank=6,
            ),
            ModuleCase(
                "tucker_conv2d_1x1_strided_valid", _conv(nn.Conv2d, 8, 12, 1, stride=2,
                padding="valid"), 3, (2, 8, 7, 6), 8, full_rank=(12, 8),
            ),
        ),
        _conv_reference,
        _conv_errors(6, 2),
    ),
)  # fmt: skip

MODULE_CASES = tuple(Case(info, case) for info in MODULE_DB for case in info.cases)
"""Every (class, case) pair of :data:`MODULE_DB`."""
