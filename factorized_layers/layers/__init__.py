"""Factorized layers, one module per factorization family."""

from .cp import CPConv2d
from .svd import SVDLinear
from .tucker import TuckerLinear

__all__ = ["CPConv2d", "SVDLinear", "TuckerLinear"]
