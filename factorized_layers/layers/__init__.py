"""Factorized layers, one module per factorization family."""

from .svd import SVDLinear

__all__ = ["SVDLinear"]
