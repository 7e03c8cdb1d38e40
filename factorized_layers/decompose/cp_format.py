"""The CP format: the decomposition container, reconstruction and MTTKRP contractions.

:class:`CPDecomposition` holds the result of the ALS fits in :mod:`.cp`;
:func:`khatri_rao` and :func:`cp_to_tensor` rebuild a tensor from factors; the
``_GroupContraction`` machinery computes the matricized-tensor times Khatri-Rao products
(MTTKRP) of a sweep, sharing partial contractions between modes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

from ._common import _check_finite

__all__ = ["CPDecomposition", "khatri_rao", "cp_to_tensor"]


class CPDecomposition(NamedTuple):
    """A CP tensor ``sum_r weights[r] * factors[0][:, r] o factors[1][:, r] o ...``."""

    weights: torch.Tensor
    """``(rank,)`` non-negative weights (the column norms moved out of the factors)."""
    factors: Tuple[torch.Tensor, ...]
    """One ``(size_n, rank)`` factor per mode, columns of unit Euclidean norm."""
    error: float
    """Relative Frobenius error ``||T - CP|| / ||T||`` of the returned factors (NaN on meta)."""
    n_iter: int
    """Number of ALS sweeps run."""
    converged: bool
    """Whether the error's change per sweep, averaged over the last 5 sweeps, fell
    below ``tol`` (see :func:`cp_als`), or the fit is exact."""
    degenerate: bool
    """Whether the degeneracy guard fired (diverging, cancelling rank-1 terms or a
    non-finite update); the ridge was then raised and the best iterate kept."""
    ridge: float
    """The ridge in effect at the end (raised from the requested one by the guard)."""


def _check_cp_tensor(tensor: torch.Tensor) -> None:
    """Raise unless ``tensor`` is a non-empty, finite (or meta) floating tensor of >= 2 modes."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 2:
        raise ValueError(
            f"CP needs a tensor with at least 2 modes, got shape {tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"tensor must not be empty, got shape {tuple(tensor.shape)}")
    _check_finite(tensor, "tensor")


def khatri_rao(factors) -> torch.Tensor:
    """Column-wise Kronecker product of ``(size_n, R)`` matrices, first one slowest.

    Row ``(i_0, i_1, ...)`` (row-major) of the result is ``prod_n factors[n][i_n, :]``.

    Examples:
        >>> a, b = torch.randn(3, 2), torch.randn(4, 2)
        >>> kr = khatri_rao([a, b])
        >>> kr.shape, torch.allclose(kr[5], a[1] * b[1])
        (torch.Size([12, 2]), True)
    """
    result = factors[0]
    for factor in factors[1:]:
        result = (result[:, None, :] * factor[None, :, :]).reshape(-1, factor.shape[1])
    return result


def cp_to_tensor(weights: torch.Tensor | None, factors) -> torch.Tensor:
    """The full tensor of a CP decomposition.

    The largest mode is produced by one GEMM against the Khatri--Rao product of the
    others, so the temporary memory is ``prod(shape) * rank / max(shape)`` entries.

    Args:
        weights: ``(rank,)`` weights, or ``None`` for all ones.
        factors: One ``(size_n, rank)`` matrix per mode.

    Returns:
        The tensor of shape ``(size_0, size_1, ...)``.

    Examples:
        >>> a, b, c = torch.randn(3, 2), torch.randn(4, 2), torch.randn(5, 2)
        >>> full = cp_to_tensor(None, [a, b, c])
        >>> torch.allclose(full, torch.einsum("ir,jr,kr->ijk", a, b, c), atol=1e-6)
        True
    """
    factors = list(factors)
    sizes = [f.shape[0] for f in factors]
    big = max(range(len(factors)), key=lambda n: sizes[n])
    others = [n for n in range(len(factors)) if n != big]
    lead = factors[big] if weights is None else factors[big] * weights
    matrix = lead @ khatri_rao([factors[n] for n in others]).T
    return matrix.reshape([sizes[big]] + [sizes[n] for n in others]).movedim(0, big)


def _rankwise_contract(tensor: torch.Tensor, factors, positions) -> torch.Tensor:
    """Sum ``tensor`` (rank last) against ``factors[k]`` over dimension ``positions[k]``, rank-wise.

    A broadcast multiply and sum per mode: einsum would turn each of these into a
    batched GEMM over the rank with tiny matrices, which is far slower on CPU.
    """
    for position, factor in sorted(zip(positions, factors), key=lambda pair: -pair[0]):
        shape = [1] * tensor.dim()
        shape[position], shape[-1] = factor.shape
        tensor = (tensor * factor.reshape(shape)).sum(position)
    return tensor


class _GroupContraction:
    """Contraction of a tensor with the factors of every mode outside ``group``, rank-wise.

    The tensor is unfolded once into (modes of ``group``) x (the other modes); each
    call is then one GEMM of that unfolding with the Khatri--Rao product of the other
    modes' factors (``prod(other sizes) x rank``), without a transposing copy.
    :meth:`partial` returns a tensor indexed by the modes of ``group`` (in order) and
    the rank last.
    """

    def __init__(self, tensor: torch.Tensor, group) -> None:
        self.group = tuple(group)
        self.contracted = [n for n in range(tensor.dim()) if n not in self.group]
        self.shape = [tensor.shape[n] for n in self.group]
        self.unfolded = tensor.permute(*self.group, *self.contracted).reshape(
            math.prod(self.shape), -1
        )

    def partial(self, factors) -> torch.Tensor:
        """The contraction with ``factors`` of the modes outside the group."""
        kr = khatri_rao([factors[n] for n in self.contracted])
        return (self.unfolded @ kr).view(*self.shape, -1)


def _mttkrp_from_partial(partial: torch.Tensor, group, factors, mode: int) -> torch.Tensor:
    """MTTKRP of ``mode`` from ``partial`` (indexed by the modes of ``group``, then rank)."""
    others = [k for k, n in enumerate(group) if n != mode]
    return _rankwise_contract(partial, [factors[group[k]] for k in others], others)


def _mode_groups(shape) -> Tuple[Tuple[int, ...], ...]:
    """Split the modes in two groups of similar total size (largest modes apart).

    ALS over a two-level dimension tree: one big contraction of the tensor with the
    other group's factors serves every mode of a group, so a sweep costs two
    tensor-sized GEMMs instead of one per mode.
    """
    order = sorted(range(len(shape)), key=lambda n: -shape[n])
    groups = ([], [])
    for position, n in enumerate(order):
        groups[position % 2].append(n)
    return tuple(tuple(sorted(g)) for g in groups if g)
