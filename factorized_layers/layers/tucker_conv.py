"""Tucker-2 convolutions (Kim et al. 2016): 1x1 ``in -> r_in``, kxk core ``r_in -> r_out``,
1x1 ``r_out -> out``.

:class:`TuckerConv2d` stores a convolution kernel ``(C_out, C_in, kH, kW)`` as a core
``(r_out, r_in, kH, kW)`` and two channel factors; the spatial modes stay whole. Its rank
arithmetic (:func:`resolve_tucker2_ranks`, :func:`tucker2_conv_params`,
:func:`tucker2_conv_flops`) lives here too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar, Dict, List, Tuple, Union

import torch
import torch.nn as nn

from ..decompose import (
    hooi,
    hosvd_energy,
    mode_dot,
    reduce_tucker,
    whiten_mode,
    whitened_tucker,
)
from ..functional import conv_padding_pairs, conv_tuple
from ..functional._conv import check_padding_mode
from ..functional.tucker_conv import tucker_conv_weight, tucker_convnd
from ..ranks import RankProfile, check_positive, evbmf_rank
from ..registry import Capabilities, register_layer
from ..sources import ConvSource
from .base import Calibration, FactorizedLayer, Fit, fast_parameter, gram_of, names_bad_input

__all__ = [
    "TuckerConv2d",
    "resolve_tucker2_ranks",
    "tucker2_conv_params",
    "tucker2_conv_flops",
]

_IntOrTuple = Union[int, Tuple[int, ...]]
Pair = Tuple[int, int]


# -- rank arithmetic ------------------------------------------------------------------


def tucker2_conv_params(out_channels: int, in_channels: int, kernel_size, ranks: Pair) -> int:
    """Weight parameters of a Tucker-2 kernel: core plus the channel factors that are stored.

    A channel mode at full rank (``rank == channels``) has no factor (folded into the
    core), so it costs nothing.

    Examples:
        >>> tucker2_conv_params(128, 64, (3, 3), (48, 24))
        18048
        >>> tucker2_conv_params(128, 64, (3, 3), (128, 64))  # the dense kernel
        73728
    """
    r_out, r_in = ranks
    params = r_out * r_in * math.prod(kernel_size)
    if r_out < out_channels:
        params += out_channels * r_out
    if r_in < in_channels:
        params += in_channels * r_in
    return params


def tucker2_conv_flops(
    out_channels: int, in_channels: int, kernel_size, ranks: Pair, stride=1
) -> int:
    """Multiply-accumulates of a Tucker-2 convolution per output position (bias excluded).

    The ``in -> r_in`` contraction runs on every *input* position (``prod(stride)`` per
    output position), the core convolution costs ``r_out * r_in * prod(kernel_size)``
    and ``r_out -> out`` runs per output position; folded modes cost nothing.

    Examples:
        >>> tucker2_conv_flops(128, 64, (3, 3), (48, 24))
        18048
        >>> tucker2_conv_flops(128, 64, (3, 3), (48, 24), stride=2)
        22656
    """
    r_out, r_in = ranks
    strides = (stride,) * len(kernel_size) if isinstance(stride, numbers.Integral) else stride
    flops = r_out * r_in * math.prod(kernel_size)
    if r_out < out_channels:
        flops += out_channels * r_out
    if r_in < in_channels:
        flops += in_channels * r_in * math.prod(strides)
    return flops


def _feasible(out_channels: int, in_channels: int, positions: int, r_out: int, r_in: int) -> Pair:
    """Clip a factored mode's rank to what the core can use: ``r <= other rank * kernel``.

    The core's unfolding along one channel mode has at most ``other rank *
    prod(kernel_size)`` independent rows; a higher rank is dead weight.
    """
    for _ in range(2):
        if r_out < out_channels:
            r_out = min(r_out, r_in * positions)
        if r_in < in_channels:
            r_in = min(r_in, r_out * positions)
    return r_out, r_in


def resolve_tucker2_ranks(spec: object, out_channels: int, in_channels: int, kernel_size) -> Pair:
    """Turn a rank spec into the channel ranks ``(r_out, r_in)`` of a Tucker-2 kernel.

    Args:
        spec: ``int`` -- both channel ranks, each clipped to its channel count;
            a pair ``(r_out, r_in)`` -- each in ``[1, channels]``; ``float`` in
            ``(0, 1]`` -- a fraction of the dense kernel's parameters: the ranks
            keep the ratio of the channel counts, ``r = max(1, floor(t * channels))``
            with the largest ``t`` whose :func:`tucker2_conv_params` fit (as Kim et
            al.'s and TensorLy-Torch's Tucker convolutions split a budget), e.g.
            ``0.25`` of a ``128 x 64 x 3 x 3`` kernel gives ``(49, 24)``. A factored
            rank above ``other rank * prod(kernel_size)`` is useless (the core
            cannot use it): an int or float is clipped there, a pair must respect it.
        out_channels: Output channels of the convolution.
        in_channels: Input channels.
        kernel_size: Kernel size per spatial dimension.

    Returns:
        ``(r_out, r_in)`` as plain ints.

    Raises:
        TypeError: ``spec`` is not an int, float or pair of ints.
        ValueError: A value out of range; the message names it and the valid range.

    Examples:
        >>> resolve_tucker2_ranks(0.25, 128, 64, (3, 3))
        (49, 24)
        >>> resolve_tucker2_ranks(100, 128, 64, (3, 3))
        (100, 64)
        >>> resolve_tucker2_ranks((32, 16), 128, 64, (3, 3))
        (32, 16)
    """
    out_channels = check_positive("out_channels", out_channels)
    in_channels = check_positive("in_channels", in_channels)
    kernel = tuple(kernel_size)
    positions = math.prod(kernel)
    if isinstance(spec, bool):
        raise TypeError(f"rank must be an int, a float or a pair of ints, got bool {spec!r}")
    if isinstance(spec, numbers.Integral):
        if spec < 1:
            raise ValueError(
                f"an int rank must be >= 1 (it is clipped to each channel count), got {spec}"
            )
        r = int(spec)
        return _feasible(
            out_channels, in_channels, positions, min(r, out_channels), min(r, in_channels)
        )
    if isinstance(spec, numbers.Real):
        return _fraction_ranks(float(spec), out_channels, in_channels, kernel, spec)
    if isinstance(spec, (tuple, list)):
        return _pair_ranks(tuple(spec), out_channels, in_channels, positions)
    raise TypeError(
        "rank must be an int, a float in (0, 1] or a pair (r_out, r_in) of ints, got "
        f"{type(spec).__name__} {spec!r}"
    )


def _fraction_ranks(
    fraction: float, out_channels: int, in_channels: int, kernel: tuple, spec: object
) -> Pair:
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"a float rank is a fraction of parameters in (0, 1], got {spec!r}")
    positions = math.prod(kernel)
    budget = fraction * out_channels * in_channels * positions
    best = None
    points = sorted({j / n for n in (out_channels, in_channels) for j in range(1, n + 1)})
    for t in points:
        ranks = _feasible(
            out_channels,
            in_channels,
            positions,
            max(1, int(math.floor(t * out_channels + 1e-9))),
            max(1, int(math.floor(t * in_channels + 1e-9))),
        )
        if tucker2_conv_params(out_channels, in_channels, kernel, ranks) <= budget + 1e-9:
            best = ranks
    if best is None:
        dense = out_channels * in_channels * positions
        smallest = tucker2_conv_params(out_channels, in_channels, kernel, (1, 1))
        raise ValueError(
            f"a float rank of {spec!r} allows {budget:.0f} parameters, but the smallest "
            f"Tucker-2 kernel ({out_channels}, {in_channels}, *{kernel}) with ranks (1, 1) "
            f"needs {smallest}; valid fractions are in [{smallest / dense:.4g}, 1]"
        )
    return best


def _pair_ranks(ranks: tuple, out_channels: int, in_channels: int, positions: int) -> Pair:
    if len(ranks) != 2:
        raise ValueError(
            f"a rank pair is (r_out, r_in): two ints, got {len(ranks)} values ({ranks!r})"
        )
    for name, r, n in (("r_out", ranks[0], out_channels), ("r_in", ranks[1], in_channels)):
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(r).__name__} {r!r}")
        if not 1 <= r <= n:
            raise ValueError(f"{name} must be in [1, {n}] (the channel count), got {r}")
    r_out, r_in = int(ranks[0]), int(ranks[1])
    for name, r, n, other in (
        ("r_out", r_out, out_channels, r_in),
        ("r_in", r_in, in_channels, r_out),
    ):
        cap = other * positions
        if cap < r < n:
            raise ValueError(
                f"{name}={r} is larger than the core allows: a factored channel rank must be "
                f"at most the other rank times the kernel positions ({cap}), i.e. in "
                f"[1, {cap}], or equal the channel count {n} (no factor)"
            )
    return r_out, r_in


# -- the layer ------------------------------------------------------------------------


def _kernel_tensor(weight: torch.Tensor) -> torch.Tensor:
    """The kernel as a 3-way tensor ``(C_out, C_in, prod(kernel_size))``."""
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def _relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||approximation - reference|| / ||reference||`` in float64 (NaN on meta)."""
    if reference.device.type == "meta":
        return math.nan
    norm = float(reference.double().norm())
    if norm == 0.0:
        return 0.0
    return float((approximation.double() - reference.double()).norm()) / norm


