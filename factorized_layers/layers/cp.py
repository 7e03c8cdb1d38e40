"""CP-decomposed (CANDECOMP/PARAFAC) convolutions in 1, 2 and 3 spatial dimensions.

:class:`_CPConvNd` owns validation, the fit, the forward pass and ``extra_repr``
(like ``torch.nn.modules.conv._ConvNd``); :class:`CPConv1d`, :class:`CPConv2d` and
:class:`CPConv3d` only fix the number of spatial dimensions and the dense type.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Tuple, Union

import torch
import torch.nn as nn

from ..decompose import cp_factors, cp_to_tensor, reduce_cp, whiten_mode, whitened_cp_factors
from ..functional import (
    conv_padding_pairs,
    conv_tuple,
    cp_conv_separable,
    cp_convnd,
    cp_merged_kernel,
)
from ..functional._conv import check_padding_mode
from ..ranks import (
    RankProfile,
    RankSpec,
    check_positive,
    cp_conv_flops,
    cp_max_rank,
    cp_params,
    dense_conv_flops,
    resolve_cp_rank,
)
from ..registry import Capabilities, register_layer
from ..sources import ConvSource
from .base import Calibration, FactorizedLayer, Fit, gram_of, names_bad_input

__all__ = ["CPConv1d", "CPConv2d", "CPConv3d"]

_IntOrTuple = Union[int, Tuple[int, ...]]

_SPATIAL_NAMES = {
    1: ("length",),
    2: ("height", "width"),
    3: ("depth", "height", "width"),
}
"""Spatial factor names per dimension count (``<name>_factor``), in PyTorch's order."""


def _fit_info(result) -> Dict[str, Any]:
    """The ALS run's report kept in ``fit_info``."""
    return {
        "n_iter": result.n_iter,
        "converged": result.converged,
        "degenerate": result.degenerate,
        "ridge": result.ridge,
    }


def _relative_error(weight: torch.Tensor, factors) -> float:
    """Relative Frobenius error of a CP fit of ``weight`` (in float64)."""
    reference = weight.detach().double()
    fitted = cp_to_tensor(None, factors).double()
    norm = float(reference.norm())
    return float((fitted - reference).norm()) / norm if norm else 0.0


