"""Low-rank (truncated SVD) linear layer."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decompose import (
    low_rank_factors,
    reduce_low_rank,
    whitened_low_rank_factors,
    whitened_singular_values,
)
from ..functional import check_linear_input, svd_linear
from ..functional.int8 import int8_linear, quantize_rows
from ..ranks import (
    RankProfile,
    RankSpec,
    check_positive,
    low_rank_break_even,
    resolve_matrix_rank,
)
from ..registry import Capabilities, register_layer
from ..sources import LinearSource
from .base import Calibration, FactorizedLayer, Fit, fast_parameter, gram_of, names_bad_input

__all__ = ["DynamicInt8SVDLinear", "SVDLinear"]


@register_layer
class SVDLinear(FactorizedLayer):
    r"""Linear layer whose weight is a rank-``r`` product ``output_factor @ input_factor``.

    :math:`y = x A^T B^T + b` with ``A = input_factor`` of shape ``(rank, in_features)``
    and ``B = output_factor`` of shape ``(out_features, rank)``. Only the factors are
    stored: ``rank * (in_features + out_features)`` weight parameters instead of
    ``in_features * out_features``.

    The forward pass runs the two GEMMs in the order opt_einsum plans for
    ``"bi,ri,or->bo"``: input first (two ``F.linear`` calls, fastest measured) for
    every rank that saves parameters, and the cached per-batch-size plan above the
    break-even rank, where building ``B @ A`` first can be cheaper for large batches.
    Calling the two ``F.linear`` directly measured faster than running the opt_einsum
    expression itself (no per-call Python dispatch); see ``benchmarks/README.md``.

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        rank: ``int`` in ``[1, min(in_features, out_features)]``, or ``float`` in
            ``(0, 1]``: the fraction of the dense weight's parameters to keep.
        bias: If ``False``, the layer has no additive bias.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Attributes:
        input_factor: ``(rank, in_features)`` learnable factor.
        output_factor: ``(out_features, rank)`` learnable factor.
        bias: ``(out_features,)`` learnable bias, or ``None``.
        rank: The concrete rank (``int``).

    Examples:
        >>> layer = SVDLinear(128, 64, rank=16)
        >>> layer(torch.randn(8, 128)).shape
        torch.Size([8, 64])
        >>> dense = nn.Linear(128, 64)
        >>> compressed = SVDLinear.from_dense(dense, rank=0.25)
        >>> compressed.rank
        10
    """

    source = LinearSource()
    capabilities = Capabilities(
        calibration=True,
        rank_profile=True,
        truncation=True,
        ridge_option="ridge",
        profile_options=("ridge",),
    )
    __constants__ = ["in_features", "out_features", "rank"]
    in_features: int
    out_features: int
    rank: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: RankSpec,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = check_positive("in_features", in_features)
        self.out_features = check_positive("out_features", out_features)
        self.rank = resolve_matrix_rank(rank, out_features, in_features)
        self._always_input_first = self.rank <= low_rank_break_even(out_features, in_features)
        self.input_factor = nn.Parameter(torch.empty((self.rank, in_features), **factory_kwargs))
        self.output_factor = nn.Parameter(torch.empty((out_features, self.rank), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that ``dense_weight()`` has ``nn.Linear``'s default variance.

        ``nn.Linear`` draws ``U(-1/sqrt(in), 1/sqrt(in))`` (variance ``1/(3 in)``).
        Here ``input_factor`` ~ ``U(-sqrt(3/in), sqrt(3/in))`` (variance ``1/in``, so
        ``A x`` keeps the input's scale) and ``output_factor`` gets ``nn.Linear``'s
        own init for ``rank`` inputs (variance ``1/(3 rank)``); each entry of the
        product then has variance ``rank * 1/in * 1/(3 rank) = 1/(3 in)``. The bias is
        drawn exactly as ``nn.Linear`` draws it.
        """
        input_bound = math.sqrt(3.0 / self.in_features)
        nn.init.uniform_(self.input_factor, -input_bound, input_bound)
        output_bound = 1.0 / math.sqrt(self.rank)
        nn.init.uniform_(self.output_factor, -output_bound, output_bound)
        if self.bias is not None:
            bias_bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bias_bound, bias_bound)

    @names_bad_input
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Below the break-even rank the input-first order is optimal for every batch
        # size, so no plan is looked up.
        input_factor = fast_parameter(self, "input_factor")
        output_factor = fast_parameter(self, "output_factor")
        bias = fast_parameter(self, "bias")
        if self._always_input_first:
            check_linear_input(input, self.in_features)
            return F.linear(F.linear(input, input_factor), output_factor, bias)
        return svd_linear(input, input_factor, output_factor, bias)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight the factors represent (differentiable)."""
        return self.output_factor @ self.input_factor

    def dynamic_int8(self) -> DynamicInt8SVDLinear:
        """This layer with int8 factors and dynamically quantized int8 activations.

        Examples:
            >>> layer = SVDLinear.from_dense(nn.Linear(64, 32), rank=8)
            >>> layer.dynamic_int8()
            DynamicInt8SVDLinear(in_features=64, out_features=32, rank=8, bias=True)
        """
        return DynamicInt8SVDLinear.from_float(self)

    def flops_per_position(self) -> int:
        """Multiply-accumulates per input row (token): ``rank * (in + out)``."""
        return self.rank * (self.in_features + self.out_features)

    @classmethod
    def rank_profile(
        cls, linear: nn.Linear, *, calibration: Calibration = None, ridge: float = 1e-6
    ) -> RankProfile:
        """Every rank ``1..min(in, out)`` with its parameters, FLOPs and exact error.

        Without calibration the errors are the Eckart--Young optima of the weight's
        singular values; with calibration they are the optimal relative *output*
        errors on the calibration data (singular values of ``W S``, ``S S^T = X^T X``).
        Computed in float32 (float64 for float64 weights), so rank policies pick
        exactly the rank :meth:`from_dense` needs.

        Args:
            linear: The dense layer.
            calibration: ``InputStats`` of the layer's inputs, or their Gram matrix.
            ridge: Relative ridge of the whitening (used only with calibration); pass
                the one given to :meth:`from_dense` so that both see the same spectrum.
        """
        cls.source.check(linear, cls.__name__)
        weight = linear.weight.detach()
        gram = gram_of(calibration)
        if gram is None:
            compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
            singular_values = torch.linalg.svdvals(weight.to(compute))
        else:
            singular_values = whitened_singular_values(weight, gram, ridge=ridge)
        per_rank = linear.in_features + linear.out_features
        dense = linear.in_features * linear.out_features
        return RankProfile.from_spectrum(
            singular_values.tolist(),
            linear.out_features,
            linear.in_features,
            params_per_rank=per_rank,
            flops_per_rank=per_rank,
            dense_params=dense,
            dense_flops=dense,
        )

    @classmethod
    def plain_rank(cls, linear: nn.Linear, spec: RankSpec) -> int:
        """The concrete rank of an ``int``/``float`` spec (see ``ranks.resolve_matrix_rank``)."""
        return resolve_matrix_rank(spec, linear.out_features, linear.in_features)

    @classmethod
    def fit_factors(
        cls,
        linear: nn.Linear,
        rank: int,
        *,
        gram: torch.Tensor | None = None,
        ridge: float = 1e-6,
        **svd_options: Any,
    ) -> Fit:
        """Best rank-``rank`` factors of a trained ``nn.Linear``: the fit of :meth:`from_dense`.

        ``SVDLinear.from_dense(linear, rank, calibration=None, **options)`` takes these
        options. Without calibration the factors are the truncated SVD of the weight
        (the Eckart--Young optimum). With ``calibration`` (the layer's input statistics
        from :func:`factorized_layers.calibrate.calibrate`, or a Gram matrix ``X^T X``)
        they minimise the output error on that data instead of the weight error
        (activation-whitened SVD,
        :func:`~factorized_layers.decompose.whitened_low_rank_factors`).

        Args:
            linear: The trained layer (any ``nn.Linear`` subclass).
            rank: The concrete rank.
            gram: The ``(in, in)`` input Gram matrix from ``calibration``, or ``None``.
            ridge: Relative ridge of the whitening (used only with calibration, see
                :func:`~factorized_layers.decompose.whitening_root`).
            **svd_options: Without calibration: ``method``, ``oversample``, ``n_iter``,
                ``seed``, ``generator``, ``compute_dtype`` of
                :func:`factorized_layers.decompose.truncated_svd`. With calibration:
                ``compute_dtype``.

        Examples:
            >>> dense = nn.Linear(32, 16)
            >>> layer = SVDLinear.from_dense(dense, rank=16)
            >>> torch.allclose(layer.dense_weight(), dense.weight, atol=1e-5)
            True
        """
        weight = linear.weight
        if gram is None:
            output_factor, input_factor = low_rank_factors(weight, rank, **svd_options)
        else:
            unsupported = sorted(set(svd_options) - {"compute_dtype"})
            if unsupported:
                raise TypeError(
                    f"with calibration, from_dense takes ridge= and compute_dtype= only "
                    f"(the whitened SVD is exact); got {unsupported}"
                )
            output_factor, input_factor = whitened_low_rank_factors(
                weight, gram, rank, ridge=ridge, **svd_options
            )
        config = {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "rank": rank,
            "bias": linear.bias is not None,
        }
        return Fit(config, {"output_factor": output_factor, "input_factor": input_factor})

    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this layer's structure (JSON-serialisable).

        ``SVDLinear.from_config(layer.get_config())`` has the same parameter names and
        shapes (freshly initialised values);
        :func:`factorized_layers.checkpoint.save_factorized` stores it.
        """
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    def truncate_factors(self, rank: RankSpec) -> Fit:
        """The factors of :meth:`truncated`: the best approximation of this layer's weight.

        Re-decomposes the factors (QR of each, SVD of the ``rank x rank`` product,
        :func:`~factorized_layers.decompose.reduce_low_rank`), never the dense weight,
        so a fine-tuned layer can be compressed further; the weight error is the
        Eckart--Young optimum for ``dense_weight()``.

        Args:
            rank: As the constructor's ``rank`` (``int``, or ``float`` fraction of the
                *dense* weight's parameters); a rank above the current one keeps it.

        Examples:
            >>> layer = SVDLinear(64, 32, rank=16)
            >>> layer.truncated(4).rank
            4
        """
        new_rank = min(resolve_matrix_rank(rank, self.out_features, self.in_features), self.rank)
        output_factor, input_factor = reduce_low_rank(
            self.output_factor, self.input_factor, new_rank
        )
        config = dict(self.get_config(), rank=new_rank)
        return Fit(config, {"output_factor": output_factor, "input_factor": input_factor})

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


