"""Helpers shared by every factorized layer: source checks and dense reconstruction."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..ranks import POLICY_TYPES, select_rank

__all__ = ["check_source", "to_dense_linear", "resolve_layer_rank"]


def check_source(module: nn.Module, expected: type) -> None:
    """Raise ``TypeError`` unless ``module`` is an instance of ``expected``."""
    if not isinstance(module, expected):
        raise TypeError(
            f"from_dense expects an nn.{expected.__name__} (or a subclass), "
            f"got {type(module).__name__}"
        )


def to_dense_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` and ``layer.bias``, matching device, dtype and mode."""
    bias = getattr(layer, "bias", None)
    with torch.device("meta"):
        dense = nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype
        )
    with torch.no_grad():
        dense.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone())
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