def _line(start: Pair, end: Pair, steps: int) -> List[Pair]:
    """``steps`` integer points after ``start`` on the segment to ``end`` (rounded)."""

    def at(a: int, b: int, s: int) -> int:
        return a + int(math.floor((b - a) * s / steps + 0.5))

    return [(at(start[0], end[0], s), at(start[1], end[1], s)) for s in range(1, steps + 1)]


class _TuckerConvNd(FactorizedLayer):
    r"""N-d convolution with a Tucker-2 kernel (base of :class:`TuckerConv2d`).

    :math:`W[o, i, \mathbf{k}] = \sum_{a, b} U[o, a]\, V[i, b]\, G[a, b, \mathbf{k}]` with
    the core ``G`` of shape ``(r_out, r_in, *kernel_size)``, the output-channel factor
    ``U`` ``(out_channels, r_out)`` and the input-channel factor ``V``
    ``(in_channels, r_in)``; ``r_out * r_in * prod(kernel_size) + out * r_out + in * r_in``
    weight parameters instead of ``out * in * prod(kernel_size)``. A channel mode at full
    rank has no factor (the attribute is ``None``, no ``state_dict`` key): its square
    factor is folded into the core. The forward pass
    (:func:`factorized_layers.functional.tucker_convnd`) is a 1x1 contraction
    ``in -> r_in``, the dense ``r_in -> r_out`` convolution with the core (carrying the
    stride, padding incl. ``'same'``/``'valid'``, dilation and ``padding_mode``), and a
    1x1 contraction ``r_out -> out`` with the bias; the intermediates are channels-last.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: ``int`` or one size per spatial dimension.
        rank: ``int`` (both channel ranks, clipped to the channel counts), a pair
            ``(r_out, r_in)``, or ``float`` in ``(0, 1]``: a fraction of the dense
            kernel's parameters split in the ratio of the channel counts
            (:func:`resolve_tucker2_ranks`).
        stride: ``int`` or tuple, as the dense convolution.
        padding: ``int``, tuple, ``'same'`` or ``'valid'``, as the dense convolution.
        dilation: ``int`` or tuple, as the dense convolution.
        bias: If ``False``, no additive bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
        groups: Only ``1``; grouped and depthwise convolutions stay dense.

    Attributes:
        core: ``(r_out, r_in, *kernel_size)`` learnable core.
        out_channel_factor: ``(out_channels, r_out)`` learnable factor, or ``None``
            (``r_out == out_channels``).
        in_channel_factor: ``(in_channels, r_in)`` learnable factor, or ``None``
            (``r_in == in_channels``).
        bias: ``(out_channels,)`` learnable bias, or ``None``.
        rank: The concrete channel ranks ``(r_out, r_in)``.
        fit_error: Relative Frobenius error of the kernel after :meth:`from_dense` or
            :meth:`truncated` (``None`` for a layer built otherwise).
        fit_info: ``dict`` with the HOOI sweeps (``n_iter``) and, with calibration, the
            relative error in the whitened metric (``weighted_error``).
    """

    dims: ClassVar[int]
    capabilities = Capabilities(
        calibration=True,
        rank_profile=True,
        truncation=True,
        ridge_option="whitening_ridge",
        profile_options=("whitening_ridge",),
        truncation_options=("n_iter", "tol"),
    )
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    rank: Pair
    stride: Tuple[int, ...]
    padding: Union[str, Tuple[int, ...]]
    dilation: Tuple[int, ...]
    padding_mode: str

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrTuple,
        rank: object,
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
        if groups != 1:
            dense = self.source.module_type.__name__
            raise ValueError(
                f"{type(self).__name__} supports groups=1 only, got groups={groups!r}; keep "
                f"grouped and depthwise convolutions as nn.{dense}"
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
        self.rank = resolve_tucker2_ranks(rank, out_channels, in_channels, self.kernel_size)
        r_out, r_in = self.rank
        self.fit_error: float | None = None
        self.fit_info: dict | None = None
        self.core = nn.Parameter(torch.empty((r_out, r_in) + self.kernel_size, **factory_kwargs))
        if r_out < out_channels:
            self.out_channel_factor = nn.Parameter(
                torch.empty((out_channels, r_out), **factory_kwargs)
            )
        else:
            self.register_parameter("out_channel_factor", None)
        if r_in < in_channels:
            self.in_channel_factor = nn.Parameter(
                torch.empty((in_channels, r_in), **factory_kwargs)
            )
        else:
            self.register_parameter("in_channel_factor", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that ``dense_weight()`` has the dense convolution's default variance.

        ``nn.Conv{n}d`` draws ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, variance
        ``1/(3 fan_in)`` with ``fan_in = in * prod(kernel_size)``. Each factor entry is
        drawn from ``U(-sqrt(3/n), sqrt(3/n))`` (variance ``1/n`` for ``n`` channels,
        the scale of orthonormal columns), so a kernel entry, a sum of
        ``r_out * r_in`` products, has variance ``var(core) * prod(r / n)`` over the
        stored factors; the core is drawn uniformly with
        ``var(core) = 1/(3 fan_in) * prod(n / r)``. The bias is drawn as the dense
        convolution's.
        """
        fan_in = self.in_channels * math.prod(self.kernel_size)
        ratio = 1.0
        for factor in (self.out_channel_factor, self.in_channel_factor):
            if factor is not None:
                n, r = factor.shape
                bound = math.sqrt(3.0 / n)
                nn.init.uniform_(factor, -bound, bound)
                ratio *= n / r
        core_bound = math.sqrt(ratio / fan_in)
        nn.init.uniform_(self.core, -core_bound, core_bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @names_bad_input
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return tucker_convnd(
            input,
            fast_parameter(self, "core"),
            fast_parameter(self, "out_channel_factor"),
            fast_parameter(self, "in_channel_factor"),
            fast_parameter(self, "bias"),
            self.stride,
            self.padding,
            self.dilation,
            self.padding_mode,
        )

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in, *kernel_size)`` kernel the factors represent (differentiable)."""
        return tucker_conv_weight(self.core, self.out_channel_factor, self.in_channel_factor)

    def flops_per_position(self) -> int:
        """Multiply-accumulates per output position (all output channels), bias excluded."""
        return tucker2_conv_flops(
            self.out_channels, self.in_channels, self.kernel_size, self.rank, self.stride
        )

    @classmethod
    def unsupported_reason(cls, conv: nn.Module) -> str | None:
        """Why ``conv`` cannot be converted (``None`` when it can); used by ``factorize_``."""
        if conv.groups != 1:
            dense = cls.source.module_type.__name__
            return f"groups={conv.groups}: grouped/depthwise convolutions stay nn.{dense}"
        return None

    @classmethod
    def plain_rank(cls, conv: nn.Module, spec: object) -> Pair:
        """The channel ranks of an ``int``/pair/``float`` spec (:func:`resolve_tucker2_ranks`)."""
        return resolve_tucker2_ranks(spec, conv.out_channels, conv.in_channels, conv.kernel_size)

    @classmethod
    def rank_profile(
        cls,
        conv: nn.Module,
        *,
        calibration: Calibration = None,
        whitening_ridge: float = 1e-6,
    ) -> RankProfile:
        """Channel-rank pairs with their parameters, FLOPs and errors for rank policies.

        One knob moves both channel ranks along a line: from ``(1, 1)`` through the
        pair ``(e_out, e_in)`` that EVBMF (Nakajima et al. 2013) keeps on the two
        channel unfoldings of the kernel -- ``(out, in * prod(k))`` and
        ``(in, out * prod(k))``, as Kim et al. 2016 choose Tucker-2 ranks -- and on to
        the full ranks ``(out, in)``, which reproduce the kernel. Candidate ``j`` of the
        first part has the larger EVBMF rank ``j``, so the standard
        :class:`~factorized_layers.ranks.EVBMF` policy (which reads the ``spectrum`` of
        that unfolding) selects exactly ``(e_out, e_in)``; ``Energy``, ``ErrorBound``
        and ``Budget`` move along the same line, whose slope is the data's own estimate
        of how compressible each channel mode is. (EVBMF ranks below 1 count as 1.)

        ``errors`` are the exact truncated-HOSVD errors of each pair (from the squared
        all-orthogonal core, :func:`~factorized_layers.decompose.hosvd_energy`): HOOI in
        :meth:`from_dense` never does worse, so these are upper bounds and a policy's
        error target is met. With calibration the kernel is whitened along its input
        channels first (:func:`~factorized_layers.decompose.whiten_mode`), the metric
        :meth:`from_dense` then fits in, and EVBMF runs on the whitened unfoldings.

        Args:
            conv: The dense convolution.
            calibration: ``InputStats`` of the layer's input channels or their
                ``(in_channels, in_channels)`` Gram matrix.
            whitening_ridge: Relative ridge of the whitening (with calibration only),
                as in :meth:`from_dense`.
        """
        cls.source.check(conv, cls.__name__)
        weight = conv.weight.detach()
        out_channels, in_channels = weight.shape[:2]
        kernel = tuple(conv.kernel_size)
        positions = math.prod(kernel)
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        tensor = _kernel_tensor(weight).to(compute)
        gram = gram_of(calibration)
        if gram is not None:
            tensor = whiten_mode(tensor, gram, 1, ridge=whitening_ridge, compute_dtype=compute)
        _, energy = hosvd_energy(tensor, compute_dtype=compute)
        channel_energy = energy.sum(-1)  # (min(out, in*k), min(in, out*k)), float64
        spectra = (
            [math.sqrt(max(v, 0.0)) for v in channel_energy.sum(1).tolist()],
            [math.sqrt(max(v, 0.0)) for v in channel_energy.sum(0).tolist()],
        )
        sizes = (out_channels, in_channels)
        others = (in_channels * positions, out_channels * positions)
        found = tuple(
            max(1, evbmf_rank(s, n, m, sum(v * v for v in s)))
            for s, n, m in zip(spectra, sizes, others)
        )
        lead = 0 if found[0] >= found[1] else 1
        anchor = (found[0], found[1])
        dense = out_channels * in_channels * positions

        def feasible(pairs: List[Pair]) -> List[Pair]:
            return [_feasible(out_channels, in_channels, positions, max(1, a), max(1, b))
                    for a, b in pairs]  # fmt: skip

        # Candidate j - 1 of the first part has the larger EVBMF rank j (kept whole);
        # past the anchor only pairs that save parameters, then the exact full ranks.
        pairs = feasible(_line((0, 0), anchor, found[lead]))
        rest = feasible(_line(anchor, sizes, max(n - e for n, e in zip(sizes, anchor))))
        pairs += [
            p
            for p in rest[:-1]
            if tucker2_conv_params(out_channels, in_channels, kernel, p) < dense
        ] + rest[-1:]
        cumulative = channel_energy.cumsum(0).cumsum(1)
        total = float(cumulative[-1, -1])
        limits = tuple(channel_energy.shape)

        def error(pair: Pair) -> float:
            if total <= 0.0:
                return 0.0
            kept = float(cumulative[min(pair[0], limits[0]) - 1, min(pair[1], limits[1]) - 1])
            return math.sqrt(max(total - kept, 0.0) / total)

        return RankProfile(
            ranks=tuple(pairs),
            params=tuple(tucker2_conv_params(out_channels, in_channels, kernel, p) for p in pairs),
            flops=tuple(
                tucker2_conv_flops(out_channels, in_channels, kernel, p, conv.stride) for p in pairs
            ),
            errors=tuple(error(p) for p in pairs),
            dense_params=dense,
            dense_flops=dense,
            spectrum=tuple(spectra[lead]),
            rows=sizes[lead],
            cols=others[lead],
        )

    @classmethod
    def fit_factors(
        cls,
        conv: nn.Module,
        rank: Pair,
        *,
        gram: torch.Tensor | None = None,
        n_iter: int = 20,
        tol: float = 1e-5,
        compute_dtype: torch.dtype | None = None,
        whitening_ridge: float = 1e-6,
    ) -> Fit:
        """Tucker-2 factors of a trained convolution by HOSVD + HOOI: the fit of :meth:`from_dense`.

        ``from_dense(conv, rank, calibration=None, **options)`` takes these options.
        The kernel, seen as ``(out, in, prod(kernel_size))``, is decomposed with the
        spatial mode kept whole: HOSVD on the two channel modes (leading left singular
        vectors of each unfolding), then HOOI sweeps
        (:func:`~factorized_layers.decompose.hooi`; the best iterate is kept, so the
        error is never above the HOSVD's). Full ranks reproduce the kernel exactly
        (identity factors, folded). Runs under ``no_grad`` on the kernel's device in
        float32 (float64 for float64 kernels or with ``compute_dtype=torch.float64``),
        then cast back; every convolution option is kept.

        With ``calibration`` (the Gram of the input channels over all batch elements
        and positions, from :func:`factorized_layers.calibrate.calibrate`) the kernel is
        fitted in the metric of that Gram
        (:func:`~factorized_layers.decompose.whitened_tucker` on the kernel as
        ``(out, prod(k), in)``): the input-channel mode is whitened by the Gram's root,
        HOOI runs there, the input factor is mapped back without inverting the Gram
        and the core is refit for the whole Gram; plain HOOI's factors compete with the
        same refit, so the result is never worse on that metric.
        ``fit_info["weighted_error"]`` is its relative error; :attr:`fit_error` stays
        the kernel's.

        Args:
            conv: The trained convolution (``groups=1``; any subclass of the dense type).
            rank: The concrete ``(r_out, r_in)``.
            gram: The ``(in_channels, in_channels)`` Gram from ``calibration``, or ``None``.
            n_iter: Most HOOI sweeps. On 256x256 and 512x512 3x3 kernels at 10% of
                the parameters, kernels with decaying channel spectra converged in 2
                sweeps; default-initialised ones keep improving slowly: after 20
                sweeps the error was within 0.01% of 30 sweeps' and below tensorly's
                ``tucker`` (TensorLy-Torch's ``from_conv``), HOSVD alone about 3%
                above it.
            tol: HOOI stops when a sweep lowers the relative error by less.
            compute_dtype: ``torch.float32`` or ``torch.float64``.
            whitening_ridge: Relative ridge of the whitening (with calibration only).

        Examples:
            >>> dense = nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")
            >>> layer = TuckerConv2d.from_dense(dense, rank=(8, 4))
            >>> layer.rank, layer.padding_mode, layer.fit_error < 0.9
            ((8, 4), 'reflect', True)
        """
        weight = conv.weight
        out_channels, in_channels = weight.shape[:2]
        r_out, r_in = rank
        meta = weight.device.type == "meta"
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if compute_dtype is not None:
            dtype = compute_dtype
        tensor = _kernel_tensor(weight.detach())
        work = tensor if meta else tensor.to(dtype)
        positions = tensor.shape[2]
        info: Dict[str, Any] = {}
        if gram is None:
            result = hooi(work, (r_out, r_in, positions), n_iter=n_iter, tol=tol,
                          compute_dtype=compute_dtype)  # fmt: skip
            core, (out_factor, in_factor, _) = result.core, result.factors
        else:
            result = whitened_tucker(
                work.transpose(1, 2),
                gram,
                (r_out, positions, r_in),
                in_modes=1,
                ridge=whitening_ridge,
                n_iter=n_iter,
                tol=tol,
                compute_dtype=compute_dtype,
            )
            core = result.core.transpose(1, 2)
            out_factor, _, in_factor = result.factors
            info["weighted_error"] = result.error
        info["n_iter"] = result.n_iter
        factors: Dict[str, torch.Tensor] = {}
        for mode, (name, factor, r, n) in enumerate(
            (
                ("out_channel_factor", out_factor, r_out, out_channels),
                ("in_channel_factor", in_factor, r_in, in_channels),
            )
        ):
            if r < n:
                factors[name] = factor
            elif not meta and not torch.equal(
                factor, torch.eye(n, dtype=factor.dtype, device=factor.device)
            ):
                core = mode_dot(core, factor, mode)  # fold a square factor (a rotation)
        factors["core"] = core.reshape((r_out, r_in) + tuple(conv.kernel_size))
        config = {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": tuple(conv.kernel_size),
            "rank": (r_out, r_in),
            "stride": tuple(conv.stride),
            "padding": conv.padding,
            "dilation": tuple(conv.dilation),
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
        }
        attributes = {}
        if not meta:
            approximation = tucker_conv_weight(
                factors["core"],
                factors.get("out_channel_factor"),
                factors.get("in_channel_factor"),
            )
            attributes = {
                "fit_error": _relative_error(work.reshape(weight.shape), approximation),
                "fit_info": info,
            }
        return Fit(config, factors, attributes)

    def truncate_factors(self, rank: object, *, n_iter: int = 30, tol: float = 1e-6) -> Fit:
        """The factors of :meth:`truncated`: lower channel ranks from the layer's own parts.

        :func:`~factorized_layers.decompose.reduce_tucker` orthonormalises the channel
        factors (``U = Q R``), absorbs the ``R`` into the small core, runs HOSVD and HOOI
        on that core and folds the ``Q`` back into the new factors -- exactly HOOI of
        ``dense_weight()`` (spatial mode whole), which is never formed. A fine-tuned
        layer can so be compressed further; :attr:`fit_error` is then relative to
        *this* layer's kernel. Options, device, dtype, bias, ``requires_grad`` flags and
        ``training`` are kept.

        Args:
            rank: As the constructor's ``rank``; each channel rank is capped at its
                current one.
            n_iter: Most HOOI sweeps.
            tol: HOOI's stopping threshold.

        Examples:
            >>> layer = TuckerConv2d(16, 32, 3, rank=(24, 12))
            >>> layer.truncated((8, 4)).rank
            (8, 4)
        """
        requested = resolve_tucker2_ranks(
            rank, self.out_channels, self.in_channels, self.kernel_size
        )
        positions = math.prod(self.kernel_size)
        ranks = _feasible(
            self.out_channels,
            self.in_channels,
            positions,
            *(min(r, current) for r, current in zip(requested, self.rank)),
        )
        core = self.core.reshape(self.rank + (positions,))
        result = reduce_tucker(
            core,
            [self.out_channel_factor, self.in_channel_factor, None],
            ranks + (positions,),
            n_iter=n_iter,
            tol=tol,
        )
        meta = core.device.type == "meta"
        new_core = result.core
        values: Dict[str, torch.Tensor] = {}
        names = ("out_channel_factor", "in_channel_factor")
        sizes = (self.out_channels, self.in_channels)
        for mode, (name, factor, r, n) in enumerate(zip(names, result.factors, ranks, sizes)):
            if r < n:
                values[name] = factor
            elif not meta:
                new_core = mode_dot(new_core, factor, mode)
        values["core"] = new_core.reshape(ranks + self.kernel_size)
        attributes = {}
        if not meta:
            attributes = {
                "fit_error": result.error,
                "fit_info": {"n_iter": result.n_iter, "truncated_from": self.rank},
            }
        return Fit(dict(self.get_config(), rank=list(ranks)), values, attributes)

    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this layer's structure (JSON-serialisable).

        ``from_config(layer.get_config())`` has the same parameter names and shapes,
        folded modes included, and the same convolution options (freshly initialised
        values); :func:`factorized_layers.checkpoint.save_factorized` stores it.
        """
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "rank": list(self.rank),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
        }

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
class TuckerConv2d(_TuckerConvNd):
    """2-D Tucker-2 convolution: :class:`_TuckerConvNd` over ``(N, C, H, W)`` inputs.

    The compressed form of Kim et al. 2016 ("Compression of Deep Convolutional Neural
    Networks for Fast and Low Power Mobile Applications"): a 1x1 convolution
    ``in -> r_in``, a ``kH x kW`` convolution ``r_in -> r_out`` with the core, a 1x1
    convolution ``r_out -> out`` with the bias. Parameters: ``core``,
    ``out_channel_factor``, ``in_channel_factor`` (a factor is ``None`` when its rank
    equals its channel count), ``bias``.

    Shape:
        - Input: ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)`` with ``nn.Conv2d``'s sizes.

    Examples:
        >>> layer = TuckerConv2d(16, 32, 3, rank=(12, 6), padding=1)
        >>> layer(torch.randn(2, 16, 10, 10)).shape
        torch.Size([2, 32, 10, 10])
        >>> dense = nn.Conv2d(64, 128, 3, stride=2, padding="valid")
        >>> compressed = TuckerConv2d.from_dense(dense, rank=0.25)
        >>> compressed.rank, compressed.fit_error < 1.0
        ((49, 24), True)
        >>> full = TuckerConv2d.from_dense(dense, rank=(128, 64))
        >>> full.in_channel_factor is None and full.out_channel_factor is None
        True
    """

    dims = 2
    source = ConvSource(2)
