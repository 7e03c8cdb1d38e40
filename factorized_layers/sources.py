"""Source adapters: what the library needs to know about each dense module type.

A factorized layer replaces a dense module (``nn.Linear``, ``nn.Conv1d/2d/3d``,
``nn.Embedding``). Everything that depends on the dense type -- the size of the input
statistic, the dense cost, how a batch of inputs becomes rows of feature vectors for a
Gram matrix, how the dense module is rebuilt by ``to_dense`` and how two modules are
compared when a checkpoint is loaded -- lives in one adapter per type.
:mod:`~factorized_layers.convert`, :mod:`~factorized_layers.calibrate`,
:mod:`~factorized_layers.sequential` and :mod:`~factorized_layers.checkpoint` ask the
adapter and never branch on a layer type.
A new dense type is one new adapter here.
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch
import torch.nn as nn

__all__ = [
    "SourceAdapter",
    "LinearSource",
    "ConvSource",
    "EmbeddingSource",
    "attach_prelude",
    "source_adapters",
    "source_for",
]


class SourceAdapter:
    """The dense-type-specific pieces of conversion, calibration and checkpoints.

    Attributes:
        module_type: The dense module type (subclasses are accepted too).
        exact_output_error: Whether the input Gram determines the layer's output error
            exactly (a linear layer), so reports can give it.
        input_statistics: Whether :func:`~factorized_layers.calibrate.calibrate` can
            collect an input Gram for the type (not for a lookup, whose inputs are
            indices).
        float_input: Whether inputs are floating point in the layer's dtype (not
            indices).
    """

    module_type: type = nn.Module
    exact_output_error: bool = False
    input_statistics: bool = True
    float_input: bool = True

    def check(self, module: nn.Module, layer_name: str) -> None:
        """Raise ``TypeError`` unless ``module`` is of :attr:`module_type`."""
        if not isinstance(module, self.module_type):
            raise TypeError(
                f"{layer_name}.from_dense expects an nn.{self.module_type.__name__} "
                f"(or a subclass), got {type(module).__name__}"
            )

    def in_features(self, module: nn.Module) -> int:
        """Size of an input feature vector (the side of the calibration Gram)."""
        raise NotImplementedError

    def expected_input(self, module: nn.Module) -> str:
        """The input shape a layer replacing ``module`` takes, for error messages."""
        raise NotImplementedError

    def input_fits(self, module: nn.Module, input: torch.Tensor) -> bool:
        """Whether ``input``'s shape (and, for indices, values) fit ``module``."""
        raise NotImplementedError

    def dense_flops(self, module: nn.Module) -> int:
        """Multiply-accumulates of the dense module per output position."""
        raise NotImplementedError

    def input_rows(self, value: torch.Tensor) -> torch.Tensor:
        """The input as ``(..., in_features)``: one feature vector per position."""
        raise NotImplementedError

    def bias_shape(self) -> Tuple[int, ...]:
        """View of the bias that broadcasts over an output."""
        raise NotImplementedError

    def rebuild(self, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        """A dense module with ``layer``'s options and bias computing with ``weight``."""
        raise NotImplementedError

    def describe(self, module: nn.Module) -> str:
        """The structure that must match when a checkpoint plan is applied."""
        return f"{self.module_type.__name__}({self.module_type.extra_repr(module)})"

    def prelude(self, module: nn.Module) -> nn.Module | None:
        """The input transform a subclass's ``forward`` applies before the dense op, if known.

        A subclass that overrides ``forward`` computes something the factorized layer
        cannot know in general. One idiom is understood: a parameter-free child named
        ``static_padding`` applied to the input first (TensorFlow "same" padding, as in
        ``efficientnet_pytorch``'s ``Conv2dStaticSamePadding``); the factorized layer
        then runs it first too (:func:`attach_prelude`).
        """
        if type(module).forward is self.module_type.forward:
            return None
        padding = getattr(module, "static_padding", None)
        if isinstance(padding, nn.Module) and next(padding.parameters(), None) is None:
            return padding
        return None

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be converted whatever the family (``None`` when it can)."""
        overridden = type(module).forward is not self.module_type.forward
        if overridden and self.prelude(module) is None:
            return (
                f"{type(module).__name__} overrides forward, so what it computes is unknown "
                "(understood: a parameter-free `static_padding` child applied first)"
            )
        return None


def copied_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """A contiguous copy of ``tensor`` as a parameter with the same ``requires_grad``."""
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=tensor.requires_grad)


def _run_prelude(module: nn.Module, args: tuple) -> tuple | None:
    prelude = module._modules.get("input_prelude")
    if prelude is None:  # the hook moved to a module without one (a swap rolled back)
        return None
    return (prelude(args[0]),) + tuple(args[1:])


def attach_prelude(layer: nn.Module, prelude: nn.Module | None) -> nn.Module:
    """Make ``layer`` apply ``prelude`` to its input first (a copy, as child ``input_prelude``).

    Used for dense subclasses whose ``forward`` transforms the input before the dense op
    (:meth:`SourceAdapter.prelude`); a forward pre-hook runs it, so the layer's own
    ``forward`` is unchanged. ``None`` or a layer that already has one: nothing happens.
    """
    if prelude is None or "input_prelude" in layer._modules:
        return layer
    layer.input_prelude = copy.deepcopy(prelude)
    if _run_prelude not in layer._forward_pre_hooks.values():
        layer.register_forward_pre_hook(_run_prelude)
    return layer


def fill_dense(dense: nn.Module, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """Give a (meta-built) dense ``dense`` the weight ``weight`` and ``layer``'s bias.

    The weight is trainable when any factor of ``layer`` is, the bias copies its
    source's flag, and ``dense`` takes ``layer``'s ``training`` mode.
    """
    bias = getattr(layer, "bias", None)
    trainable = any(p.requires_grad for p in layer.parameters() if p is not bias)
    with torch.no_grad():
        dense.weight = nn.Parameter(weight.detach().clone(), requires_grad=trainable)
        if bias is not None:
            dense.bias = copied_parameter(bias)
    attach_prelude(dense, layer._modules.get("input_prelude"))
    return dense.train(layer.training)


class LinearSource(SourceAdapter):
    """``nn.Linear``: rows are the last dimension; the Gram fixes the output error."""

    module_type = nn.Linear
    exact_output_error = True

    def in_features(self, module: nn.Module) -> int:
        return module.in_features

    def expected_input(self, module: nn.Module) -> str:
        return f"(*, {module.in_features})"

    def input_fits(self, module: nn.Module, input: torch.Tensor) -> bool:
        return input.dim() >= 1 and input.shape[-1] == module.in_features

    def dense_flops(self, module: nn.Module) -> int:
        return module.in_features * module.out_features

    def input_rows(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def bias_shape(self) -> Tuple[int, ...]:
        return (-1,)

    def rebuild(self, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        with torch.device("meta"):
            dense = nn.Linear(
                weight.shape[1],
                weight.shape[0],
                bias=getattr(layer, "bias", None) is not None,
                dtype=weight.dtype,
            )
        return fill_dense(dense, layer, weight)


class ConvSource(SourceAdapter):
    """``nn.Conv1d/2d/3d``: rows are the input channels at every batch element and position.

    Args:
        dims: Number of spatial dimensions (1, 2 or 3).
    """

    _TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.module_type = self._TYPES[dims]

    def in_features(self, module: nn.Module) -> int:
        return module.in_channels

    def expected_input(self, module: nn.Module) -> str:
        channels = module.in_channels
        return (
            f"(N, {channels}, *spatial) or ({channels}, *spatial) with {self.dims} spatial "
            "dimension(s), each at least the dilated kernel after padding"
        )

    def input_fits(self, module: nn.Module, input: torch.Tensor) -> bool:
        if input.dim() not in (self.dims + 1, self.dims + 2):
            return False
        if input.shape[-self.dims - 1] != module.in_channels:
            return False
        if module.padding == "same":
            return True
        # Every spatial extent, padded, must hold one dilated kernel.
        padding = (0,) * self.dims if module.padding == "valid" else module.padding
        for size, kernel, pad, dilation in zip(
            input.shape[-self.dims :], module.kernel_size, padding, module.dilation
        ):
            if size + 2 * pad < dilation * (kernel - 1) + 1:
                return False
        return True

    def dense_flops(self, module: nn.Module) -> int:
        # One output position of every output channel.
        return module.weight.numel()

    def input_rows(self, value: torch.Tensor) -> torch.Tensor:
        # Channels last, for batched (N, C, *S) and unbatched (C, *S) inputs alike.
        return value.movedim(-(self.dims + 1), -1)

    def bias_shape(self) -> Tuple[int, ...]:
        return (-1,) + (1,) * self.dims

    def rebuild(self, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        with torch.device("meta"):
            dense = self.module_type(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                bias=getattr(layer, "bias", None) is not None,
                padding_mode=layer.padding_mode,
                dtype=weight.dtype,
            )
        return fill_dense(dense, layer, weight)


class EmbeddingSource(SourceAdapter):
    """``nn.Embedding``: a lookup table; its inputs are indices, so it has no input Gram.

    A lookup computes nothing: its dense cost is 0 multiply-accumulates per position,
    and conversion judges it by parameters alone.
    """

    module_type = nn.Embedding
    input_statistics = False

    float_input = False

    def in_features(self, module: nn.Module) -> int:
        return module.num_embeddings

    def expected_input(self, module: nn.Module) -> str:
        return f"(*) of indices in [0, {module.num_embeddings})"

    def input_fits(self, module: nn.Module, input: torch.Tensor) -> bool:
        if input.dtype not in (torch.long, torch.int):
            return False
        return input.numel() == 0 or (
            int(input.min()) >= 0 and int(input.max()) < module.num_embeddings
        )

    def dense_flops(self, module: nn.Module) -> int:
        return 0

    def input_rows(self, value: torch.Tensor) -> torch.Tensor:
        raise TypeError("an nn.Embedding's inputs are indices; they have no Gram matrix")

    def bias_shape(self) -> Tuple[int, ...]:
        return (-1,)

    def rebuild(self, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        with torch.device("meta"):
            dense = nn.Embedding(
                weight.shape[0],
                weight.shape[1],
                padding_idx=layer.padding_idx,
                scale_grad_by_freq=layer.scale_grad_by_freq,
                sparse=layer.sparse,
                dtype=weight.dtype,
            )
        return fill_dense(dense, layer, weight)


_ADAPTERS: Tuple[SourceAdapter, ...] = (
    LinearSource(),
    ConvSource(1),
    ConvSource(2),
    ConvSource(3),
    EmbeddingSource(),
)


def source_adapters() -> Dict[type, SourceAdapter]:
    """``{dense module type: adapter}`` of every supported dense type."""
    return {adapter.module_type: adapter for adapter in _ADAPTERS}


def source_for(module: nn.Module) -> SourceAdapter | None:
    """The adapter of ``module``'s dense type (most specific first), or ``None``.

    Examples:
        >>> source_for(nn.Conv1d(2, 3, 3)).dims, source_for(nn.ReLU()) is None
        (1, True)
    """
    for cls in type(module).__mro__:
        for adapter in _ADAPTERS:
            if adapter.module_type is cls:
                return adapter
    return None