class DynamicInt8SVDLinear(nn.Module):
    """Inference-only :class:`SVDLinear` with int8 factors and int8 activations.

    Both factors are stored as ``int8`` with one float32 scale per row (per output
    channel of each product); at run time each input row, and each row of the
    rank-``r`` intermediate, is quantized symmetrically to ``int8`` and multiplied
    with int32 accumulation (:func:`~factorized_layers.functional.int8.int8_linear`).
    The factors take a quarter of their float32 bytes. Built by
    :meth:`SVDLinear.dynamic_int8` or :func:`~factorized_layers.quantize.quantize_`
    with ``mode="int8_dynamic"``; everything is a buffer (nothing trains).

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        rank: Inner dimension of the two products.
        bias: If ``False``, no additive bias.
        device: Device of the buffers.

    Shape:
        - Input: ``(*, in_features)``, any floating dtype.
        - Output: ``(*, out_features)``, the input's dtype.

    Examples:
        >>> layer = SVDLinear.from_dense(nn.Linear(64, 32), rank=8)
        >>> quantized = DynamicInt8SVDLinear.from_float(layer)
        >>> x = torch.randn(5, 64)
        >>> bool((quantized(x) - layer(x)).abs().max() < 0.05)
        True
    """

    __constants__ = ["in_features", "out_features", "rank"]
    float_layer = SVDLinear
    source = SVDLinear.source
    """The float class this module quantizes (checkpoint plans name it)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive("in_features", in_features)
        self.out_features = check_positive("out_features", out_features)
        self.rank = check_positive("rank", rank)
        int8 = {"dtype": torch.int8, "device": device}
        fp32 = {"dtype": torch.float32, "device": device}
        self.register_buffer("input_values", torch.zeros(rank, in_features, **int8))
        self.register_buffer("input_scale", torch.ones(rank, 1, **fp32))
        self.register_buffer("output_values", torch.zeros(out_features, rank, **int8))
        self.register_buffer("output_scale", torch.ones(out_features, 1, **fp32))
        self.register_buffer("bias", torch.zeros(out_features, **fp32) if bias else None)

    @classmethod
    def from_float(cls, layer: SVDLinear) -> DynamicInt8SVDLinear:
        """Quantize ``layer``'s factors row-wise (bias kept in float32).

        Raises:
            TypeError: If ``layer`` is not an :class:`SVDLinear`.
            ValueError: If a factor holds NaN or Inf.
        """
        if not isinstance(layer, SVDLinear):
            raise TypeError(f"from_float expects an SVDLinear, got {type(layer).__name__}")
        device = layer.input_factor.device
        quantized = cls(
            layer.in_features, layer.out_features, layer.rank, layer.bias is not None, device
        )
        with torch.no_grad():
            for side in ("input", "output"):
                values, scale = quantize_rows(getattr(layer, f"{side}_factor"))
                getattr(quantized, f"{side}_values").copy_(values)
                getattr(quantized, f"{side}_scale").copy_(scale)
            if layer.bias is not None:
                quantized.bias.copy_(layer.bias.float())
        return quantized.train(layer.training)

    def get_config(self) -> Dict[str, Any]:
        """The configuration of the :class:`SVDLinear` this module quantizes."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    @names_bad_input
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden = int8_linear(input, self.input_values, self.input_scale)
        return int8_linear(hidden, self.output_values, self.output_scale, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
