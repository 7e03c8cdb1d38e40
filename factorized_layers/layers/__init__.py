"""Factorized layers, one module per factorization family, on the contract of :mod:`.base`."""

from typing import Dict

import torch.nn as nn

from .base import FactorizedLayer, Fit
from .cp import CPConv1d, CPConv2d, CPConv3d
from .svd import DynamicInt8SVDLinear, SVDLinear
from .svd_conv import SVDConv2d
from .svd_embedding import SVDEmbedding
from .tt import TTLinear
from .tucker import TuckerLinear
from .tucker_conv import TuckerConv2d

__all__ = [
    "CPConv1d",
    "CPConv2d",
    "CPConv3d",
    "DynamicInt8SVDLinear",
    "FactorizedLayer",
    "Fit",
    "SVDEmbedding",
    "SVDConv2d",
    "SVDLinear",
    "TTLinear",
    "TuckerConv2d",
    "TuckerLinear",
    "default_layers",
]


def default_layers() -> Dict[type, type]:
    """The default ``layers=`` mapping of :func:`~factorized_layers.convert.factorize_`.

    ``nn.Linear -> SVDLinear`` and ``nn.Conv1d/2d/3d -> CPConv1d/2d/3d``;
    ``TuckerLinear`` is selectable.
    """
    return {nn.Linear: SVDLinear, nn.Conv1d: CPConv1d, nn.Conv2d: CPConv2d, nn.Conv3d: CPConv3d}
