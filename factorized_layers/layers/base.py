"""Helpers shared by every factorized layer: source checks and dense reconstruction."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..ranks import POLICY_TYPES, select_rank

__all__ = [
    "check_source",
    "to_dense_linear",
    "fill_dense",
    "resolve_layer_rank",
    "fast_parameter",
    "trainable_like",
    "layer_from_config",
    "ConfigMixin",
]

_MISSING = object()


def fast_parameter(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)`` without ``nn.Module.__getattr__`` for plain parameters.

    ``__getattr__`` costs about a microsecond per name, which shows at batch 1. A name
    that is not in ``_parameters`` (a parametrization, or FSDP's plain-tensor swap)
    falls back to ``getattr``.
    """
    value = module._parameters.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def trainable_like(tensor: torch.Tensor, source: torch.Tensor) -> nn.Parameter:
    """``tensor`` as a contiguous parameter that is trainable exactly when ``source`` is.

    A converted layer keeps a frozen source frozen (e.g. in a partial fine-tune).
    """
    return nn.Parameter(tensor.contiguous(), requires_grad=source.requires_grad)


def check_source(module: nn.Module, expected: type) -> None:
    """Raise ``TypeError`` unless ``module`` is an instance of ``expected``."""
    if not isinstance(module, expected):
        raise TypeError(
            f"from_dense expects an nn.{expected.__name__} (or a subclass), "
            f"got {type(module).__name__}"
        )


def to_dense_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` and ``layer.bias``, matching device, dtype and mode."""
    with torch.device("meta"):
        dense = nn.Linear(
            weight.shape[1],
            weight.shape[0],
            bias=getattr(layer, "bias", None) is not None,
            dtype=weight.dtype,
        )
    return fill_dense(dense, layer, weight)


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
            dense.bias = trainable_like(bias.detach().clone(), bias)
    return dense.train(layer.training)


def resolve_layer_rank(
    layer_cls: type,
    module: nn.Module,
    spec: Any,
    plain: Callable[[Any], Any],
    **profile_options: Any,
) -> Any:
    """Concrete rank of ``layer_cls.from_dense(module, spec)``.

    Rank policies (``Energy``, ``ErrorBound``, ``EVBMF``, ``Budget``) are evaluated on
    ``layer_cls.rank_profile(module, **profile_options)``, which needs the weight's
    values; plain ``int`` and ``float`` specs go to ``plain``, which only needs shapes
    (so meta works).
    """
    if isinstance(spec, POLICY_TYPES):
        if module.weight.device.type == "meta":
            raise ValueError(
                f"rank policy {spec!r} needs the weight's values; a meta-device "
                f"{type(module).__name__} accepts only an int or float rank"
            )
        return select_rank(spec, layer_cls.rank_profile(module, **profile_options))
    return plain(spec)


def layer_from_config(
    cls: type,
    config: Mapping[str, Any],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    """``cls(**config, device=device, dtype=dtype)`` with errors that name the class.

    ``config`` comes from a layer's ``get_config()`` -- possibly through a file, so a
    non-mapping, non-string keys or arguments the constructor does not take raise
    ``TypeError``; bad values raise the constructor's own ``ValueError``.
    """
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise TypeError(f"{cls.__name__}.from_config expects a dict with str keys, got {config!r}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "device", "dtype"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise TypeError(
            f"{cls.__name__}.from_config got unknown argument(s) {unknown}; "
            f"valid: {sorted(accepted)}"
        )
    return cls(**config, device=device, dtype=dtype)


class ConfigMixin:
    """``from_config`` for layers whose ``get_config()`` returns constructor arguments."""

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """A freshly initialised layer with the structure ``config`` (from ``get_config()``).

        Args:
            config: The layer's ``get_config()`` (possibly through JSON).
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        return layer_from_config(cls, config, device, dtype)
