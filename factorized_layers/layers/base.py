"""Helpers shared by every factorized layer: source checks and dense reconstruction."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["check_source", "to_dense_linear"]


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
