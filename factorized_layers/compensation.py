"""Error compensation of sequential calibration: paired statistics and the compensated weight.

For a layer with weight ``W``, :class:`PairedStats` accumulates over calibration rows
the Gram ``G = X_c^T X_c`` of the inputs the partly compressed model feeds it, the
cross term ``C = X_d^T X_c`` with the dense model's inputs, and ``D = X_d^T X_d`` (on
held-out rows). :func:`compensated_weight` is the regularised least-squares weight
``(1 - a) W + a W C (G + ridge)^{-1}`` and :func:`held_out_error` the output error of a
candidate on the held-out rows (see :mod:`factorized_layers.sequential`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .calibrate import distributed
from .decompose import normalized_whitening_eig

__all__ = ["PairedStats", "mixing_matrix", "compensated_weight", "held_out_error"]


_CHUNK_ENTRIES = 2**22


@dataclasses.dataclass
class PairedStats:
    """Second moments of one layer's compressed-path inputs ``X_c`` and dense inputs ``X_d``.

    Rows are input vectors (tokens; for a convolution, channel vectors at every
    position). The matrices are ``(in, in)`` float64, accumulated from float64 copies
    of chunks of at most 2**22 entries.

    Attributes:
        gram: ``X_c^T X_c``.
        cross: ``X_d^T X_c``.
        dense_gram: ``X_d^T X_d``, or ``None`` when not collected (only the held-out
            statistics need it, to measure errors).
        rows: Number of rows accumulated.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    dense_gram: torch.Tensor | None
    rows: int = 0

    @classmethod
    def zeros(cls, features: int, device: torch.device, dense_gram: bool = True) -> PairedStats:
        def zero() -> torch.Tensor:
            return torch.zeros(features, features, dtype=torch.float64, device=device)

        return cls(zero(), zero(), zero() if dense_gram else None)

    def add(self, dense: torch.Tensor, compressed: torch.Tensor) -> None:
        """Accumulate paired rows ``(*, in)`` in chunks of at most 2**22 entries."""
        if dense.shape != compressed.shape:
            raise ValueError(
                f"dense and compressed inputs differ in shape: {tuple(dense.shape)} vs "
                f"{tuple(compressed.shape)}"
            )
        d = dense.detach().reshape(-1, dense.shape[-1])
        c = compressed.detach().reshape(-1, compressed.shape[-1])
        step = max(1, _CHUNK_ENTRIES // d.shape[1])
        for d_chunk, c_chunk in zip(d.split(step), c.split(step)):
            wide_d = d_chunk.to(device=self.gram.device, dtype=torch.float64)
            wide_c = c_chunk.to(device=self.gram.device, dtype=torch.float64)
            self.gram.addmm_(wide_c.mT, wide_c)
            self.cross.addmm_(wide_d.mT, wide_c)
            if self.dense_gram is not None:
                self.dense_gram.addmm_(wide_d.mT, wide_d)
        self.rows += d.shape[0]

    def __add__(self, other: PairedStats) -> PairedStats:
        dense_gram = None
        if self.dense_gram is not None and other.dense_gram is not None:
            dense_gram = self.dense_gram + other.dense_gram
        return PairedStats(
            self.gram + other.gram, self.cross + other.cross, dense_gram, self.rows + other.rows
        )

    def all_reduce(self) -> None:
        """Sum over the ranks of the default process group (no-op without one)."""
        if not distributed():
            return
        import torch.distributed as dist

        rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=self.gram.device)
        for tensor in (self.gram, self.cross, self.dense_gram, rows):
            if tensor is not None:
                dist.all_reduce(tensor)
        self.rows = int(rows.item())


def _rows_view(weight: torch.Tensor) -> torch.Tensor:
    """``(out * spatial, in)``: every input-channel slice of a linear or conv weight."""
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])


def _mix_inputs(weight: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """``W`` with its input mode multiplied by ``mixing`` (``W @ M`` for a matrix)."""
    if weight.dim() == 2:
        return weight @ mixing
    return torch.einsum("oi...,ij->oj...", weight, mixing)


def mixing_matrix(stats: PairedStats, ridge: float, dtype: torch.dtype) -> torch.Tensor:
    """``C (G + ridge * mean(diag G) I)^+``: the input map of the least-squares weight.

    The inverse comes from the (cached) ``eigh`` of the whitening that the layer's
    fit computes in ``dtype`` anyway; eigenvalues below ``n * eps(dtype)`` of the
    largest are dropped (pseudo-inverse), so singular Grams give no Inf.
    """
    gram = stats.gram
    eigenvectors, root_eigenvalues = normalized_whitening_eig(gram, gram.device, dtype, ridge)
    eigenvalues = root_eigenvalues.to(torch.float64).square()
    # Eigenvalues below the eigh's own rounding level are noise: pseudo-inverse.
    cutoff = eigenvalues.max().clamp_min(1e-300) * len(eigenvalues) * torch.finfo(dtype).eps
    inverse_eigenvalues = torch.where(
        eigenvalues > cutoff, 1 / eigenvalues.clamp_min(1e-300), 0.0
    ) / gram.diagonal().mean().clamp_min(1e-300)
    vectors = eigenvectors.to(torch.float64)
    return ((stats.cross @ vectors) * inverse_eigenvalues) @ vectors.mT


def compensated_weight(
    weight: torch.Tensor,
    stats: PairedStats,
    strength: float,
    ridge: float,
    mixing: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1 - a) W + a W C (G + ridge)^{-1}`` in float64 on the statistics' device.

    ``W C G^{-1}`` is the least-squares weight ``W'`` of ``||X_d W^T - X_c W'^T||``; for
    a convolution the correction mixes input channels only (exact for 1x1 kernels).
    ``mixing`` is :func:`mixing_matrix` of ``stats`` and ``ridge``, when already known
    (by default computed in float64).

    Examples:
        >>> x = torch.randn(40, 3, dtype=torch.float64)
        >>> stats = PairedStats.zeros(3, x.device)
        >>> stats.add(x, 2 * x)  # the compressed path doubles the inputs
        >>> w = torch.randn(2, 3, dtype=torch.float64)
        >>> torch.allclose(compensated_weight(w, stats, 1.0, 0.0), w / 2)
        True
    """
    wide = weight.detach().to(device=stats.gram.device, dtype=torch.float64)
    if strength == 0:
        return wide
    if mixing is None:
        mixing = mixing_matrix(stats, ridge, torch.float64)
    return wide + strength * (_mix_inputs(wide, mixing) - wide)


def held_out_error(
    weight: torch.Tensor,
    approximation: torch.Tensor,
    stats: PairedStats,
    target_energy: float | None = None,
) -> float:
    """``||X_d W^T - X_c W'^T||_F / ||X_d W^T||_F`` from the statistics alone.

    For a convolution, every kernel position is counted as an independent channel
    map (the statistics hold no spatial correlations). ``target_energy`` is
    ``||X_d W^T||_F^2`` when already known.
    """
    device = stats.gram.device
    w = _rows_view(weight.detach().to(device=device, dtype=torch.float64))
    a = _rows_view(approximation.detach().to(device=device, dtype=torch.float64))
    if target_energy is None:
        target_energy = float(((w @ stats.dense_gram) * w).sum())
    cross = float(((a @ stats.cross.mT) * w).sum())
    own = float(((a @ stats.gram) * a).sum())
    return math.sqrt(max(target_energy - 2 * cross + own, 0.0) / max(target_energy, 1e-300))
