"""CP-decomposed (CANDECOMP/PARAFAC) convolution."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Tuple, Union

import torch
import torch.nn as nn

from ..decompose import cp_factors, cp_to_tensor, reduce_cp, whiten_mode, whitened_cp_factors
from ..functional import (
    PADDING_MODES,
    conv_padding_pairs,
    conv_tuple,
    cp_conv2d,
    cp_conv_separable,
    cp_merged_kernel,
)
from ..ranks import (
    RankPolicy,
    RankProfile,
    RankSpec,
    check_positive,
    cp_conv_flops,
    cp_max_rank,
    cp_params,
    dense_conv_flops,
    resolve_cp_rank,
)
from .base import (
    ConfigMixin,
    check_source,
    fill_dense,
    layer_from_config,
    resolve_layer_rank,
    trainable_like,
)
from .svd import Calibration, _gram_of

__all__ = ["CPConv2d"]

_IntOr2 = Union[int, Tuple[int, int]]


def _fit_info(result) -> Dict[str, Any]:
    """The ALS run's report kept in :attr:`CPConv2d.fit_info`."""
    return {
        "n_iter": result.n_iter,
        "converged": result.converged,
        "degenerate": result.degenerate,
        "ridge": result.ridge,
    }


class CPConv2d(ConfigMixin, nn.Module):
    r"""2-D convolution whose kernel is a rank-``R`` CP tensor.

    :math:`W[o, i, h, w] = \sum_r O[o, r]\, I[i, r]\, K_h[h, r]\, K_w[w, r]` with four
    factors of ``R`` columns each; only the factors are stored,
    ``R * (out + in + kH + kW)`` weight parameters instead of ``out * in * kH * kW``.
    The forward pass (:func:`factorized_layers.functional.cp_conv2d`) is

    1. a channel contraction ``in -> R`` (one GEMM written channels-last; it
       measured as fast as or faster than a 1x1 convolution and the opt_einsum
       contraction),
    2. a depthwise convolution with ``groups=R`` carrying the stride, dilation and
       padding exactly as ``F.conv2d`` (``padding_mode`` applied with ``F.pad`` like
       ``nn.Conv2d``, ``'same'`` with even kernels padded at the end like
       ``F.conv2d``): one merged ``kH x kW`` kernel (outer product of the two spatial
       factors) when ``kH * kW <= 3 * (kH + kW)``, two 1-D passes otherwise -- the
       crossover measured on CPU between 5x5 (merged 1.2-2x faster) and 7x7
       (separable 1.2x faster), see
       :func:`factorized_layers.functional.cp_conv_separable`;
       set :attr:`separable` to force either form,
    3. a channel contraction ``R -> out``, then the bias.

    The intermediate ``R``-channel tensors are channels-last whatever the input's
    format (depthwise convolutions ran 2-9x faster that way on CPU); the layout
    change is folded into the two GEMMs (any copy torch makes for a transposed
    operand is inside the layer's time, and the benchmark compares against
    ``nn.Conv2d`` on the same input), and the output has the memory format
    ``nn.Conv2d`` returns for that input.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: ``int`` or ``(kH, kW)``.
        rank: ``int`` in ``[1, cp_max_rank]`` or ``float`` in ``(0, 1]``: the fraction
            of the dense kernel's parameters to keep, see
            :func:`factorized_layers.ranks.resolve_cp_rank`.
        stride: ``int`` or pair, as ``nn.Conv2d``.
        padding: ``int``, pair, ``'same'`` or ``'valid'``, as ``nn.Conv2d``.
        dilation: ``int`` or pair, as ``nn.Conv2d``.
        bias: If ``False``, no additive bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
        groups: Only ``1``; grouped and depthwise convolutions should stay
            ``nn.Conv2d`` (a depthwise kernel is already as cheap as its CP form).

    Shape:
        - Input: ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)`` with ``nn.Conv2d``'s sizes.

    Attributes:
        out_channel_factor: ``(out_channels, rank)`` learnable factor.
        in_channel_factor: ``(in_channels, rank)`` learnable factor.
        height_factor: ``(kH, rank)`` learnable factor.
        width_factor: ``(kW, rank)`` learnable factor.
        bias: ``(out_channels,)`` learnable bias, or ``None``.
        rank: The concrete rank (``int``).
        separable: ``None`` (the measured rule), ``True`` or ``False``: depthwise form.
        fit_error: Relative Frobenius error of the kernel fit after :meth:`from_dense`
            (``None`` for a layer built otherwise).
        fit_info: ``dict`` with the CP-ALS sweeps, convergence and degeneracy flags
            and final ridge after :meth:`from_dense` (``None`` otherwise).

    Examples:
        >>> layer = CPConv2d(16, 32, 3, rank=8, padding=1)
        >>> layer(torch.randn(2, 16, 10, 10)).shape
        torch.Size([2, 32, 10, 10])
        >>> dense = nn.Conv2d(16, 32, (5, 3), stride=2, padding="valid")
        >>> compressed = CPConv2d.from_dense(dense, rank=0.25, seed=0)
        >>> compressed.rank, compressed.fit_error < 1.0
        (34, True)
    """

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
    kernel_size: Tuple[int, int]
    rank: int
    stride: Tuple[int, int]
    padding: Union[str, Tuple[int, int]]
    dilation: Tuple[int, int]
    padding_mode: str

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOr2,
        rank: RankSpec,
        stride: _IntOr2 = 1,
        padding: Union[str, _IntOr2] = 0,
        dilation: _IntOr2 = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        groups: int = 1,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if groups != 1:
            raise ValueError(
                f"CPConv2d supports groups=1 only, got groups={groups!r}; keep grouped and "
                "depthwise convolutions as nn.Conv2d (a depthwise kernel is already as "
                "cheap as its CP form), or factorize each group's nn.Conv2d separately"
            )
        self.in_channels = check_positive("in_channels", in_channels)
        self.out_channels = check_positive("out_channels", out_channels)
        self.kernel_size = conv_tuple(kernel_size, 2, "kernel_size")
        self.stride = conv_tuple(stride, 2, "stride")
        self.dilation = conv_tuple(dilation, 2, "dilation")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        # Validates the padding (and 'same' with stride 1) once, at construction.
        conv_padding_pairs(padding, self.kernel_size, self.dilation, self.stride)
        self.padding = padding if isinstance(padding, str) else conv_tuple(padding, 2, "padding", 0)
        self.rank = resolve_cp_rank(rank, (out_channels, in_channels) + self.kernel_size)
        self.separable: bool | None = None
        self.fit_error: float | None = None
        self.fit_info: dict | None = None
        kh, kw = self.kernel_size
        self.out_channel_factor = nn.Parameter(
            torch.empty((out_channels, self.rank), **factory_kwargs)
        )
        self.in_channel_factor = nn.Parameter(
            torch.empty((in_channels, self.rank), **factory_kwargs)
        )
        self.height_factor = nn.Parameter(torch.empty((kh, self.rank), **factory_kwargs))
        self.width_factor = nn.Parameter(torch.empty((kw, self.rank), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that ``dense_weight()`` has ``nn.Conv2d``'s default variance.

        ``nn.Conv2d`` draws ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
        ``fan_in = in * kH * kW`` (variance ``1/(3 fan_in)``). Here the input-channel
        and spatial factors get unit-variance-per-fan uniforms (variances ``1/in``,
        ``1/kH``, ``1/kW``) and the output-channel factor ``U(-1/sqrt(R), 1/sqrt(R))``
        (variance ``1/(3R)``); a sum of ``R`` independent products then has variance
        ``R / (in kH kW 3R) = 1/(3 fan_in)``. The bias is drawn as ``nn.Conv2d``'s.
        """
        kh, kw = self.kernel_size
        for factor, fan in (
            (self.in_channel_factor, self.in_channels),
            (self.height_factor, kh),
            (self.width_factor, kw),
        ):
            bound = math.sqrt(3.0 / fan)
            nn.init.uniform_(factor, -bound, bound)
        bound = 1.0 / math.sqrt(self.rank)
        nn.init.uniform_(self.out_channel_factor, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * kh * kw)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return cp_conv2d(
            input,
            self.out_channel_factor,
            self.in_channel_factor,
            self.height_factor,
            self.width_factor,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.padding_mode,
            self.separable,
        )

    def uses_separable(self) -> bool:
        """Whether the forward pass runs two 1-D depthwise passes (else one merged kernel)."""
        if self.separable is None:
            return cp_conv_separable(self.kernel_size)
        return bool(self.separable)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in, kH, kW)`` kernel the factors represent (differentiable)."""
        spatial = cp_merged_kernel((self.height_factor, self.width_factor)).squeeze(1)
        return torch.einsum(
            "or,ir,rhw->oihw", self.out_channel_factor, self.in_channel_factor, spatial
        )

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with identical options computing the same function."""
        weight = self.dense_weight().detach()
        with torch.device("meta"):
            dense = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                bias=self.bias is not None,
                padding_mode=self.padding_mode,
                dtype=weight.dtype,
            )
        return fill_dense(dense, self, weight)

    def flops_per_position(self) -> int:
        """Multiply-accumulates per output pixel (all output channels), bias excluded."""
        return cp_conv_flops(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.rank,
            self.stride,
            separable=self.uses_separable(),
        )

    @classmethod
    def unsupported_reason(cls, conv: nn.Conv2d) -> str | None:
        """Why ``conv`` cannot be converted (``None`` when it can); used by ``factorize_``."""
        if conv.groups != 1:
            return f"groups={conv.groups}: grouped/depthwise convolutions stay nn.Conv2d"
        return None

    @classmethod
    def rank_profile(
        cls,
        conv: nn.Conv2d,
        *,
        calibration: Calibration = None,
        whitening_ridge: float = 1e-6,
    ) -> RankProfile:
        """CP ranks with their parameters, FLOPs and an error *estimate* for rank policies.

        Fitting CP at every rank would cost a CP-ALS per candidate, so the error of
        rank ``R`` is estimated by the best rank-``R`` error of the kernel's
        ``(out, in * kh * kw)`` unfolding (Eckart--Young). That is a lower bound of
        the CP error (0 from the unfolding's rank on), so policies on CP layers are
        optimistic: ``Energy``/``ErrorBound`` targets are not guaranteed and ``Budget``
        under-allocates to convolutions; the report gives the fitted error.
        Candidates are the ranks that save parameters, at most
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
        check_source(conv, nn.Conv2d)
        weight = conv.weight.detach()
        out_channels = weight.shape[0]
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        gram = _gram_of(calibration)
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
                    separable=cp_conv_separable(conv.kernel_size),
                )
                for r in ranks
            ),  # fmt: skip
            errors=tuple(errors),
            dense_params=weight.numel(),
            dense_flops=dense_conv_flops(conv.in_channels, out_channels, conv.kernel_size),
            spectrum=tuple(singular_values),
            rows=unfolding.shape[0],
            cols=unfolding.shape[1],
        )

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rank: RankSpec | RankPolicy,
        *,
        n_iter: int = 100,
        tol: float = 1.5e-4,
        seed: int | None = None,
        calibration: Calibration = None,
        whitening_ridge: float = 1e-6,
        **als_options: Any,
    ) -> CPConv2d:
        """CP approximation of a trained ``nn.Conv2d`` kernel by CP-ALS.

        :func:`factorized_layers.decompose.cp_als` runs under ``no_grad`` on the
        kernel's device in float32 (float64 for float64 kernels or with
        ``compute_dtype=torch.float64``): HOSVD initialisation, column
        normalisation each sweep, a small ridge, momentum, stopping when the fit
        (the explained share of the kernel's energy) stops changing, and a
        degeneracy guard. The weights are spread evenly over the four
        factors before the cast back to the kernel's dtype. Every ``nn.Conv2d``
        option (stride, padding incl. ``'same'``/``'valid'``, dilation,
        ``padding_mode``) is kept, the bias is copied (a bias-free source gives a
        bias-free layer) and the ``training`` flag is kept. The fit's relative error
        is in :attr:`fit_error`, the rest of the report in :attr:`fit_info`. A
        meta-device source gives a meta-device layer without computing.

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
            conv: The trained layer (``groups=1``; any ``nn.Conv2d`` subclass).
            rank: Rank spec (see :func:`factorized_layers.ranks.resolve_cp_rank`) or a
                rank policy, evaluated on :meth:`rank_profile`.
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
            calibration: ``InputStats`` of the input channels or their
                ``(in_channels, in_channels)`` Gram matrix, or ``None``.
            whitening_ridge: Relative ridge of the channel whitening (used only with
                calibration; ``ridge`` is CP-ALS's own).
            **als_options: ``ridge``, ``compute_dtype``, ``extrapolate`` of :func:`cp_als`.

        Returns:
            A new :class:`CPConv2d`; ``conv`` is left unchanged.

        Raises:
            TypeError: If ``conv`` is not an ``nn.Conv2d``.
            ValueError: Grouped source, bad rank, non-finite kernel.

        Examples:
            >>> dense = nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect")
            >>> layer = CPConv2d.from_dense(dense, rank=24)
            >>> layer.padding_mode, layer.fit_error < 0.9
            ('reflect', True)
        """
        check_source(conv, nn.Conv2d)
        if conv.groups != 1:
            raise ValueError(
                f"CPConv2d supports groups=1 only, got a source with groups={conv.groups}; "
                "keep grouped and depthwise convolutions as nn.Conv2d (a depthwise kernel is "
                "already as cheap as its CP form)"
            )
        weight = conv.weight
        gram = _gram_of(calibration)
        rank = resolve_layer_rank(
            cls,
            conv,
            rank,
            lambda spec: resolve_cp_rank(spec, tuple(weight.shape)),
            calibration=gram,
            whitening_ridge=whitening_ridge,
        )
        with torch.device("meta"):
            layer = cls(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                rank,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
                dtype=weight.dtype,
            )
        with torch.no_grad():
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
            out_f, in_f, height_f, width_f = result.factors
            layer.out_channel_factor = trainable_like(out_f, weight)
            layer.in_channel_factor = trainable_like(in_f, weight)
            layer.height_factor = trainable_like(height_f, weight)
            layer.width_factor = trainable_like(width_f, weight)
            if conv.bias is not None:
                layer.bias = trainable_like(conv.bias.detach().clone(), conv.bias)
        if weight.device.type != "meta":
            layer.fit_error = result.error
            layer.fit_info = _fit_info(result)
            if gram is not None:
                layer.fit_info["weighted_error"] = result.error
                with torch.no_grad():
                    reference = weight.detach().double()
                    fitted = cp_to_tensor(None, result.factors).double()
                    norm = float(reference.norm())
                    layer.fit_error = float((fitted - reference).norm()) / norm if norm else 0.0
        return layer.train(conv.training)

    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments (and :attr:`separable`) that rebuild this layer's structure.

        JSON-serialisable; ``CPConv2d.from_config(layer.get_config())`` has the same
        parameter names, shapes and convolution options (freshly initialised values);
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
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CPConv2d:
        """A freshly initialised layer with the structure ``config`` (from :meth:`get_config`).

        ``separable`` is not a constructor argument; it is set on the built layer.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"CPConv2d.from_config expects a dict, got {config!r}")
        options = dict(config)
        separable = options.pop("separable", None)
        if separable is not None and not isinstance(separable, bool):
            raise TypeError(f"separable must be None, True or False, got {separable!r}")
        layer = layer_from_config(cls, options, device, dtype)
        layer.separable = separable
        return layer

    def truncated(self, rank: RankSpec, *, n_iter: int = 100, tol: float = 1e-7) -> CPConv2d:
        """A lower-rank copy fitted to this layer's kernel by ALS on its own factors.

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
        layer = type(self).from_config(
            dict(self.get_config(), rank=new_rank),
            device="meta",
            dtype=self.in_channel_factor.dtype,
        )
        names = ("out_channel_factor", "in_channel_factor", "height_factor", "width_factor")
        old = [getattr(self, name) for name in names]
        with torch.no_grad():
            result = reduce_cp(old, new_rank, n_iter=n_iter, tol=tol)
            for name, factor, source in zip(names, result.factors, old):
                setattr(layer, name, trainable_like(factor, source))
            if self.bias is not None:
                layer.bias = trainable_like(self.bias.detach().clone(), self.bias)
        if self.in_channel_factor.device.type != "meta":
            layer.fit_error = result.error
            layer.fit_info = {**_fit_info(result), "truncated_from": self.rank}
        return layer.train(self.training)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        text += f", bias={self.bias is not None}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text
