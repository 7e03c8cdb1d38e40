"""Low-rank 2-D convolutions: channel low rank (``kxk`` then ``1x1``) and spatial low rank
(``kx1`` then ``1xk``), each the exact truncated-SVD optimum of a reshaped kernel.

A kernel ``W (C_out, C_in, kH, kW)`` is a matrix in two ways, and each gives a
two-convolution layer whose kernel set is exactly the rank-``r`` matrices of that view
(so the truncated SVD is the Eckart--Young optimum of the kernel error):

* ``mode="channel"``: ``W`` as ``(C_out, C_in kH kW)``; the rows of ``A`` are ``r``
  ``kH x kW`` filters ``C_in -> r``, ``B`` is a ``1 x 1`` convolution ``r -> C_out``.
  A ``1 x 1`` convolution is a matrix, and this is its plain low-rank form.
* ``mode="spatial"`` (Jaderberg et al. 2014, AIMET's spatial SVD): ``W`` as
  ``(C_out kW, C_in kH)`` (the transpose of the ``(C_in kH, C_out kW)`` matrix of the
  papers; same singular values); ``A`` is a ``kH x 1`` convolution ``C_in -> r``, ``B``
  a ``1 x kW`` convolution ``r -> C_out``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Tuple, Union

import torch
import torch.nn as nn

from ..decompose import (
    low_rank_factors,
    reduce_low_rank,
    whiten_mode,
    whitened_low_rank_factors,
    whitened_singular_values,
)
from ..decompose._common import all_finite
from ..functional._conv import check_padding_mode, conv_padding_pairs, conv_tuple
from ..functional.svd_conv import check_conv2d_input, run_svd_conv2d_plan, svd_conv2d_plan
from ..ranks import RankProfile, RankSpec, check_positive, resolve_matrix_rank
from ..registry import Capabilities, register_layer
from ..sources import ConvSource
from .base import Calibration, FactorizedLayer, Fit, fast_parameter, gram_of, names_bad_input

__all__ = ["SVDConv2d"]

_IntOrPair = Union[int, Tuple[int, int]]
MODES = ("channel", "spatial")
_SVD_OPTIONS = ("method", "oversample", "n_iter", "seed", "generator", "compute_dtype")
"""Options of :func:`~factorized_layers.decompose.truncated_svd` that ``from_dense`` passes on."""


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def svd_conv_matrix_shape(
    out_channels: int, in_channels: int, kernel_size: Tuple[int, int], mode: str
) -> Tuple[int, int]:
    """``(rows, cols)`` of the matrix view a mode truncates (rows: output side).

    ``channel``: ``(C_out, C_in kH kW)``; ``spatial``: ``(C_out kW, C_in kH)``. A rank-``r``
    layer stores ``r * (rows + cols)`` weight parameters.

    Examples:
        >>> svd_conv_matrix_shape(128, 64, (3, 3), "channel")
        (128, 576)
        >>> svd_conv_matrix_shape(128, 64, (3, 3), "spatial")
        (384, 192)
    """
    kh, kw = kernel_size
    if _check_mode(mode) == "channel":
        return out_channels, in_channels * kh * kw
    return out_channels * kw, in_channels * kh


def svd_conv_matrix(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The matrix view of a ``(C_out, C_in, kH, kW)`` kernel (see :func:`svd_conv_matrix_shape`).

    Columns are ordered input channel first, so whitening the input channels of the
    kernel is a right product with ``S kron I``.
    """
    out_channels, in_channels, kh, kw = weight.shape
    if _check_mode(mode) == "channel":
        return weight.reshape(out_channels, in_channels * kh * kw)
    return weight.permute(0, 3, 1, 2).reshape(out_channels * kw, in_channels * kh)


def _conv_factors(
    output_matrix: torch.Tensor, input_matrix: torch.Tensor, kernel_size, mode: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_factor, output_factor)`` convolution kernels of matrix factors ``B``, ``A``."""
    kh, kw = kernel_size
    rank = input_matrix.shape[0]
    if mode == "channel":
        in_channels = input_matrix.shape[1] // (kh * kw)
        return (
            input_matrix.reshape(rank, in_channels, kh, kw),
            output_matrix.reshape(-1, rank, 1, 1),
        )
    in_channels = input_matrix.shape[1] // kh
    out_channels = output_matrix.shape[0] // kw
    output_factor = output_matrix.reshape(out_channels, kw, rank).permute(0, 2, 1)
    return (
        input_matrix.reshape(rank, in_channels, kh, 1),
        output_factor.reshape(out_channels, rank, 1, kw),
    )


def _matrix_factors(
    input_factor: torch.Tensor, output_factor: torch.Tensor, mode: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the matrix view of the kernel the factors represent."""
    rank = input_factor.shape[0]
    if mode == "channel":
        return output_factor.reshape(-1, rank), input_factor.reshape(rank, -1)
    out_channels, _, _, kw = output_factor.shape
    output_matrix = output_factor[:, :, 0, :].permute(0, 2, 1).reshape(out_channels * kw, rank)
    return output_matrix, input_factor.reshape(rank, -1)


