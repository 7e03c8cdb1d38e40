"""Assertion helpers, tolerances and hypothesis strategies shared by the test suite.

Importing this module needs only torch; the strategies import ``hypothesis`` (the
``test`` extra) when they are called. The library itself never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "TOLERANCES",
    "tolerance",
    "assert_close_to_reference",
    "available_devices",
    "supported_dtypes",
    "feature_sizes",
    "leading_shapes",
    "linear_with_spectrum",
]

TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
"""``(rtol, atol)`` per dtype for comparing a factorized result with its dense oracle.

The absolute part is relative to outputs of order one; callers comparing sums over
``k`` terms scale it with :func:`tolerance`.
"""


def tolerance(dtype: torch.dtype, terms: int = 1) -> Dict[str, float]:
    """``rtol``/``atol`` keyword arguments for ``torch.testing.assert_close``.

    Args:
        dtype: The dtype the compared results were computed in.
        terms: Length of the longest reduction behind each compared value; rounding
            errors grow about like its square root.
    """
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(terms) ** 0.5)
    return {"rtol": rtol * scale, "atol": atol * scale}


def assert_close_to_reference(
    actual: torch.Tensor, expected: torch.Tensor, *, terms: int = 1, msg: str = ""
) -> None:
    """``torch.testing.assert_close`` with the dtype's tolerance from :data:`TOLERANCES`."""
    torch.testing.assert_close(
        actual,
        expected,
        **tolerance(actual.dtype, terms),
        msg=(lambda default: f"{msg}\n{default}") if msg else None,
    )


def available_devices() -> List[str]:
    """``'cpu'`` always, plus ``'cuda'`` when a GPU is present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def supported_dtypes(device: str) -> List[torch.dtype]:
    """Floating dtypes whose matmuls ``device`` runs (fp16 on CPU only where supported)."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    try:
        torch.ones(2, 2, dtype=torch.float16, device=device) @ torch.ones(
            2, 2, dtype=torch.float16, device=device
        )
        dtypes.append(torch.float16)
    except RuntimeError:
        pass
    return dtypes


def feature_sizes(max_size: int = 300) -> SearchStrategy[int]:
    """Feature sizes from 1 to ``max_size``, shrinking towards small layers."""
    from hypothesis import strategies as st

    return st.integers(min_value=1, max_value=max_size)


def leading_shapes(max_dims: int = 3, max_side: int = 4) -> SearchStrategy[Tuple[int, ...]]:
    """Batch shapes with 0..``max_dims`` leading dimensions, empty sizes included."""
    from hypothesis import strategies as st

    return st.lists(
        st.integers(min_value=0, max_value=max_side), min_size=0, max_size=max_dims
    ).map(tuple)


def linear_with_spectrum(
    out_features: int, in_features: int, decay: float, *, seed: int = 0
) -> nn.Linear:
    """A float64 ``nn.Linear`` whose weight has singular values ``decay**i``.

    The singular vectors are random (seeded), so the truncation optimum of every rank
    is known exactly: ``sqrt(sum_{i >= r} decay**(2i))`` relative to the full norm.
    """
    g = torch.Generator().manual_seed(seed)
    k = min(out_features, in_features)
    U = torch.linalg.qr(torch.randn(out_features, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_features, k, generator=g, dtype=torch.float64)).Q
    S = decay ** torch.arange(k, dtype=torch.float64)
    dense = nn.Linear(in_features, out_features, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_((U * S) @ V.T)
    return dense