class _CPConvNd(FactorizedLayer):
    r"""N-d convolution whose kernel is a rank-``R`` CP tensor (base of ``CPConv1d/2d/3d``).

    :math:`W[o, i, k_1, \ldots, k_n] = \sum_r O[o, r]\, I[i, r] \prod_d K_d[k_d, r]`
    with one factor of ``R`` columns per mode; only the factors are stored,
    ``R * (out + in + sum(kernel_size))`` weight parameters instead of
    ``out * in * prod(kernel_size)``. The forward pass
    (:func:`factorized_layers.functional.cp_convnd`) is

    1. a channel contraction ``in -> R`` (one GEMM written channels-last; it
       measured as fast as or faster than a 1x1 convolution and the opt_einsum
       contraction),
    2. a depthwise convolution with ``groups=R`` carrying the stride, dilation and
       padding exactly as ``F.conv{n}d`` (``padding_mode`` applied with ``F.pad`` like
       ``nn.Conv{n}d``, ``'same'`` with even kernels padded at the end): one merged
       kernel (outer product of the spatial factors) when
       ``prod(kernel) <= 3 * sum(kernel)``, one 1-D pass per dimension otherwise --
       the crossover measured on CPU between 5x5 (merged 1.2-2x faster) and 7x7
       (separable 1.2x faster), see
       :func:`factorized_layers.functional.cp_conv_separable`; set :attr:`separable`
       to force either form,
    3. a channel contraction ``R -> out``, then the bias.

    The intermediate ``R``-channel tensors are channels-last whatever the input's
    format (depthwise convolutions ran 2-9x faster that way on CPU); the layout
    change is folded into the two GEMMs (any copy torch makes for a transposed
    operand is inside the layer's time, and the benchmark compares against
    ``nn.Conv2d`` on the same input), and the output has the memory format the
    dense convolution returns for that input.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: ``int`` or one size per spatial dimension.
        rank: ``int`` in ``[1, cp_max_rank]`` or ``float`` in ``(0, 1]``: the fraction
            of the dense kernel's parameters to keep, see
            :func:`factorized_layers.ranks.resolve_cp_rank`.
        stride: ``int`` or tuple, as the dense convolution.
        padding: ``int``, tuple, ``'same'`` or ``'valid'``, as the dense convolution.
        dilation: ``int`` or tuple, as the dense convolution.
        bias: If ``False``, no additive bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
        groups: Only ``1``; grouped and depthwise convolutions should stay dense (a
            depthwise kernel is already as cheap as its CP form).

    Attributes:
        out_channel_factor: ``(out_channels, rank)`` learnable factor.
        in_channel_factor: ``(in_channels, rank)`` learnable factor.
        <dim>_factor: ``(kernel_size[d], rank)`` learnable factor per spatial
            dimension: ``length`` (1-d); ``height``, ``width`` (2-d); ``depth``,
            ``height``, ``width`` (3-d).
        bias: ``(out_channels,)`` learnable bias, or ``None``.
        rank: The concrete rank (``int``).
        separable: ``None`` (the measured rule), ``True`` or ``False``: depthwise form.
        fit_error: Relative Frobenius error of the kernel fit after :meth:`from_dense`
            (``None`` for a layer built otherwise).
        fit_info: ``dict`` with the CP-ALS sweeps, convergence and degeneracy flags
            and final ridge after :meth:`from_dense` (``None`` otherwise).
    """

    dims: ClassVar[int]
    capabilities = Capabilities(
        calibration=True,
        rank_profile=True,
        truncation=True,
        ridge_option="whitening_ridge",
        profile_options=("whitening_ridge",),
        truncation_options=("n_iter", "tol"),
        profile_errors="lower_bound",
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
    ]
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    rank: int
    stride: Tuple[int, ...]
    padding: Union[str, Tuple[int, ...]]
    dilation: Tuple[int, ...]
    padding_mode: str

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrTuple,
        rank: RankSpec,
        stride: _IntOrTuple = 1,
        padding: Union[str, _IntOrTuple] = 0,
        dilation: _IntOrTuple = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        groups: int = 1,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        n = self.dims
        dense = self.source.module_type.__name__
        if groups != 1:
            raise ValueError(
                f"{type(self).__name__} supports groups=1 only, got groups={groups!r}; keep "
                f"grouped and depthwise convolutions as nn.{dense} (a depthwise kernel is "
                f"already as cheap as its CP form), or factorize each group's nn.{dense} "
                "separately"
            )
        self.in_channels = check_positive("in_channels", in_channels)
        self.out_channels = check_positive("out_channels", out_channels)
        self.kernel_size = conv_tuple(kernel_size, n, "kernel_size")
        self.stride = conv_tuple(stride, n, "stride")
        self.dilation = conv_tuple(dilation, n, "dilation")
        check_padding_mode(padding_mode)
        self.padding_mode = padding_mode
        # Validates the padding (and 'same' with stride 1) once, at construction.
        conv_padding_pairs(padding, self.kernel_size, self.dilation, self.stride)
        self.padding = padding if isinstance(padding, str) else conv_tuple(padding, n, "padding", 0)
        self.rank = resolve_cp_rank(rank, (out_channels, in_channels) + self.kernel_size)
        self.separable: bool | None = None
        self.fit_error: float | None = None
        self.fit_info: dict | None = None
        self.out_channel_factor = nn.Parameter(
            torch.empty((out_channels, self.rank), **factory_kwargs)
        )
        self.in_channel_factor = nn.Parameter(
            torch.empty((in_channels, self.rank), **factory_kwargs)
        )
        for name, k in zip(self._spatial_names(), self.kernel_size):
            self.register_parameter(
                name, nn.Parameter(torch.empty((k, self.rank), **factory_kwargs))
            )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @classmethod
    def _spatial_names(cls) -> Tuple[str, ...]:
        return tuple(f"{name}_factor" for name in _SPATIAL_NAMES[cls.dims])

    @classmethod
    def _factor_names(cls) -> Tuple[str, ...]:
        return ("out_channel_factor", "in_channel_factor") + cls._spatial_names()

    def spatial_factors(self) -> Tuple[torch.Tensor, ...]:
        """The ``(kernel_size[d], rank)`` factors in spatial-dimension order."""
        return tuple(getattr(self, name) for name in self._spatial_names())

    def reset_parameters(self) -> None:
        """Initialise so that ``dense_weight()`` has the dense convolution's default variance.

        ``nn.Conv{n}d`` draws ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
        ``fan_in = in * prod(kernel_size)`` (variance ``1/(3 fan_in)``). Here the
        input-channel and spatial factors get unit-variance-per-fan uniforms
        (variances ``1/in`` and ``1/k_d``) and the output-channel factor
        ``U(-1/sqrt(R), 1/sqrt(R))`` (variance ``1/(3R)``); a sum of ``R`` independent
        products then has variance ``R / (in prod(k) 3R) = 1/(3 fan_in)``. The bias is
        drawn as the dense convolution's.
        """
        for factor, fan in zip(
            (self.in_channel_factor,) + self.spatial_factors(),
            (self.in_channels,) + self.kernel_size,
        ):
            bound = math.sqrt(3.0 / fan)
            nn.init.uniform_(factor, -bound, bound)
        bound = 1.0 / math.sqrt(self.rank)
        nn.init.uniform_(self.out_channel_factor, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
            nn.init.uniform_(self.bias, -bound, bound)

    @names_bad_input
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return cp_convnd(
            input,
            self.out_channel_factor,
            self.in_channel_factor,
            self.spatial_factors(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.padding_mode,
            self.separable,
        )

    def uses_separable(self) -> bool:
        """Whether the depthwise step runs one 1-D pass per dimension (else one merged kernel)."""
        if self.separable is None:
            return cp_conv_separable(self.kernel_size)
        return bool(self.separable)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in, *kernel_size)`` kernel the factors represent (differentiable)."""
        spatial = cp_merged_kernel(self.spatial_factors()).squeeze(1)
        letters = "dhw"[-self.dims :]
        return torch.einsum(
            f"or,ir,r{letters}->oi{letters}",
            self.out_channel_factor,
            self.in_channel_factor,
            spatial,
        )

    def flops_per_position(self) -> int:
        """Multiply-accumulates per output position (all output channels), bias excluded."""
        return cp_conv_flops(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.rank,
            self.stride,
            separable=self.uses_separable(),
        )

    @classmethod
    def unsupported_reason(cls, conv: nn.Module) -> str | None:
        """Why ``conv`` cannot be converted (``None`` when it can); used by ``factorize_``."""
        if conv.groups != 1:
            dense = cls.source.module_type.__name__
            return f"groups={conv.groups}: grouped/depthwise convolutions stay nn.{dense}"
        return None

    @classmethod
    def plain_rank(cls, conv: nn.Module, spec: RankSpec) -> int:
        """The concrete rank of an ``int``/``float`` spec (see ``ranks.resolve_cp_rank``)."""
        return resolve_cp_rank(spec, tuple(conv.weight.shape))

    @classmethod
    def rank_profile(
        cls,
        conv: nn.Module,
        *,
        calibration: Calibration = None,
        whitening_ridge: float = 1e-6,
    ) -> RankProfile:
        """CP ranks with their parameters, FLOPs and an error *estimate* for rank policies.

        Fitting CP at every rank would cost a CP-ALS per candidate, so the error of
        rank ``R`` is estimated by the best rank-``R`` error of the kernel's
        ``(out, in * prod(kernel_size))`` unfolding (Eckart--Young). That is a lower
        bound of the CP error (0 from the unfolding's rank on), so policies on CP
        layers are optimistic: ``Energy``/``ErrorBound`` targets are not guaranteed
        and ``Budget`` under-allocates to convolutions; the report gives the fitted
        error. Candidates are the ranks that save parameters, at most
        :func:`~factorized_layers.ranks.cp_max_rank`.

        With calibration the unfolding is that of the kernel whitened along its
        input channels (:func:`~factorized_layers.decompose.whiten_mode`), the metric
        :meth:`from_dense` fits in.

        Args:
            conv: The dense convolution.
            calibration: ``InputStats`` of the layer's input channels (from
                :func:`~factorized_layers.calibrate.calibrate`), or their
                ``(in_channels, in_channels)`` Gram matrix.
            whitening_ridge: Relative ridge of the whitening (used only with
                calibration), as in :meth:`from_dense`.
        """
        cls.source.check(conv, cls.__name__)
        weight = conv.weight.detach()
        out_channels = weight.shape[0]
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        gram = gram_of(calibration)
        if gram is not None:
            weight = whiten_mode(weight, gram, 1, ridge=whitening_ridge, compute_dtype=compute)
        unfolding = weight.reshape(out_channels, -1)
        singular_values = torch.linalg.svdvals(unfolding.to(compute)).tolist()
        shape = tuple(weight.shape)
        saving = (weight.numel() - 1) // sum(shape)
        top = max(1, min(cp_max_rank(shape), saving))
        ranks = tuple(range(1, top + 1))
        total = sum(v * v for v in singular_values)
        errors = []
        tail = total
        for r in ranks:
            if r <= len(singular_values):
                tail -= singular_values[r - 1] ** 2
            errors.append(math.sqrt(max(tail, 0.0) / total) if total > 0 else 0.0)
        separable = cp_conv_separable(conv.kernel_size)
        return RankProfile(
            ranks=ranks,
            params=tuple(cp_params(shape, r) for r in ranks),
            flops=tuple(
                cp_conv_flops(
                    conv.in_channels,
                    out_channels,
                    conv.kernel_size,
                    r,
                    conv.stride,
                    separable=separable,
                )
                for r in ranks
            ),
            errors=tuple(errors),
            dense_params=weight.numel(),
            dense_flops=dense_conv_flops(conv.in_channels, out_channels, conv.kernel_size),
            spectrum=tuple(singular_values),
            rows=unfolding.shape[0],
            cols=unfolding.shape[1],
        )

    @classmethod
    def fit_factors(
        cls,
        conv: nn.Module,
        rank: int,
        *,
        gram: torch.Tensor | None = None,
        n_iter: int = 100,
        tol: float = 1.5e-4,
        seed: int | None = None,
        whitening_ridge: float = 1e-6,
        **als_options: Any,
    ) -> Fit:
        """CP factors of a trained convolution kernel by CP-ALS: the fit of :meth:`from_dense`.

        ``from_dense(conv, rank, calibration=None, **options)`` takes these options.
        :func:`factorized_layers.decompose.cp_als` runs on the kernel's device in
        float32 (float64 for float64 kernels or with ``compute_dtype=torch.float64``):
        HOSVD initialisation, column normalisation each sweep, a small ridge,
        momentum, stopping when the fit (the explained share of the kernel's energy)
        stops changing, and a degeneracy guard. The weights are spread evenly over
        the factors before the cast back to the kernel's dtype. Every convolution
        option (stride, padding incl. ``'same'``/``'valid'``, dilation,
        ``padding_mode``) is kept. The fit's relative error is in :attr:`fit_error`,
        the rest of the report in :attr:`fit_info`.

        With ``calibration`` (the Gram matrix of the input channels over all batch
        elements and positions, from :func:`factorized_layers.calibrate.calibrate`)
        the kernel is fitted in the metric of that Gram
        (:func:`~factorized_layers.decompose.whitened_cp_factors`): error in channel
        directions the data rarely visits (e.g. channels a ReLU leaves dead) costs
        less. On the digits CNN of :mod:`factorized_layers.demo` (width 32) it lowered
        the output error on held-out images at every rank measured, e.g. from 0.20 to
        0.10 for the second convolution at rank 32, and raised the test accuracy of
        the converted CNN at rank 8 from 0.51 to 0.70.
        ``fit_info["weighted_error"]`` is the fit's relative error in that metric;
        :attr:`fit_error` stays the kernel's relative error.

        Args:
            conv: The trained layer (``groups=1``; any subclass of the dense type).
            rank: The concrete rank.
            gram: The ``(in_channels, in_channels)`` Gram from ``calibration``, or ``None``.
            n_iter: Maximum ALS sweeps.
            tol: Stop when, averaged over 5 sweeps, a sweep changes the explained
                fraction of the kernel's energy (squared norm) by less than this and
                the relative error by less than ``10 * tol`` of itself (see
                :func:`~factorized_layers.decompose.cp_als`). With the default 1.5e-4,
                default-initialised kernels (128x64x3x3 at ranks 30--120, 64x32x3x3,
                256x256x3x3) and trained digits-CNN kernels stopped after 29--61
                sweeps at 0.991--1.0005x the error of 100 plain ALS sweeps
                (TensorLy's default count); on 36 smaller ones (8--32 channels, six
                seeds, ranks ``C_out / 2`` and ``C_out``) at 0.991--1.004x, median
                0.9996x.
            seed: Seed of the random initial columns needed when ``rank`` exceeds a
                mode's size (the global random state is not touched).
            whitening_ridge: Relative ridge of the channel whitening (used only with
                calibration; ``ridge`` is CP-ALS's own).
            **als_options: ``ridge``, ``compute_dtype``, ``extrapolate`` of :func:`cp_als`.

        Examples:
            >>> dense = nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect")
            >>> layer = CPConv2d.from_dense(dense, rank=24)
            >>> layer.padding_mode, layer.fit_error < 0.9
            ('reflect', True)
        """
        weight = conv.weight
        if gram is None:
            result = cp_factors(weight, rank, n_iter=n_iter, tol=tol, seed=seed, **als_options)
        else:
            result = whitened_cp_factors(
                weight,
                gram,
                rank,
                mode=1,
                whitening_ridge=whitening_ridge,
                n_iter=n_iter,
                tol=tol,
                seed=seed,
                **als_options,
            )
        config = {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": conv.kernel_size,
            "rank": rank,
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
        }
        attributes = {}
        if weight.device.type != "meta":
            attributes = {"fit_error": result.error, "fit_info": _fit_info(result)}
            if gram is not None:
                attributes["fit_info"]["weighted_error"] = result.error
                attributes["fit_error"] = _relative_error(weight, result.factors)
        return Fit(config, dict(zip(cls._factor_names(), result.factors)), attributes)

    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments (and :attr:`separable`) that rebuild this layer's structure.

        JSON-serialisable; ``from_config(layer.get_config())`` has the same parameter
        names, shapes and convolution options (freshly initialised values);
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
            "separable": self.separable,
        }

    @classmethod
    def _settings(cls) -> tuple:
        return ("separable",)

    def _apply_setting(self, name: str, value: Any) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"separable must be None, True or False, got {value!r}")
        self.separable = value

    def truncate_factors(self, rank: RankSpec, *, n_iter: int = 100, tol: float = 1e-7) -> Fit:
        """The factors of :meth:`truncated`: ALS on this layer's own factors.

        :func:`~factorized_layers.decompose.reduce_cp` starts from the ``rank``
        strongest components and runs ALS on the CP tensor itself, never forming the
        kernel, so a fine-tuned layer can be compressed further. :attr:`fit_error`
        is then the relative error with respect to *this* layer's kernel. Options,
        device, dtype, bias, ``requires_grad`` flags and ``training`` are kept.

        Args:
            rank: As the constructor's ``rank``; a rank above the current one keeps it.
            n_iter: Most ALS sweeps.
            tol: Stop when the relative error changes by less than this fraction.

        Examples:
            >>> layer = CPConv2d(8, 16, 3, rank=12)
            >>> layer.truncated(5).rank
            5
        """
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        new_rank = min(resolve_cp_rank(rank, shape), self.rank)
        names = self._factor_names()
        result = reduce_cp(
            [getattr(self, name) for name in names], new_rank, n_iter=n_iter, tol=tol
        )
        attributes = {}
        if self.in_channel_factor.device.type != "meta":
            attributes = {
                "fit_error": result.error,
                "fit_info": {**_fit_info(result), "truncated_from": self.rank},
            }
        config = dict(self.get_config(), rank=new_rank)
        return Fit(config, dict(zip(names, result.factors)), attributes)

    def extra_repr(self) -> str:
        n = self.dims
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}"
        )
        if self.padding != (0,) * n:
            text += f", padding={self.padding!r}"
        if self.dilation != (1,) * n:
            text += f", dilation={self.dilation}"
        text += f", bias={self.bias is not None}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text


@register_layer
class CPConv1d(_CPConvNd):
    """1-D convolution with a CP kernel: :class:`_CPConvNd` over ``(N, C, L)`` inputs.

    Factors: ``out_channel_factor``, ``in_channel_factor``, ``length_factor``.

    Examples:
        >>> layer = CPConv1d(16, 32, 5, rank=8, padding=2)
        >>> layer(torch.randn(2, 16, 40)).shape
        torch.Size([2, 32, 40])
        >>> CPConv1d.from_dense(nn.Conv1d(16, 32, 5), rank=0.5, seed=0).rank
        24
    """

    dims = 1
    source = ConvSource(1)


@register_layer
class CPConv2d(_CPConvNd):
    """2-D convolution with a CP kernel: :class:`_CPConvNd` over ``(N, C, H, W)`` inputs.

    Factors: ``out_channel_factor``, ``in_channel_factor``, ``height_factor``,
    ``width_factor``.

    Shape:
        - Input: ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)`` with ``nn.Conv2d``'s sizes.

    Examples:
        >>> layer = CPConv2d(16, 32, 3, rank=8, padding=1)
        >>> layer(torch.randn(2, 16, 10, 10)).shape
        torch.Size([2, 32, 10, 10])
        >>> dense = nn.Conv2d(16, 32, (5, 3), stride=2, padding="valid")
        >>> compressed = CPConv2d.from_dense(dense, rank=0.25, seed=0)
        >>> compressed.rank, compressed.fit_error < 1.0
        (34, True)
    """

    dims = 2
    source = ConvSource(2)


@register_layer
class CPConv3d(_CPConvNd):
    """3-D convolution with a CP kernel: :class:`_CPConvNd` over ``(N, C, D, H, W)`` inputs.

    Factors: ``out_channel_factor``, ``in_channel_factor``, ``depth_factor``,
    ``height_factor``, ``width_factor``.

    Examples:
        >>> layer = CPConv3d(8, 16, 3, rank=6, padding=1)
        >>> layer(torch.randn(2, 8, 6, 6, 6)).shape
        torch.Size([2, 16, 6, 6, 6])
    """

    dims = 3
    source = ConvSource(3)