def _compute_dtype(weight: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is None:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}"
        )
    return compute_dtype


def _whitened_matrix(
    weight: torch.Tensor, gram: torch.Tensor, mode: str, ridge: float, dtype: torch.dtype
) -> torch.Tensor:
    """The matrix view of the kernel whitened along its input channels: ``M (S kron I)``."""
    return svd_conv_matrix(whiten_mode(weight, gram, 1, ridge=ridge, compute_dtype=dtype), mode)


def _kronecker_whitened_factors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    mode: str,
    ridge: float,
    compute_dtype: torch.dtype | None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`~factorized_layers.decompose.whitened_low_rank_factors` of the matrix view
    for the patch Gram ``gram kron I`` (never formed: ``S kron I`` is a channel product).

    The left singular vectors ``U_r`` of ``M (S kron I)`` give ``B = U_r D`` and
    ``A = D^-1 U_r^T M`` (no inverse of ``S``), ``D`` balancing the factors' scales.
    """
    dtype = _compute_dtype(weight, compute_dtype)
    matrix = svd_conv_matrix(weight, mode)
    rows, cols = matrix.shape
    if weight.device.type == "meta":
        meta = dict(device="meta", dtype=weight.dtype)
        return torch.empty(rows, rank, **meta), torch.empty(rank, cols, **meta)
    if not all_finite(weight):
        raise ValueError("weight contains NaN/Inf values; a decomposition of them is meaningless")
    whitened = _whitened_matrix(weight, gram, mode, ridge, dtype)
    left = torch.linalg.svd(whitened, full_matrices=False).U[:, :rank]
    projected = left.mT @ matrix.detach().to(dtype)
    balance = projected.norm(dim=1).sqrt()
    balance = torch.where(balance > 0, balance, torch.ones_like(balance))
    return (left * balance).to(weight.dtype), (projected / balance[:, None]).to(weight.dtype)


@register_layer
class SVDConv2d(FactorizedLayer):
    r"""2-D convolution whose kernel has rank ``r`` in a matrix view: two convolutions.

    ``mode="channel"`` (default): a ``kH x kW`` convolution ``C_in -> r`` without bias
    (``input_factor``), then a ``1 x 1`` convolution ``r -> C_out`` with the bias
    (``output_factor``): ``r (C_in kH kW + C_out)`` weight parameters. The kernel is
    ``W[o, i, h, w] = sum_r B[o, r] A[r, i, h, w]``.

    ``mode="spatial"``: a ``kH x 1`` convolution ``C_in -> r`` then a ``1 x kW``
    convolution ``r -> C_out``: ``r (C_in kH + C_out kW)`` weight parameters and
    ``W[o, i, h, w] = sum_r B[o, r, w] A[r, i, h]``.

    Every ``nn.Conv2d`` option but ``groups`` is kept and the output equals the dense
    convolution's with :meth:`dense_weight` exactly: in channel mode the first
    convolution carries stride, dilation and padding; in spatial mode the height
    options go to the first and the width options to the second (a height-only
    convolution treats columns alike, so padding its output's width in any
    ``padding_mode`` is padding its input's), see
    :func:`~factorized_layers.functional.svd_conv.svd_conv2d_plan`. The forward pass is
    two ``F.conv2d`` calls (plus ``F.pad`` for a ``padding_mode`` other than zeros or
    the asymmetric part of ``'same'``); no dense kernel is formed.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: ``int`` or ``(kH, kW)``.
        rank: ``int`` in ``[1, min(rows, cols)]`` of the mode's matrix view
            (:func:`svd_conv_matrix_shape`), or ``float`` in ``(0, 1]``: the fraction of
            the dense kernel's parameters to keep.
        stride: ``int`` or pair, as ``nn.Conv2d``.
        padding: ``int``, pair, ``'same'`` or ``'valid'``, as ``nn.Conv2d``.
        dilation: ``int`` or pair, as ``nn.Conv2d``.
        bias: If ``False``, no additive bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
        groups: Only ``1`` (grouped and depthwise convolutions stay ``nn.Conv2d``).
        mode: ``'channel'`` or ``'spatial'``.

    Shape:
        - Input: ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)`` with ``nn.Conv2d``'s sizes.

    Attributes:
        input_factor: ``(rank, in_channels, kH, kW)`` (channel) or
            ``(rank, in_channels, kH, 1)`` (spatial) learnable kernel of the first step.
        output_factor: ``(out_channels, rank, 1, 1)`` (channel) or
            ``(out_channels, rank, 1, kW)`` (spatial) learnable kernel of the second step.
        bias: ``(out_channels,)`` learnable bias, or ``None``.
        rank: The concrete rank (``int``).
        mode: ``'channel'`` or ``'spatial'``.

    Examples:
        >>> layer = SVDConv2d(16, 32, 3, rank=8, padding=1)
        >>> layer(torch.randn(2, 16, 10, 10)).shape
        torch.Size([2, 32, 10, 10])
        >>> dense = nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="reflect")
        >>> spatial = SVDConv2d.from_dense(dense, rank=0.5, mode="spatial")
        >>> spatial.rank, spatial.input_factor.shape, spatial.output_factor.shape
        (16, torch.Size([16, 16, 3, 1]), torch.Size([32, 16, 1, 3]))
        >>> x = torch.randn(1, 16, 9, 9)
        >>> torch.allclose(spatial(x), spatial.to_dense()(x), atol=1e-5)
        True
    """

    source = ConvSource(2)
    capabilities = Capabilities(
        calibration=True,
        rank_profile=True,
        truncation=True,
        ridge_option="ridge",
        profile_options=("ridge", "mode"),
    )
    __constants__ = [
        "in_channels",
        "out_channels",
        "kernel_size",
        "rank",
        "stride",
        "padding",
        "dilation",
        "padding_mode",
        "mode",
    ]
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    rank: int
    stride: Tuple[int, int]
    padding: Union[str, Tuple[int, int]]
    dilation: Tuple[int, int]
    padding_mode: str
    mode: str

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrPair,
        rank: RankSpec,
        stride: _IntOrPair = 1,
        padding: Union[str, _IntOrPair] = 0,
        dilation: _IntOrPair = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        groups: int = 1,
        mode: str = "channel",
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if groups != 1:
            raise ValueError(
                f"SVDConv2d supports groups=1 only, got groups={groups!r}; keep grouped and "
                "depthwise convolutions as nn.Conv2d, or factorize each group's nn.Conv2d "
                "separately"
            )
        self.mode = _check_mode(mode)
        self.in_channels = check_positive("in_channels", in_channels)
        self.out_channels = check_positive("out_channels", out_channels)
        self.kernel_size = conv_tuple(kernel_size, 2, "kernel_size")
        self.stride = conv_tuple(stride, 2, "stride")
        self.dilation = conv_tuple(dilation, 2, "dilation")
        check_padding_mode(padding_mode)
        self.padding_mode = padding_mode
        # Validates the padding (and 'same' with a stride) once, at construction.
        conv_padding_pairs(padding, self.kernel_size, self.dilation, self.stride)
        self.padding = padding if isinstance(padding, str) else conv_tuple(padding, 2, "padding", 0)
        rows, cols = svd_conv_matrix_shape(out_channels, in_channels, self.kernel_size, mode)
        self.rank = resolve_matrix_rank(rank, rows, cols)
        kh, kw = self.kernel_size
        # The convolution options of each step, resolved once (a 1-wide spatial kernel
        # keeps the width options on the first step: fewer columns to filter).
        self._plan = svd_conv2d_plan(
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            padding_mode,
            width_on_second=mode == "spatial" and kw > 1,
        )
        first = (self.rank, in_channels, kh, kw if mode == "channel" else 1)
        second = (out_channels, self.rank, 1, 1 if mode == "channel" else kw)
        self.input_factor = nn.Parameter(torch.empty(first, **factory_kwargs))
        self.output_factor = nn.Parameter(torch.empty(second, **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that ``dense_weight()`` has ``nn.Conv2d``'s default variance.

        ``nn.Conv2d`` draws ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
        ``fan_in = C_in kH kW`` (variance ``1/(3 fan_in)``). ``input_factor`` gets
        variance ``1 / fan1`` (``fan1`` its own fan-in: ``C_in kH kW`` or ``C_in kH``),
        so the ``r`` intermediate channels keep the input's scale, and
        ``output_factor`` gets ``nn.Conv2d``'s own init for its fan-in ``fan2``
        (``r`` or ``r kW``, variance ``1/(3 fan2)``). Each kernel entry is a sum of
        ``r`` products, of variance ``r / (3 fan1 fan2) = 1/(3 fan_in)`` in both modes.
        The bias is drawn as ``nn.Conv2d`` draws it.
        """
        kh, kw = self.kernel_size
        first_fan = self.in_channels * kh * (kw if self.mode == "channel" else 1)
        second_fan = self.rank * (1 if self.mode == "channel" else kw)
        bound = math.sqrt(3.0 / first_fan)
        nn.init.uniform_(self.input_factor, -bound, bound)
        bound = 1.0 / math.sqrt(second_fan)
        nn.init.uniform_(self.output_factor, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * kh * kw)
            nn.init.uniform_(self.bias, -bound, bound)

    @names_bad_input
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_conv2d_input(input, self.in_channels)
        return run_svd_conv2d_plan(
            input,
            fast_parameter(self, "input_factor"),
            fast_parameter(self, "output_factor"),
            fast_parameter(self, "bias"),
            self._plan,
        )

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in, kH, kW)`` kernel the factors represent (differentiable)."""
        if self.mode == "channel":
            return torch.einsum("or,rihw->oihw", self.output_factor[:, :, 0, 0], self.input_factor)
        return torch.einsum("rih,orw->oihw", self.input_factor[..., 0], self.output_factor[:, :, 0])

    def flops_per_position(self) -> int:
        """Multiply-accumulates per output pixel (all output channels), bias excluded.

        Channel mode: ``r (C_in kH kW + C_out)`` (both steps run at the output
        resolution). Spatial mode: ``r (C_in kH s_W + C_out kW)``: the ``kH x 1`` step
        runs on every input column, ``s_W`` (the width stride) per output pixel.
        """
        return self.rank * _flops_per_rank(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.mode
        )

    @classmethod
    def unsupported_reason(cls, conv: nn.Module) -> str | None:
        """Why ``conv`` cannot be converted (``None`` when it can); used by ``factorize_``."""
        if conv.groups != 1:
            return f"groups={conv.groups}: grouped/depthwise convolutions stay nn.Conv2d"
        return None

    @classmethod
    def auto_variants(cls, conv: nn.Module) -> Tuple[Dict[str, Any], ...]:
        """The modes ``factorize_(..., layers="auto")`` compares for ``conv``.

        Both, except for a ``1 x 1`` kernel, where the two modes are the same matrix.
        """
        if tuple(conv.kernel_size) == (1, 1):
            return ({"mode": "channel"},)
        return ({"mode": "channel"}, {"mode": "spatial"})

    @classmethod
    def plain_rank(cls, conv: nn.Module, spec: RankSpec) -> RankSpec:
        """``spec`` checked; made concrete by :meth:`fit_factors`, where the mode is known.

        The largest rank and the rank of a parameter fraction depend on ``mode`` (a
        ``from_dense`` option the base class does not pass here), so an ``int`` is only
        checked to be positive and a ``float`` to lie in ``(0, 1]``;
        :func:`~factorized_layers.ranks.resolve_matrix_rank` on the mode's matrix view
        (:func:`svd_conv_matrix_shape`) resolves it.
        """
        if isinstance(spec, bool) or not isinstance(spec, numbers.Real):
            raise TypeError(f"rank must be an int or a float, got {type(spec).__name__} {spec!r}")
        if isinstance(spec, numbers.Integral):
            if spec < 1:
                raise ValueError(f"rank must be a positive integer, got {spec}")
        elif not (math.isfinite(spec) and 0.0 < spec <= 1.0):
            raise ValueError(f"a float rank is a fraction of parameters in (0, 1], got {spec!r}")
        return spec

    @classmethod
    def rank_profile(
        cls,
        conv: nn.Conv2d,
        *,
        calibration: Calibration = None,
        ridge: float = 1e-6,
        mode: str = "channel",
    ) -> RankProfile:
        """Every rank ``1..min(rows, cols)`` of the mode's matrix view with its exact error.

        Without calibration the errors are the Eckart--Young optima of the reshaped
        kernel's singular values (exactly what :meth:`from_dense` reaches). With
        calibration they are the relative errors in the metric :meth:`from_dense`
        fits in: the kernel whitened along its input channels by the channel Gram
        (exact output errors for a ``1 x 1`` convolution; for larger kernels the
        patch Gram is approximated by ``G kron I``, see :meth:`fit_factors`).
        Parameters per rank are ``rows + cols``; FLOPs per rank per output pixel as
        :meth:`flops_per_position`. Computed in float32 (float64 for float64 weights).

        Args:
            conv: The dense convolution (``groups=1``).
            calibration: ``InputStats`` of the layer's input channels, or their
                ``(in_channels, in_channels)`` Gram matrix.
            ridge: Relative ridge of the whitening (used only with calibration), as in
                :meth:`from_dense`.
            mode: ``'channel'`` or ``'spatial'``, as in :meth:`from_dense`.

        Examples:
            >>> profile = SVDConv2d.rank_profile(nn.Conv2d(8, 16, 3), mode="spatial")
            >>> profile.ranks[-1], profile.params[0], profile.errors[-1] < 1e-6
            (24, 72, True)
        """
        cls.source.check(conv, cls.__name__)
        _check_mode(mode)
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"SVDConv2d cannot convert this {type(conv).__name__}: {reason}")
        weight = conv.weight.detach()
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        gram = gram_of(calibration)
        matrix = svd_conv_matrix(weight, mode)
        if gram is None:
            singular_values = torch.linalg.svdvals(matrix.to(compute))
        elif _positions(conv.kernel_size, mode) == 1:
            singular_values = whitened_singular_values(matrix, gram, ridge=ridge)
        else:
            singular_values = torch.linalg.svdvals(
                _whitened_matrix(weight, gram, mode, ridge, compute)
            )
        rows, cols = matrix.shape
        return RankProfile.from_spectrum(
            singular_values.tolist(),
            rows,
            cols,
            params_per_rank=rows + cols,
            flops_per_rank=_flops_per_rank(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, mode
            ),
            dense_params=weight.numel(),
            dense_flops=weight.numel(),
        )

    @classmethod
    def fit_factors(
        cls,
        conv: nn.Conv2d,
        rank: RankSpec,
        *,
        mode: str = "channel",
        gram: torch.Tensor | None = None,
        ridge: float = 1e-6,
        **svd_options: Any,
    ) -> Fit:
        """Best rank-``rank`` factors of a trained ``nn.Conv2d``: the fit of :meth:`from_dense`.

        ``SVDConv2d.from_dense(conv, rank, calibration=None, mode=..., **options)`` takes
        these options. Without calibration the factors are the truncated SVD of the
        mode's matrix view of the kernel (:func:`svd_conv_matrix`): the exact optimum
        of the kernel's Frobenius error over all layers of that structure
        (Eckart--Young).

        With ``calibration`` (the Gram ``G`` of the input channels over all positions,
        from :func:`factorized_layers.calibrate.calibrate`) the factors minimise the
        output error instead, in the whitened-SVD way of ``SVDLinear``. For a ``1 x 1``
        convolution ``G`` is the exact Gram of the matrix's inputs and this is
        :func:`~factorized_layers.decompose.whitened_low_rank_factors`, the exact
        optimum of the output error on the calibration data. For a ``kH x kW`` kernel
        the output error depends on the Gram of the input *patches*, which the channel
        statistic approximates by ``G kron I`` (channels correlated as measured, kernel
        positions uncorrelated, the Kronecker approximation of K-FAC); the factors are
        then the exact optimum of that approximate metric, computed without forming
        the ``(C_in kH kW)^2`` matrix (the whitening is a product over the channel
        mode, :func:`~factorized_layers.decompose.whiten_mode`).

        Args:
            conv: The trained layer (``groups=1``; any ``nn.Conv2d`` subclass).
            rank: ``int`` or ``float`` parameter fraction, resolved on the mode's
                matrix view (:func:`~factorized_layers.ranks.resolve_matrix_rank`).
            mode: ``'channel'`` (``kH x kW`` then ``1 x 1``) or ``'spatial'``
                (``kH x 1`` then ``1 x kW``).
            gram: The ``(in_channels, in_channels)`` Gram from ``calibration``, or ``None``.
            ridge: Relative ridge of the whitening (used only with calibration, see
                :func:`~factorized_layers.decompose.whitening_root`).
            **svd_options: Without calibration: ``method``, ``oversample``, ``n_iter``,
                ``seed``, ``generator``, ``compute_dtype`` of
                :func:`factorized_layers.decompose.truncated_svd`. With calibration:
                ``compute_dtype``.

        Examples:
            >>> dense = nn.Conv2d(8, 12, 1)
            >>> layer = SVDConv2d.from_dense(dense, rank=8)
            >>> torch.allclose(layer.dense_weight(), dense.weight, atol=1e-5)
            True
        """
        _check_mode(mode)
        unknown = sorted(set(svd_options) - set(_SVD_OPTIONS))
        if unknown:
            raise TypeError(
                f"SVDConv2d.from_dense got unknown option(s) {unknown}; valid: "
                f"{sorted(('mode', 'ridge') + _SVD_OPTIONS)}"
            )
        weight = conv.weight
        kernel_size = tuple(conv.kernel_size)
        matrix = svd_conv_matrix(weight, mode)
        rows, cols = matrix.shape
        concrete = resolve_matrix_rank(rank, rows, cols)
        if gram is None:
            output_matrix, input_matrix = low_rank_factors(matrix, concrete, **svd_options)
        else:
            unsupported = sorted(set(svd_options) - {"compute_dtype"})
            if unsupported:
                raise TypeError(
                    f"with calibration, from_dense takes ridge= and compute_dtype= only "
                    f"(the whitened SVD is exact); got {unsupported}"
                )
            if _positions(kernel_size, mode) == 1:
                output_matrix, input_matrix = whitened_low_rank_factors(
                    matrix, gram, concrete, ridge=ridge, **svd_options
                )
            else:
                output_matrix, input_matrix = _kronecker_whitened_factors(
                    weight, gram, concrete, mode, ridge, svd_options.get("compute_dtype")
                )
        input_factor, output_factor = _conv_factors(output_matrix, input_matrix, kernel_size, mode)
        config = {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": kernel_size,
            "rank": concrete,
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
            "mode": mode,
        }
        return Fit(config, {"input_factor": input_factor, "output_factor": output_factor})

    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this layer's structure (JSON-serialisable).

        ``SVDConv2d.from_config(layer.get_config())`` has the same parameter names,
        shapes and convolution options (freshly initialised values);
        :func:`factorized_layers.checkpoint.save_factorized` stores it.
        """
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "rank": self.rank,
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
            "mode": self.mode,
        }

    def truncate_factors(self, rank: RankSpec) -> Fit:
        """The factors of :meth:`truncated`: the best approximation of this layer's kernel.

        Re-decomposes the factors as matrices
        (:func:`~factorized_layers.decompose.reduce_low_rank`: QR of each, SVD of the
        ``rank x rank`` product), never the dense kernel, so a fine-tuned layer can be
        compressed further; the kernel error is the Eckart--Young optimum for
        ``dense_weight()`` in the layer's mode.

        Args:
            rank: As the constructor's ``rank`` (``int``, or ``float`` fraction of the
                *dense* kernel's parameters); a rank above the current one keeps it.

        Examples:
            >>> layer = SVDConv2d(16, 32, 3, rank=12, mode="spatial")
            >>> layer.truncated(4).output_factor.shape
            torch.Size([32, 4, 1, 3])
        """
        rows, cols = svd_conv_matrix_shape(
            self.out_channels, self.in_channels, self.kernel_size, self.mode
        )
        new_rank = min(resolve_matrix_rank(rank, rows, cols), self.rank)
        output_matrix, input_matrix = _matrix_factors(
            self.input_factor, self.output_factor, self.mode
        )
        output_matrix, input_matrix = reduce_low_rank(output_matrix, input_matrix, new_rank)
        input_factor, output_factor = _conv_factors(
            output_matrix, input_matrix, self.kernel_size, self.mode
        )
        config = dict(self.get_config(), rank=new_rank)
        return Fit(config, {"input_factor": input_factor, "output_factor": output_factor})

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, mode={self.mode!r}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        text += f", bias={self.bias is not None}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text


def _positions(kernel_size, mode: str) -> int:
    """Kernel positions per input channel on the input side of the mode's matrix view."""
    kh, kw = kernel_size
    return kh * kw if mode == "channel" else kh


def _flops_per_rank(in_channels, out_channels, kernel_size, stride, mode: str) -> int:
    """Multiply-accumulates per output pixel that each unit of rank costs."""
    kh, kw = kernel_size
    if mode == "channel":
        return in_channels * kh * kw + out_channels
    # The kH x 1 step runs on every input column: s_W of them per output pixel (when
    # the width options go to the 1 x kW step; a 1-wide kernel keeps them on the first).
    width_stride = stride[1] if kw > 1 else 1
    return in_channels * kh * width_stride + out_channels * kw
