"""Empirical variational Bayesian matrix factorization (EVBMF): the rank it keeps.

Nakajima et al. 2013: the closed-form free energy of a noise variance, minimised by
a bounded golden-section search, gives the threshold above which singular values
are kept. :class:`factorized_layers.ranks.EVBMF` is the policy that uses it.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["evbmf_rank"]


def _evbmf_tau(x: float, alpha: float) -> float:
    """Positive root of the EVBMF shrinkage equation (Nakajima et al. 2013, eq. 15)."""
    shifted = x - (1.0 + alpha)
    return 0.5 * (shifted + math.sqrt(max(shifted * shifted - 4.0 * alpha, 0.0)))


def _evbmf_free_energy(
    sigma2: float, s2: Sequence[float], rows: int, cols: int, residual: float, x_bar: float
) -> float:
    alpha = rows / cols
    energy = residual / (cols * sigma2) + (rows - len(s2)) * math.log(sigma2)
    for value in s2:
        x = value / (cols * sigma2)
        if x > x_bar:
            tau = _evbmf_tau(x, alpha)
            energy += x - tau + math.log((tau + 1.0) / x) + alpha * math.log(tau / alpha + 1.0)
        else:
            energy += x - math.log(x)
    return energy


def _golden_section_minimum(fn, low: float, high: float, iterations: int = 100) -> float:
    """Minimiser of a unimodal-ish ``fn`` on ``[low, high]`` by golden-section search."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
    return (a + b) / 2.0


def evbmf_rank(singular_values: Sequence[float], rows: int, cols: int, frobenius_sq: float) -> int:
    """Rank that empirical variational Bayesian matrix factorization keeps.

    Args:
        singular_values: Leading singular values of the matrix, descending (all of them,
            or a prefix; ``frobenius_sq`` accounts for the rest).
        rows: Rows of the matrix.
        cols: Columns of the matrix.
        frobenius_sq: Squared Frobenius norm of the whole matrix.

    Returns:
        The number of singular values above the EVBMF threshold (may be 0; callers clamp).

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> signal = torch.randn(60, 3, generator=g) @ torch.randn(3, 80, generator=g)
        >>> y = signal + 0.1 * torch.randn(60, 80, generator=g)
        >>> evbmf_rank(torch.linalg.svdvals(y).tolist(), 60, 80, float(y.square().sum()))
        3
    """
    L, M = (rows, cols) if rows <= cols else (cols, rows)
    s = sorted((float(v) for v in singular_values), reverse=True)[:L]
    if not s or s[0] <= 0.0:
        return 0
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    s2 = [v * v for v in s]
    residual = max(frobenius_sq - sum(s2), 0.0)
    # Search bounds for the noise variance (Nakajima et al. 2013, Sec. 4).
    upper = (sum(s2) + residual) / (L * M)
    h_bar = min(int(math.ceil(L / (1.0 + alpha))) - 1, len(s2)) - 1
    tail = s2[h_bar + 1 :] or [s2[-1]]
    lower = max(s2[min(h_bar + 1, len(s2) - 1)] / (M * x_bar), sum(tail) / len(tail) / M)
    lower = max(min(lower, upper), upper * 1e-12)
    s2 = [max(v, 1e-300) for v in s2]
    log_sigma2 = _golden_section_minimum(
        lambda t: _evbmf_free_energy(math.exp(t), s2, L, M, residual, x_bar),
        math.log(lower),
        math.log(upper),
    )
    threshold = math.sqrt(M * math.exp(log_sigma2) * (1.0 + tau_bar) * (1.0 + alpha / tau_bar))
    return sum(1 for v in s if v > threshold)
