"""The module database: one entry per factorized layer configuration.

Generic tests in ``test_modules.py`` run over every case x dtype x device, in the
style of PyTorch's ``common_modules.py``. A new layer adds its cases here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Tuple

import torch.nn as nn

from factorized_layers import SVDLinear
from factorized_layers.layers.tucker import TuckerLinear


@dataclasses.dataclass(frozen=True)
class ModuleCase:
    name: str
    layer_cls: type
    make_dense: Callable[..., nn.Module]
    rank: object
    input_shape: Tuple[int, ...]
    full_rank: object
    """A rank spec at which ``from_dense`` must reproduce the dense layer exactly."""
    reduction_terms: int
    """Length of the longest sum behind one output value (for tolerances)."""

    def __str__(self) -> str:
        return self.name


def _linear(in_features: int, out_features: int, bias: bool = True) -> Callable[..., nn.Module]:
    def make(**factory_kwargs) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias, **factory_kwargs)

    return make


MODULE_CASES = [
    ModuleCase("svd_linear", SVDLinear, _linear(24, 16), 5, (3, 24), 16, 24),
    ModuleCase(
        "svd_linear_nobias", SVDLinear, _linear(16, 24, bias=False), 0.3, (2, 3, 16), 16, 24
    ),
    ModuleCase("svd_linear_1d_input", SVDLinear, _linear(7, 9), 2, (7,), 7, 9),
    ModuleCase("svd_linear_wide_rank1", SVDLinear, _linear(3, 40), 1, (4, 3), 3, 40),
]

MODULE_CASES += [
    ModuleCase("tucker_linear", TuckerLinear, _linear(24, 16), 0.5, (3, 24), 24, 24),
    ModuleCase(
        "tucker_linear_nobias", TuckerLinear, _linear(16, 24, bias=False), 2, (2, 3, 16), 24, 24
    ),
    ModuleCase("tucker_linear_prime_in", TuckerLinear, _linear(7, 12), 2, (7,), 12, 12),
]
