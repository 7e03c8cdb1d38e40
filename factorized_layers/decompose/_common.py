"""Checks and helpers shared by the decomposition modules.

Input checks (dtype, matrix, Gram, ridge), the compute-dtype rule, seeding of the
randomized paths, the Gram normalisation and eigen-root behind every whitening, and the
thin QR that the rank reductions start from.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Tuple

import torch


def _compute_dtype(weight: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a decomposition computes in: float64 for float64 input, else float32."""
    if compute_dtype is None:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}"
        )
    return compute_dtype


def _check_matrix(weight: torch.Tensor) -> None:
    """Raise unless ``weight`` is a finite (or meta) floating-point 2-D tensor."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    _check_finite(weight, "weight")


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    """``ValueError`` saying how many values of ``tensor`` are NaN/Inf (meta passes)."""
    if tensor.device.type != "meta" and not _surely_finite(tensor):
        bad = _count_non_finite(tensor)
        if bad:
            raise ValueError(
                f"{name} contains {bad} NaN/Inf value(s) out of {tensor.numel()}; "
                "a decomposition of non-finite values is meaningless"
            )


def _surely_finite(tensor: torch.Tensor) -> bool:
    """Whether the sum of ``tensor`` is finite: then so is every value (a NaN or Inf
    makes the sum NaN or Inf). Costs no temporary of the tensor's size, where
    ``torch.isfinite`` holds its ``abs()`` and masks -- 1.5x a float32 weight, the peak of
    a streaming conversion. A false alarm (a finite sum that overflows) is settled by an
    exact count in chunks."""
    wider = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None
    return bool(torch.isfinite(tensor.detach().sum(dtype=wider)))


def _count_non_finite(tensor: torch.Tensor) -> int:
    """NaN/Inf values of ``tensor``, counted in chunks of 2**20 (bounded temporaries)."""
    return sum(
        int(torch.isfinite(chunk).logical_not_().count_nonzero())
        for chunk in tensor.detach().reshape(-1).split(1 << 20)
    )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a floating-point ``tensor`` is finite, without temporaries
    of its size (see :func:`_surely_finite`)."""
    return _surely_finite(tensor) or _count_non_finite(tensor) == 0


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the generator of ``device`` inside a forked RNG state (global state restored)."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    else:
        module = torch.get_device_module(device.type)
        index = device.index if device.index is not None else module.current_device()
        with torch.random.fork_rng(devices=[index], device_type=device.type):
            with module.device(index):
                module.manual_seed(seed)
            yield


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The seed of a randomized path: one draw from ``generator``, else ``seed`` (default 0)."""
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    return 0 if seed is None else int(seed)


def _check_gram(gram: torch.Tensor, features: int) -> None:
    """Raise unless ``gram`` is a finite (or meta) ``(features, features)`` tensor."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.shape != (features, features):
        raise ValueError(
            f"gram must be the ({features}, {features}) input second-moment matrix, "
            f"got shape {tuple(gram.shape)}"
        )
    if gram.device.type != "meta" and not bool(torch.isfinite(gram).all()):
        raise ValueError("gram contains NaN/Inf values")


def _check_ridge(ridge: float) -> None:
    """Raise unless ``ridge`` is a finite non-negative number."""
    if (
        isinstance(ridge, bool)
        or not isinstance(ridge, (int, float))
        or ridge < 0
        or not math.isfinite(ridge)
    ):
        raise ValueError(f"ridge must be a finite non-negative float, got {ridge!r}")


def _normalized_gram(gram: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``gram`` scaled to unit mean diagonal before the cast to ``dtype``.

    Whitened truncation only depends on the Gram matrix up to scale, and a float64
    Gram of large activations can overflow float32. An all-zero Gram becomes the
    identity.
    """
    wide = gram.detach().to(device=device, dtype=torch.float64)
    scale = wide.diagonal().mean()
    if scale > 0:
        return (wide / scale).to(dtype)
    # All-zero inputs carry no information about the output error: weigh every input
    # direction equally, which makes the whitened truncation the plain one.
    return torch.eye(wide.shape[0], device=device, dtype=dtype)


def _whitening_eig(gram: torch.Tensor, ridge: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(E, d)``, ``E`` orthogonal and ``d >= 0``, with ``whitening_root(gram) = E * d``."""
    _check_ridge(ridge)
    symmetric = (gram + gram.mT) / 2
    scale = symmetric.diagonal().mean().clamp_min(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    eigenvalues = eigenvalues.clamp_min(0) + ridge * scale
    return eigenvectors, eigenvalues.sqrt()


def _orthonormal_basis(factor: torch.Tensor, dtype: torch.dtype):
    """``factor = Q R`` with orthonormal ``Q`` (reduced QR in ``dtype``)."""
    return torch.linalg.qr(factor.detach().to(dtype), mode="reduced")
