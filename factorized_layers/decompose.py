"""Pure tensor decompositions (no ``nn``): the numerical core behind every ``from_dense``.

Conventions shared by every function here:

* computation happens on the input's device, in float32 -- or float64 when the
  input is float64 or ``compute_dtype=torch.float64`` is asked for -- and results
  are cast back to the input's dtype;
* NaN/Inf input raises ``ValueError`` instead of producing garbage factors;
* meta-device input returns meta tensors of the right shapes without computing;
* randomized algorithms are reproducible from ``seed`` (or a ``torch.Generator``)
  and leave the global random state untouched.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import threading
from typing import Iterator, List, NamedTuple, Sequence, Tuple

import torch

from .ranks import RankSpec, resolve_matrix_rank

__all__ = [
    "whitening_root",
    "whitened_singular_values",
    "whitened_low_rank_factors",
    "relative_output_error",
    "TruncatedSVD",
    "truncated_svd",
    "low_rank_factors",
    "svd_tail_error",
    "choose_svd_method",
    "CPDecomposition",
    "cp_als",
    "cp_factors",
    "cp_to_tensor",
    "khatri_rao",
    "whiten_mode",
    "whitened_cp_factors",
    "reduce_low_rank",
    "reduce_tucker",
    "reduce_cp",
]

_METHODS = ("auto", "full", "randomized")


class TruncatedSVD(NamedTuple):
    """Leading singular triplets: ``weight ~= U @ diag(S) @ Vh``."""

    U: torch.Tensor
    """``(rows, rank)`` left singular vectors."""
    S: torch.Tensor
    """``(rank,)`` singular values, descending."""
    Vh: torch.Tensor
    """``(rank, cols)`` right singular vectors (transposed)."""


def choose_svd_method(rows: int, cols: int, rank: int, oversample: int) -> str:
    """The SVD algorithm ``method='auto'`` uses for a ``rows x cols`` matrix.

    The randomized range finder costs ``O(rows * cols * q)`` per pass with
    ``q = rank + oversample``, the full SVD ``O(rows * cols * min(rows, cols))``
    with a larger constant. Measured on 2 CPU cores (benchmarks/README.md), the
    randomized path wins once the smaller side is at least 512 and ``q`` is at most
    a third of it; below that the full SVD is both fast and exact.
    """
    small = min(rows, cols)
    if small >= 512 and 3 * (rank + oversample) <= small:
        return "randomized"
    return "full"


def _default_oversample(rank: int) -> int:
    return max(10, rank // 10)


def _compute_dtype(weight: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is None:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}"
        )
    return compute_dtype


def _check_matrix(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.device.type != "meta":
        bad = int((~torch.isfinite(weight)).sum())
        if bad:
            raise ValueError(
                f"weight contains {bad} NaN/Inf value(s) out of {weight.numel()}; "
                "a decomposition of non-finite values is meaningless"
            )


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
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    return 0 if seed is None else int(seed)


def _svd_in_compute_dtype(
    weight: torch.Tensor,
    rank: RankSpec,
    *,
    method: str = "auto",
    oversample: int | None = None,
    n_iter: int = 4,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> TruncatedSVD:
    _check_matrix(weight)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    rows, cols = weight.shape
    r = resolve_matrix_rank(rank, rows, cols)
    if oversample is None:
        oversample = _default_oversample(r)
    elif isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be a non-negative integer, got {oversample!r}")
    dtype = _compute_dtype(weight, compute_dtype)

    if weight.device.type == "meta":
        meta = dict(device=weight.device, dtype=dtype)
        return TruncatedSVD(
            torch.empty(rows, r, **meta), torch.empty(r, **meta), torch.empty(r, cols, **meta)
        )

    if method == "auto":
        method = choose_svd_method(rows, cols, r, oversample)
    matrix = weight.detach().to(dtype)
    q = min(r + oversample, rows, cols)
    if method == "randomized" and q < min(rows, cols):
        with _seeded(matrix.device, _resolve_seed(seed, generator)):
            U, S, V = torch.svd_lowrank(matrix, q=q, niter=n_iter)
        return TruncatedSVD(U[:, :r], S[:r], V[:, :r].mT)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return TruncatedSVD(U[:, :r], S[:r], Vh[:r])


def truncated_svd(
    weight: torch.Tensor,
    rank: RankSpec,
    *,
    method: str = "auto",
    oversample: int | None = None,
    n_iter: int = 4,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> TruncatedSVD:
    """Best rank-``rank`` approximation ``U diag(S) Vh`` of a matrix (Eckart--Young).

    Args:
        weight: ``(rows, cols)`` floating-point matrix, on any device (meta included).
        rank: ``int`` rank or ``float`` parameter fraction, see
            :func:`factorized_layers.ranks.resolve_matrix_rank`.
        method: ``'full'`` (``torch.linalg.svd``, exact), ``'randomized'``
            (``torch.svd_lowrank``: Gaussian range finder with ``oversample`` extra
            columns and ``n_iter`` power iterations), or ``'auto'``
            (:func:`choose_svd_method`).
        oversample: Extra range-finder columns; default ``max(10, rank // 10)``.
        n_iter: Power iterations of the randomized path (more = closer to optimal).
        seed: Seed of the randomized path (default 0: reproducible by default). The
            global random state is not touched.
        generator: Alternative to ``seed``: one seed is drawn from it.
        compute_dtype: ``torch.float32`` or ``torch.float64``; default float64 for
            float64 input, float32 otherwise (so fp16/bf16 weights are upcast).

    Returns:
        :class:`TruncatedSVD` with ``U (rows, r)``, ``S (r,)``, ``Vh (r, cols)`` in
        ``weight``'s dtype, on ``weight``'s device.

    Raises:
        ValueError: Bad rank, non-2-D input, NaN/Inf values, unknown method.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> w = torch.randn(64, 32)
        >>> U, S, Vh = truncated_svd(w, 8)
        >>> (U.shape, S.shape, Vh.shape)
        (torch.Size([64, 8]), torch.Size([8]), torch.Size([8, 32]))
    """
    U, S, Vh = _svd_in_compute_dtype(
        weight,
        rank,
        method=method,
        oversample=oversample,
        n_iter=n_iter,
        seed=seed,
        generator=generator,
        compute_dtype=compute_dtype,
    )
    return TruncatedSVD(U.to(weight.dtype), S.to(weight.dtype), Vh.to(weight.dtype))


def low_rank_factors(
    weight: torch.Tensor,
    rank: RankSpec,
    **svd_options,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation.

    ``B = U sqrt(S)`` and ``A = sqrt(S) Vh``: splitting the singular values evenly
    keeps both factors on the same scale, which helps fp16/bf16 range and makes
    gradient steps on either factor comparable. The split happens in the compute
    dtype, before the cast back to ``weight.dtype``.

    Args:
        weight: ``(rows, cols)`` matrix.
        rank: Rank spec, as in :func:`truncated_svd`.
        **svd_options: Passed to :func:`truncated_svd`.

    Returns:
        ``(B, A)`` of shapes ``(rows, r)`` and ``(r, cols)`` in ``weight``'s dtype.

    Examples:
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> B, A = low_rank_factors(w, 4)
        >>> torch.allclose(B @ A, w)
        True
    """
    U, S, Vh = _svd_in_compute_dtype(weight, rank, **svd_options)
    root = S.sqrt()
    return (U * root).to(weight.dtype), (root[:, None] * Vh).to(weight.dtype)


def _check_gram(gram: torch.Tensor, features: int) -> None:
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.shape != (features, features):
        raise ValueError(
            f"gram must be the ({features}, {features}) input second-moment matrix, "
            f"got shape {tuple(gram.shape)}"
        )
    if gram.device.type != "meta" and not bool(torch.isfinite(gram).all()):
        raise ValueError("gram contains NaN/Inf values")


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


def whitening_root(gram: torch.Tensor, *, ridge: float = 1e-6) -> torch.Tensor:
    """A square root ``S`` with ``S @ S.T = gram + ridge * mean(diag(gram)) * I``.

    Computed by ``eigh`` with negative eigenvalues (rounding noise of a PSD matrix)
    clamped to zero, so singular or rank-deficient Gram matrices are fine: ``S`` then
    has (near-)zero columns and no inverse is ever formed. The small ridge ranks
    directions the data never visits by the weight itself, as plain SVD would.

    Examples:
        >>> x = torch.randn(100, 6, dtype=torch.float64)
        >>> S = whitening_root(x.T @ x, ridge=0.0)
        >>> torch.allclose(S @ S.T, x.T @ x)
        True
    """
    eigenvectors, root_eigenvalues = _whitening_eig(gram, ridge)
    return eigenvectors * root_eigenvalues


def _check_ridge(ridge: float) -> None:
    if (
        isinstance(ridge, bool)
        or not isinstance(ridge, (int, float))
        or ridge < 0
        or not math.isfinite(ridge)
    ):
        raise ValueError(f"ridge must be a finite non-negative float, got {ridge!r}")


_ROOT_CACHE: collections.OrderedDict = collections.OrderedDict()
_ROOT_CACHE_SIZE = 4
_ROOT_CACHE_LOCK = threading.Lock()
_ROOT_CACHE_USERS = 0


@contextlib.contextmanager
def whitening_cache() -> Iterator[None]:
    """Within the block, whitening ``eigh`` results are cached per Gram tensor.

    Fitting several candidate weights under one calibration Gram (as sequential
    calibration does) then computes its ``eigh`` once. The cache holds the last few
    Grams (a reference each, so an identity cannot be reused while cached) and is
    emptied when the outermost block exits; outside such a block nothing is cached.
    """
    global _ROOT_CACHE_USERS
    with _ROOT_CACHE_LOCK:
        _ROOT_CACHE_USERS += 1
    try:
        yield
    finally:
        with _ROOT_CACHE_LOCK:
            _ROOT_CACHE_USERS -= 1
            if _ROOT_CACHE_USERS == 0:
                _ROOT_CACHE.clear()


def normalized_whitening_eig(
    gram: torch.Tensor, device: torch.device, dtype: torch.dtype, ridge: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(E, d)`` of :func:`whitening_root` of ``gram`` scaled to unit mean diagonal.

    ``E * d`` is the root; ``E diag(d^-2) E^T / mean(diag(gram))`` is the inverse of
    ``gram`` plus its ridge. Inside :func:`whitening_cache` the ``eigh`` is cached by
    the identity and version of ``gram`` (for every ridge).
    """
    _check_ridge(ridge)
    key = (id(gram), gram._version, torch.device(device), dtype)
    with _ROOT_CACHE_LOCK:
        hit = _ROOT_CACHE.get(key) if _ROOT_CACHE_USERS else None
        if hit is not None:
            _ROOT_CACHE.move_to_end(key)
    if hit is None:
        normalized = _normalized_gram(gram, device, dtype)
        symmetric = (normalized + normalized.mT) / 2
        eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
        hit = (gram, eigenvectors, eigenvalues.clamp_min(0), symmetric.diagonal().mean())
        with _ROOT_CACHE_LOCK:
            if _ROOT_CACHE_USERS:
                _ROOT_CACHE[key] = hit
                while len(_ROOT_CACHE) > _ROOT_CACHE_SIZE:
                    _ROOT_CACHE.popitem(last=False)
    _, eigenvectors, eigenvalues, scale = hit
    return eigenvectors, (eigenvalues + ridge * scale.clamp_min(0)).sqrt()


def normalized_whitening_root(
    gram: torch.Tensor, device: torch.device, dtype: torch.dtype, ridge: float
) -> torch.Tensor:
    """:func:`whitening_root` of ``gram`` scaled to unit mean diagonal, in ``dtype``."""
    eigenvectors, root_eigenvalues = normalized_whitening_eig(gram, device, dtype, ridge)
    return eigenvectors * root_eigenvalues


def _whitening_eig(gram: torch.Tensor, ridge: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(E, d)``, ``E`` orthogonal and ``d >= 0``, with ``whitening_root(gram) = E * d``."""
    _check_ridge(ridge)
    symmetric = (gram + gram.mT) / 2
    scale = symmetric.diagonal().mean().clamp_min(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    eigenvalues = eigenvalues.clamp_min(0) + ridge * scale
    return eigenvectors, eigenvalues.sqrt()


def whitened_singular_values(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Singular values of ``weight @ S``: the output-error spectrum on the calibration data.

    ``||(W - W') X^T||_F = ||(W - W') S||_F`` for ``S S^T = X^T X``, so the tail of
    these values gives the best achievable output error of each rank.
    """
    _check_matrix(weight)
    _check_gram(gram, weight.shape[1])
    dtype = _compute_dtype(weight, compute_dtype)
    root = normalized_whitening_root(gram, weight.device, dtype, ridge)
    return torch.linalg.svdvals(weight.detach().to(dtype) @ root)


def whitened_low_rank_factors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    rank: RankSpec,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` minimising the output error ``||(W - B A) X^T||_F`` (SVD-LLM).

    With ``S S^T = X^T X`` (:func:`whitening_root`) and ``W S = U diag(s) V^T``, the best
    rank-``r`` output approximation is ``W' = U_r U_r^T W``: it reaches the optimum
    ``sqrt(sum_{i>r} s_i^2)`` and needs no inverse of ``S``, so rank-deficient
    calibration data cannot produce NaN/Inf. ``B = U_r D`` and ``A = D^{-1} U_r^T W``
    with ``D`` balancing the factors' scales. With isotropic inputs (``X^T X = c I``) this
    is exactly the truncated SVD.

    Args:
        weight: ``(out, in)`` matrix.
        gram: ``(in, in)`` input second-moment matrix ``X^T X`` (any float dtype).
        rank: Rank spec as in :func:`truncated_svd`.
        ridge: Relative ridge of :func:`whitening_root`.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (default as in
            :func:`truncated_svd`).

    Returns:
        ``(B, A)`` of shapes ``(out, r)`` and ``(r, in)`` in ``weight``'s dtype and device.

    Examples:
        >>> w = torch.randn(8, 6, dtype=torch.float64)
        >>> x = torch.randn(50, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64)
        >>> B, A = whitened_low_rank_factors(w, x.T @ x, 2, ridge=0.0)
        >>> torch.allclose(x @ (B @ A).T, x @ w.T)
        True
    """
    _check_matrix(weight)
    _check_gram(gram, weight.shape[1])
    rows, cols = weight.shape
    r = resolve_matrix_rank(rank, rows, cols)
    dtype = _compute_dtype(weight, compute_dtype)
    if weight.device.type == "meta":
        meta = dict(device=weight.device, dtype=weight.dtype)
        return torch.empty(rows, r, **meta), torch.empty(r, cols, **meta)
    matrix = weight.detach().to(dtype)
    root = normalized_whitening_root(gram, weight.device, dtype, ridge)
    left = torch.linalg.svd(matrix @ root, full_matrices=False).U[:, :r]
    projected = left.mT @ matrix
    balance = projected.norm(dim=1).sqrt()
    balance = torch.where(balance > 0, balance, torch.ones_like(balance))
    return (left * balance).to(weight.dtype), (projected / balance[:, None]).to(weight.dtype)


def relative_output_error(
    weight: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor
) -> float:
    """``||(W - W') X^T||_F / ||W X^T||_F`` from the Gram matrix ``X^T X`` (no activations).

    Examples:
        >>> x, w = torch.randn(30, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        >>> round(relative_output_error(w, 0 * w, x.T @ x), 6)
        1.0
    """
    g = gram.detach().to(device=weight.device, dtype=torch.float64)
    w = weight.detach().to(torch.float64)
    difference = w - approximation.detach().to(device=weight.device, dtype=torch.float64)
    numerator = torch.einsum("oi,ij,oj->", difference, g, difference).clamp_min(0)
    denominator = torch.einsum("oi,ij,oj->", w, g, w).clamp_min(1e-300)
    return math.sqrt(float(numerator / denominator))


def svd_tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """Eckart--Young optimum: relative Frobenius error of the best rank-``rank`` approximation.

    Args:
        singular_values: All singular values of the matrix (any order).
        rank: Number of singular values kept.

    Returns:
        ``sqrt(sum_{i > rank} s_i^2) / sqrt(sum_i s_i^2)`` (0 for a zero matrix).

    Examples:
        >>> svd_tail_error(torch.tensor([3.0, 4.0]), 1)
        0.6
    """
    s = torch.sort(singular_values.detach().double().abs(), descending=True).values
    total = float(s.square().sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(float(s[rank:].square().sum()) / total)


# ---------------------------------------------------------------------------
# CP (CANDECOMP/PARAFAC) decomposition by alternating least squares
# ---------------------------------------------------------------------------

_CP_MIN_RIDGE_STEP = 1e-4
_CP_MAX_RIDGE = 1e-1
_CP_CANCEL_COSINE = -0.85
_CP_STOP_WINDOW = 5
"""Sweeps over which CP-ALS averages the change of the error for its ``tol`` test."""


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
    if tensor.device.type != "meta":
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(
                f"tensor contains {bad} NaN/Inf value(s) out of {tensor.numel()}; "
                "a decomposition of non-finite values is meaningless"
            )


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


def _cp_svd_init(tensor: torch.Tensor, rank: int, generator: torch.Generator) -> list:
    """Leading left singular vectors of each unfolding (HOSVD), random columns beyond.

    The singular vectors come from the eigenvectors of the unfolding's Gram matrix
    (one threaded GEMM, then a small single-threaded ``eigh`` in float64), which
    avoids an SVD of the long unfolding.
    """
    factors = []
    for mode, size in enumerate(tensor.shape):
        unfolding = tensor.movedim(mode, 0).reshape(size, -1)
        gram = (unfolding @ unfolding.T).double()
        _, vectors = torch.linalg.eigh(gram)
        keep = min(size, unfolding.shape[1])
        U = vectors.flip(-1)[:, : min(rank, keep)].to(tensor.dtype)
        if U.shape[1] < rank:
            extra = torch.randn(
                size, rank - U.shape[1], generator=generator, device=tensor.device
            ).to(tensor.dtype)
            U = torch.cat([U, extra / extra.norm(dim=0).clamp_min(1e-30)], dim=1)
        factors.append(U)
    return factors


def _hadamard(matrices) -> torch.Tensor:
    """Element-wise product of equally shaped matrices, as a new tensor."""
    product = matrices[0] * matrices[1] if len(matrices) > 1 else matrices[0].clone()
    for matrix in matrices[2:]:
        product.mul_(matrix)
    return product


def _raised_ridge(ridge: float) -> float:
    """The ridge after a degeneracy: tenfold, at least ``_CP_MIN_RIDGE_STEP``, at most the cap."""
    return min(max(ridge * 10, _CP_MIN_RIDGE_STEP), _CP_MAX_RIDGE)


def _als_update(mttkrp: torch.Tensor, grams, mode: int, ridge: float, tiny: float):
    """Ridge-regularised normal equations of one factor, in float64.

    Returns ``(column norms, unit-column factor, its Gram matrix)``.
    """
    system = _hadamard([g for other, g in enumerate(grams) if other != mode])
    system.diagonal().add_(ridge * max(float(system.trace()) / system.shape[0], tiny))
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        update = torch.cholesky_solve(mttkrp.T, chol).T
    elif bool(torch.isfinite(system).all()):
        update = (torch.linalg.pinv(system, hermitian=True) @ mttkrp.T).T
    else:
        # A non-finite factor upstream: a NaN update lets the caller's error test see it.
        update = torch.full_like(mttkrp, math.nan)
    return _unit_columns(update)


def _unit_columns(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(column norms, unit-column matrix, its Gram matrix)`` of a float64 matrix.

    The norms come from the Gram matrix's diagonal, which is needed anyway; zero
    columns stay zero.
    """
    gram = matrix.T @ matrix
    norms = gram.diagonal().sqrt()
    # Columns of norm below 1e-150 (their squares near float64's underflow) are left
    # as they are: zero for all practical purposes, and never scaled up.
    safe = norms.clamp_min(1e-150)
    return norms, matrix / safe, gram / torch.outer(safe, safe)


def _cp_als_fit(
    tensor: torch.Tensor,
    rank: RankSpec,
    *,
    n_iter: int = 100,
    tol: float = 1e-5,
    seed: int | None = None,
    ridge: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    diverging_norm: float = 10.0,
    extrapolate: bool = True,
) -> CPDecomposition:
    from .ranks import resolve_cp_rank

    _check_cp_tensor(tensor)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0:
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    if (
        isinstance(ridge, bool)
        or not isinstance(ridge, (int, float))
        or not (math.isfinite(ridge) and 0.0 <= ridge <= _CP_MAX_RIDGE)
    ):
        raise ValueError(f"ridge must be a number in [0, {_CP_MAX_RIDGE}], got {ridge!r}")
    if (
        isinstance(diverging_norm, bool)
        or not isinstance(diverging_norm, (int, float))
        or not (math.isfinite(diverging_norm) and diverging_norm > 1.0)
    ):
        raise ValueError(f"diverging_norm must be a finite number > 1, got {diverging_norm!r}")
    shape = tuple(tensor.shape)
    r = resolve_cp_rank(rank, shape)
    dtype = _compute_dtype(tensor, compute_dtype)

    if tensor.device.type == "meta":
        meta = dict(device=tensor.device, dtype=dtype)
        return CPDecomposition(
            torch.empty(r, **meta),
            tuple(torch.empty(size, r, **meta) for size in shape),
            float("nan"),
            0,
            False,
            False,
            float(ridge),
        )

    data = tensor.detach().to(dtype)
    # Two-step scaling (max, then norm) so that the norm neither overflows nor
    # underflows in float32 for kernels of extreme magnitude.
    peak = data.abs().amax()
    if float(peak) > 0.0:
        data = data / peak
    scale = float(data.norm().double()) * float(peak)
    generator = torch.Generator(device=data.device).manual_seed(0 if seed is None else int(seed))
    if float(peak) == 0.0:
        factors = _cp_svd_init(data, r, generator)
        return CPDecomposition(
            torch.zeros(r, device=data.device, dtype=dtype),
            tuple(factors),
            0.0,
            0,
            True,
            False,
            float(ridge),
        )
    # Work on the unit-norm tensor: weights are then O(1) for a healthy fit, which
    # makes the degeneracy thresholds scale-free and avoids fp32 over/underflow.
    data = data / data.norm()
    factors = _cp_svd_init(data, r, generator)
    # Small R x R algebra (Gram matrices, solves) and the factors' master copies
    # (``units``: unit columns at every ALS point, moved by the momentum step in
    # between) are float64; ``factors`` are their copies in the compute dtype for
    # the tensor-sized contractions.
    units = [f.double() for f in factors]
    grams = [u.T @ u for u in units]
    weights = torch.ones(r, device=data.device, dtype=torch.float64)
    tiny = torch.finfo(dtype).eps
    current_ridge = float(ridge)
    degenerate = False
    converged = False
    best = (math.inf, weights, list(units))
    groups = [_GroupContraction(data, group) for group in _mode_groups(shape)]
    # The first mode a sweep updates does not depend on its own previous value, so
    # the momentum step moves only the others.
    moved = [n for n in range(data.dim()) if n != groups[0].group[0]]
    history: List[float] = []
    previous_units, previous_error, momentum_steps = None, math.inf, 0
    sweeps = 0
    for sweep in range(1, n_iter + 1):
        sweeps = sweep
        for plan in groups:
            partial = plan.partial(factors)
            for mode in plan.group:
                mttkrp = _mttkrp_from_partial(partial, plan.group, factors, mode).double()
                weights, units[mode], grams[mode] = _als_update(
                    mttkrp, grams, mode, current_ridge, tiny
                )
                factors[mode] = units[mode].to(dtype)

        # ||T - X||^2 = 1 - 2 <T, X> + ||X||^2 (||T|| = 1) from the last MTTKRP and
        # the Gram matrices: no reconstruction. It loses digits by cancellation for
        # close fits, so below a 3% error the residual is formed exactly. A non-finite
        # entry of any factor reaches a Gram matrix or the MTTKRP, hence the error.
        inner = float((mttkrp * units[mode]).sum(0) @ weights)
        squared = 1.0 - 2.0 * inner + float(weights @ _hadamard(grams) @ weights)
        if squared < 1e-3:
            error = float((data - cp_to_tensor(weights.to(dtype), factors)).norm())
        else:
            error = math.sqrt(squared)
        if not math.isfinite(error):
            # A non-finite update: go back to the best iterate with a stronger ridge.
            degenerate = True
            current_ridge = _raised_ridge(current_ridge)
            _, weights, units = best[0], best[1], list(best[2])
            factors = [u.to(dtype) for u in units]
            grams = [u.T @ u for u in units]
            previous_units, previous_error, momentum_steps = None, math.inf, 0
            history.clear()
            continue
        if error < best[0]:
            # No copies: every update below rebinds, none writes in place.
            best = (error, weights, list(units))

        # Degeneracy (Phan et al. 2020): rank-1 terms whose norms grow far beyond the
        # tensor's while pairs of them point in opposite directions and cancel.
        big_weight = float(weights.max()) > diverging_norm
        guard_fired = False
        if big_weight and r > 1:
            congruence = _hadamard(grams)
            congruence.fill_diagonal_(0.0)
            heavy = weights > 1.0
            cancelling = congruence[heavy][:, heavy]
            if cancelling.numel() and float(cancelling.min()) < _CP_CANCEL_COSINE:
                degenerate = guard_fired = True
                current_ridge = _raised_ridge(current_ridge)
                # The momentum direction predates the stronger ridge.
                previous_units, momentum_steps = None, 0

        # Change per sweep, averaged over a window, of the explained share of the
        # tensor's energy (||T|| = 1), which decides for poor fits, and of the error
        # relative to itself at 10 * tol, which decides for close ones. Changes count
        # either way: the error rises while a momentum overshoot or a raised ridge is
        # being recovered from, which is no sign of convergence.
        history.append(error)
        window = min(len(history) - 1, _CP_STOP_WINDOW)
        earlier = history[-1 - window]
        stalled = (
            window > 0
            and not guard_fired
            and abs(earlier**2 - error**2) <= window * tol
            and abs(earlier - error) <= 10 * window * tol * max(earlier, tiny)
        )
        # "Exact": within a few roundings, or within the ridge's own bias.
        if error <= 10 * max(tiny, current_ridge) or stalled:
            converged = True
            break

        if extrapolate and sweep < n_iter:
            # Nesterov-type momentum with restart (Mitchell, Ye & De Sterck 2020): the
            # next sweep starts beyond this ALS point, away from the previous one, by
            # (k - 1) / (k + 2) of the step after k sweeps in a row whose error did not
            # rise; a sweep whose error rose restarts the count (no momentum).
            point = list(units)
            if previous_units is not None and error <= previous_error:
                momentum_steps += 1
                beta = (momentum_steps - 1) / (momentum_steps + 2)
                for n in moved if beta > 0 else ():
                    units[n] = torch.lerp(previous_units[n], point[n], 1.0 + beta)
                    factors[n] = units[n].to(dtype)
                    grams[n] = units[n].T @ units[n]
            else:
                momentum_steps = 0
            previous_units, previous_error = point, error

    _, weights, units = best
    weights = weights.to(dtype)
    factors = [u.to(dtype) for u in units]
    # The exact error of the returned iterate (the loop may have used the estimate).
    error = float((data - cp_to_tensor(weights, factors)).norm())
    return CPDecomposition(
        weights * scale,
        tuple(factors),
        float(error),
        sweeps,
        converged,
        degenerate,
        current_ridge,
    )


def cp_als(
    tensor: torch.Tensor,
    rank: RankSpec,
    *,
    n_iter: int = 100,
    tol: float = 1e-5,
    seed: int | None = None,
    ridge: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    diverging_norm: float = 10.0,
    extrapolate: bool = True,
) -> CPDecomposition:
    """CP (CANDECOMP/PARAFAC) decomposition of an N-way tensor by alternating least squares.

    Finds ``weights`` and unit-column ``factors`` with
    ``tensor ~= sum_r weights[r] * factors[0][:, r] o ... o factors[N-1][:, r]``.

    * **Initialisation**: leading left singular vectors of every unfolding (HOSVD);
      only when ``rank`` exceeds a mode's size are the remaining columns random
      (seeded by ``seed``, the global random state is not touched).
    * **Sweeps**: each factor solves its normal equations (Hadamard product of the
      other factors' Gram matrices plus ``ridge`` times its mean diagonal, Cholesky in
      float64) against the MTTKRP. The modes form two groups; per group one GEMM of
      the tensor's unfolding with the Khatri--Rao product of the other group's
      factors serves every mode of the group, whose MTTKRPs follow by rank-wise
      broadcast products. The columns are then normalised into ``weights``.
    * **Momentum** (``extrapolate=True``; Nesterov-type acceleration of ALS with
      restart, Mitchell, Ye & De Sterck 2020): after ``k`` sweeps in a row whose
      error did not rise, the next sweep starts ``(k - 1) / (k + 2)`` of the last
      step beyond the ALS point (the factors but the first-updated one move); a
      sweep whose error rose, or a raised ridge, restarts the count. It needs no
      extra error evaluation. On default-initialised 128x64x3x3 kernels (ranks
      30--120), a 256x256x3x3 kernel (rank 113) and two kernels of the trained
      digits CNN it reached the error of 100 plain sweeps in 32--39 sweeps.
    * **Stopping**: when, on average over the last 5 sweeps, a sweep changes the
      explained share of the tensor's energy by less than ``tol`` (the squared
      relative error ``e**2`` moves by less than ``tol``) and ``e`` by less than
      ``10 * tol`` of itself -- changes count either way, since ``e`` rises while
      a momentum overshoot or a raised ridge is recovered from; when the fit is
      exact to working precision (relative error below ten times the larger of the
      dtype's epsilon and the ridge, whose bias is of that order -- pass
      ``ridge=0`` to fit exact tensors further); or after ``n_iter`` sweeps. The
      energy test decides for poor fits, whose error moves little per sweep
      although each sweep still adds a fair share of what the fit explains; the
      relative test lets close fits converge fully.
    * **Degeneracy guard**: when rank-1 terms grow to more than ``diverging_norm``
      times the tensor's norm while two of them have congruence (product of cosines over all modes)
      below -0.85 -- the diverging, cancelling components of a degenerate CP fit --
      or an update turns non-finite, the ridge is raised tenfold (from at least
      1e-4, at most 0.1), ``degenerate`` is reported, and the best iterate seen is
      returned.

    Memory stays within a small multiple of the tensor for ranks up to its mode
    sizes: one unfolded copy of it per group of modes; Khatri--Rao products and
    partial contractions of ``rank`` times the product of one group's sizes (for a
    ``(C_out, C_in, k, k)`` kernel, ``rank * C * k`` entries); and, for the exact
    error at the end and below a 3% error, one reconstruction whose Khatri--Rao
    product holds ``numel * rank / max(shape)`` entries.

    Args:
        tensor: Floating tensor with at least 2 modes, on any device (meta included).
        rank: ``int`` rank or ``float`` parameter fraction, see
            :func:`factorized_layers.ranks.resolve_cp_rank`.
        n_iter: Maximum number of ALS sweeps (``>= 1``).
        tol: Stop when ``|e_{k-w}**2 - e_k**2| <= w * tol`` and
            ``|e_{k-w} - e_k| <= 10 * w * tol * e_{k-w}`` for the relative error ``e``
            after sweep ``k``, over the last ``w = min(k - 1, 5)`` sweeps (``0``:
            run ``n_iter`` sweeps unless the fit is exact).
        seed: Seed of the random columns used when ``rank`` exceeds a mode size
            (default 0: reproducible by default).
        ridge: Relative Tikhonov term of the normal equations, in ``[0, 0.1]``.
        compute_dtype: ``torch.float32`` or ``torch.float64``; default float64 for
            float64 input, float32 otherwise (so fp16/bf16 tensors are upcast).
        diverging_norm: Weight, relative to the tensor's norm, above which a rank-1
            term counts as diverging for the degeneracy guard (default 10).
        extrapolate: Start each sweep with the momentum step (default ``True``).

    Returns:
        :class:`CPDecomposition` with weights and factors in ``tensor``'s dtype, on
        ``tensor``'s device, plus the relative error, sweeps, convergence and
        degeneracy flags, and the final ridge.

    Raises:
        ValueError: Bad rank, fewer than 2 modes, empty or NaN/Inf input, bad options.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 5, 4)]
        >>> tensor = torch.einsum("ir,jr,kr->ijk", *factors)
        >>> result = cp_als(tensor, 3, tol=0.0, n_iter=500)
        >>> result.weights.shape, [f.shape[0] for f in result.factors]
        (torch.Size([3]), [6, 5, 4])
        >>> result.error < 1e-6
        True
    """
    result = _cp_als_fit(
        tensor,
        rank,
        n_iter=n_iter,
        tol=tol,
        seed=seed,
        ridge=ridge,
        compute_dtype=compute_dtype,
        diverging_norm=diverging_norm,
        extrapolate=extrapolate,
    )
    return result._replace(
        weights=result.weights.to(tensor.dtype),
        factors=tuple(f.to(tensor.dtype) for f in result.factors),
    )


def cp_factors(tensor: torch.Tensor, rank: RankSpec, **als_options) -> CPDecomposition:
    """CP-ALS with the weights spread evenly over the factors (``weights`` all ones).

    Each factor's column ``r`` is scaled by ``weights[r] ** (1 / N)`` in the compute
    dtype before the cast back, which keeps every factor on the same scale (like
    :func:`low_rank_factors` splitting the singular values) so that
    ``cp_to_tensor(None, result.factors)`` approximates ``tensor``.

    Args:
        tensor: N-way tensor.
        rank: Rank spec, as in :func:`cp_als`.
        **als_options: Passed to :func:`cp_als`.

    Returns:
        :class:`CPDecomposition` whose ``weights`` are ones and whose factors carry
        the scale.

    Examples:
        >>> t = torch.randn(4, 3, 2, dtype=torch.float64)
        >>> res = cp_factors(t, 6, n_iter=300, tol=0.0)
        >>> res.error < 0.05, torch.allclose(res.weights, torch.ones(6, dtype=t.dtype))
        (True, True)
    """
    result = _cp_als_fit(tensor, rank, **als_options)
    root = result.weights.clamp_min(0) ** (1.0 / len(result.factors))
    return result._replace(
        weights=torch.ones_like(result.weights).to(tensor.dtype),
        factors=tuple((f * root).to(tensor.dtype) for f in result.factors),
    )


def whiten_mode(
    tensor: torch.Tensor,
    gram: torch.Tensor,
    mode: int,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``tensor x_mode S^T`` for the :func:`whitening_root` ``S`` of ``gram`` (normalised).

    When ``mode`` is the input-channel mode of a kernel and ``gram`` the Gram matrix of
    the input channels over all positions, Frobenius errors of the result weigh each
    channel direction by how much the data visits it.

    Args:
        tensor: Any floating tensor (meta included).
        gram: ``(n, n)`` Gram matrix, ``n = tensor.shape[mode]``.
        mode: The mode to whiten.
        ridge: Relative ridge of :func:`whitening_root`.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (default as in
            :func:`truncated_svd`).

    Returns:
        The whitened tensor in the compute dtype, on ``tensor``'s device.

    Raises:
        ValueError: Bad ``mode``, ``ridge`` or Gram shape, NaN/Inf Gram.

    Examples:
        >>> t = torch.randn(4, 3, 2, dtype=torch.float64)
        >>> torch.allclose(whiten_mode(t, torch.eye(3), 1, ridge=0.0), t)
        True
    """
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < tensor.dim():
        raise ValueError(f"mode must be an integer in [0, {tensor.dim() - 1}], got {mode!r}")
    _check_gram(gram, tensor.shape[mode])
    _check_ridge(ridge)
    dtype = _compute_dtype(tensor, compute_dtype)
    if tensor.device.type == "meta":
        return torch.empty(tensor.shape, device="meta", dtype=dtype)
    vectors, values = _whitening_eig(_normalized_gram(gram, tensor.device, torch.float64), ridge)
    return mode_dot(tensor.detach().to(dtype), (vectors * values).mT.to(dtype), mode)


def whitened_cp_factors(
    tensor: torch.Tensor,
    gram: torch.Tensor,
    rank: RankSpec,
    *,
    mode: int = 1,
    whitening_ridge: float = 1e-6,
    **als_options,
) -> CPDecomposition:
    """CP factors fitted in the metric of one mode's input Gram (data-aware CP).

    For a convolution kernel ``(out, in, kh, kw)`` and the Gram of the input channels
    over every batch element and position, the error of each input-channel direction
    counts as much as the data visits it (a dead channel costs nothing). Steps:

    1. CP-ALS (:func:`cp_als`) of :func:`whiten_mode` ``(tensor, gram, mode)``;
    2. back to the original space without inverting the Gram: the ``mode`` factor is
       refit by least squares against ``tensor`` with the other factors fixed. For an
       invertible whitening root this is the same minimiser as in the whitened
       metric (``S^{-T}`` times the whitened one), and directions the data never
       visits get the plain least-squares fit of the weights instead of an amplified
       one;
    3. the weights spread evenly over the factors, as in :func:`cp_factors`.

    With an identity (or all-zero) Gram this is :func:`cp_factors` followed by one
    least-squares refit of ``mode``, which never raises the fit error.

    Args:
        tensor: Floating tensor with at least 2 modes, on any device (meta included).
        gram: ``(n, n)`` Gram matrix of the data along ``mode`` (``n = tensor.shape[mode]``).
        rank: Rank spec, as in :func:`cp_als`.
        mode: The data mode (1, input channels, for a convolution kernel).
        whitening_ridge: Relative ridge of :func:`whitening_root`.
        **als_options: ``n_iter``, ``tol``, ``seed``, ``ridge``, ``compute_dtype``,
            ``diverging_norm`` of :func:`cp_als`.

    Returns:
        :class:`CPDecomposition` with ``weights`` all ones, factors in ``tensor``'s
        dtype, and ``error`` the relative error in the whitened metric
        ``||(T - T') x_mode S^T|| / ||T x_mode S^T||``.

    Raises:
        ValueError: Bad rank, mode, ridge, options or Gram shape; NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> kernel = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
        >>> x = torch.randn(40, 2, generator=g, dtype=torch.float64)
        >>> x = x @ torch.randn(2, 5, generator=g, dtype=torch.float64)  # 2 live directions
        >>> result = whitened_cp_factors(kernel, x.T @ x, 18, n_iter=500, tol=0.0)
        >>> result.error < 1e-3
        True
    """
    _check_cp_tensor(tensor)
    whitened = whiten_mode(
        tensor,
        gram,
        mode,
        ridge=whitening_ridge,
        compute_dtype=als_options.get("compute_dtype"),
    )
    if tensor.device.type == "meta":
        return cp_factors(tensor, rank, **als_options)
    fit = _cp_als_fit(whitened, rank, **als_options)
    dtype = whitened.dtype
    work = tensor.detach().to(dtype)
    factors = list(fit.factors)
    mttkrp = _GroupContraction(work, (mode,)).partial(factors).double()
    grams = [f.double().mT @ f.double() for f in factors]
    # The caller's ridge, not fit.ridge: the degeneracy guard may have raised that one
    # (up to 0.1), which would bias this exact least-squares refit.
    refit_ridge = als_options.get(
        "ridge", inspect.signature(_cp_als_fit).parameters["ridge"].default
    )
    weights, unit, _ = _als_update(mttkrp, grams, mode, refit_ridge, torch.finfo(dtype).eps)
    factors[mode] = unit.to(dtype)
    root = weights.clamp_min(0) ** (1.0 / len(factors))
    factors = [f * root.to(dtype) for f in factors]
    reference = float(whitened.double().norm())
    if reference == 0.0:
        error = 0.0
    else:
        residual = whiten_mode(
            work - cp_to_tensor(None, factors),
            gram,
            mode,
            ridge=whitening_ridge,
            compute_dtype=dtype,
        )
        error = float(residual.double().norm()) / reference
    return fit._replace(
        weights=torch.ones(len(root), device=work.device, dtype=tensor.dtype),
        factors=tuple(f.to(tensor.dtype) for f in factors),
        error=error,
    )


# ---------------------------------------------------------------------------
# Tucker decomposition: HOSVD and HOOI on N-way tensors
# ---------------------------------------------------------------------------


class TuckerDecomposition(NamedTuple):
    """A Tucker tensor ``core x_0 factors[0] x_1 factors[1] ...``."""

    core: torch.Tensor
    """Core of shape ``ranks``."""
    factors: Tuple[torch.Tensor, ...]
    """One ``(size_k, rank_k)`` factor per mode, orthonormal columns."""
    error: float
    """Relative Frobenius error ``||T - tucker|| / ||T||`` (NaN on meta, 0 for T = 0)."""
    n_iter: int
    """HOOI sweeps run (0 for HOSVD)."""


def _check_tucker_tensor(tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() < 1 or tensor.numel() == 0:
        raise ValueError(f"tensor must have at least one non-empty mode, got {tuple(tensor.shape)}")
    if tensor.device.type != "meta":
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(
                f"tensor contains {bad} NaN/Inf value(s) out of {tensor.numel()}; "
                "a decomposition of non-finite values is meaningless"
            )


def mode_dot(tensor: torch.Tensor, matrix: torch.Tensor | None, mode: int) -> torch.Tensor:
    """Mode-``mode`` product ``tensor x_mode matrix``: mode size ``n`` becomes ``matrix.shape[0]``.

    Args:
        tensor: Any tensor.
        matrix: ``(m, n)`` with ``n = tensor.shape[mode]``; ``None`` means identity.
        mode: The mode to multiply.

    Examples:
        >>> t, m = torch.randn(2, 3, 4), torch.randn(5, 3)
        >>> torch.allclose(mode_dot(t, m, 1), torch.einsum("ijk,mj->imk", t, m), atol=1e-6)
        True
    """
    if matrix is None:
        return tensor
    moved = tensor.movedim(mode, -1)
    return (moved @ matrix.mT).movedim(-1, mode)


def tucker_to_tensor(core: torch.Tensor, factors) -> torch.Tensor:
    """The full tensor ``core x_0 factors[0] x_1 factors[1] ...`` (``None`` = identity).

    Examples:
        >>> core, a, b = torch.randn(2, 3), torch.randn(4, 2), torch.randn(5, 3)
        >>> torch.allclose(tucker_to_tensor(core, [a, b]), a @ core @ b.T, atol=1e-6)
        True
    """
    result = core
    for mode, factor in enumerate(factors):
        result = mode_dot(result, factor, mode)
    return result


def _unfolding(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _leading_left(tensor: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of the mode-``mode`` unfolding.

    A mode kept whole (``rank`` = its size) gets the identity: no truncation, and
    the rank may then exceed what the unfolding's SVD could return.
    """
    size = tensor.shape[mode]
    if rank == size:
        return torch.eye(size, device=tensor.device, dtype=tensor.dtype)
    return _left_singular_vectors(_unfolding(tensor, mode), rank)


def _left_singular_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of an (already checked) matrix.

    Unfoldings are usually short and very wide (``16 x 36864``), where a full SVD
    spends its time on the right vectors nobody needs: there the eigenvectors of
    the Gram matrix ``A A^T``, formed and diagonalised in float64 (so squaring the
    singular values costs no float32 accuracy), are much faster.
    """
    rows, cols = matrix.shape
    if cols >= 2 * rows:
        gram = matrix.double() @ matrix.double().mT
        _, vectors = torch.linalg.eigh(gram)
        return vectors.flip(-1)[:, :rank].to(matrix.dtype)
    return torch.linalg.svd(matrix, full_matrices=False).U[:, :rank]


def _project_all_but(tensor: torch.Tensor, factors, skip: int) -> torch.Tensor:
    for mode, factor in enumerate(factors):
        if mode != skip:
            tensor = mode_dot(tensor, factor.mT, mode)
    return tensor


def _tucker_setup(tensor, ranks, compute_dtype):
    from .ranks import resolve_tucker_ranks

    _check_tucker_tensor(tensor)
    ranks = resolve_tucker_ranks(ranks, tuple(tensor.shape))
    return ranks, _compute_dtype(tensor, compute_dtype)


def _meta_tucker(tensor: torch.Tensor, ranks) -> TuckerDecomposition:
    meta = dict(device=tensor.device, dtype=tensor.dtype)
    factors = tuple(torch.empty(n, r, **meta) for n, r in zip(tensor.shape, ranks))
    return TuckerDecomposition(torch.empty(ranks, **meta), factors, math.nan, 0)


def _relative_error(core: torch.Tensor, norm: float) -> float:
    # ||T - G x U||^2 = ||T||^2 - ||G||^2 for orthonormal factors; accumulated in fp64.
    if norm == 0.0:
        return 0.0
    kept = float(core.double().square().sum())
    return math.sqrt(max(norm**2 - kept, 0.0)) / norm


def _exact_error(work: torch.Tensor, core: torch.Tensor, factors, norm: float) -> float:
    if norm == 0.0:
        return 0.0
    return float((tucker_to_tensor(core, factors) - work).double().norm()) / norm


def _finish(
    core: torch.Tensor, factors, error: float, n_iter: int, dtype: torch.dtype
) -> TuckerDecomposition:
    return TuckerDecomposition(core.to(dtype), tuple(f.to(dtype) for f in factors), error, n_iter)


def hosvd(
    tensor: torch.Tensor, ranks, *, compute_dtype: torch.dtype | None = None
) -> TuckerDecomposition:
    """Truncated higher-order SVD: leading left singular vectors of every unfolding.

    Args:
        tensor: An N-way floating tensor on any device (meta included).
        ranks: Multilinear ranks: an ``int`` for every mode, a tuple, or a ``float``
            parameter fraction (see :func:`factorized_layers.ranks.resolve_tucker_ranks`).
        compute_dtype: ``torch.float32`` or ``torch.float64``; default float64 for
            float64 input, float32 otherwise.

    Returns:
        :class:`TuckerDecomposition` in ``tensor``'s dtype and device; ``error`` is
        measured on the reconstruction.

    Raises:
        ValueError: Bad ranks (naming value and valid range), NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> t = torch.randn(6, 5, 4, dtype=torch.float64)
        >>> core, factors, error, _ = hosvd(t, (6, 5, 4))
        >>> error < 1e-12
        True
    """
    ranks, dtype = _tucker_setup(tensor, ranks, compute_dtype)
    if tensor.device.type == "meta":
        return _meta_tucker(tensor, ranks)
    work = tensor.detach().to(dtype)
    factors = tuple(_leading_left(work, k, r) for k, r in enumerate(ranks))
    core = tucker_to_tensor(work, [f.mT for f in factors])
    error = _exact_error(work, core, factors, float(work.double().norm()))
    return _finish(core, factors, error, 0, tensor.dtype)


def hosvd_energy(
    tensor: torch.Tensor, *, compute_dtype: torch.dtype | None = None
) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """Full HOSVD bases and the squared all-orthogonal core, for rank allocation.

    With ``U_k`` all left singular vectors of the mode-``k`` unfolding (at most
    ``min(size_k, prod(other sizes))`` of them), ``S = T x_k U_k^T`` is
    all-orthogonal and truncating the bases to ranks ``r`` leaves the core block
    ``S[:r_0, :r_1, ...]``. ``energy = S ** 2`` (float64) therefore gives the error of
    every truncated HOSVD by a prefix sum, see
    :func:`factorized_layers.ranks.allocate_tucker_ranks`.

    Returns:
        ``(bases, energy)`` in the compute dtype (energy in float64).

    Examples:
        >>> bases, energy = hosvd_energy(torch.randn(4, 3, 2))
        >>> energy.shape, round(float(energy.sum()), 3) > 0
        (torch.Size([4, 3, 2]), True)
    """
    from .ranks import max_tucker_ranks

    _check_tucker_tensor(tensor)
    dtype = _compute_dtype(tensor, compute_dtype)
    limits = max_tucker_ranks(tuple(tensor.shape))
    if tensor.device.type == "meta":
        return tuple(
            torch.empty(n, r, device="meta", dtype=dtype) for n, r in zip(tensor.shape, limits)
        ), torch.empty(limits, device="meta", dtype=torch.float64)
    work = tensor.detach().to(dtype)
    # All singular vectors (not the identity _leading_left gives a whole mode): the
    # prefix property needs the singular-vector order on every mode.
    bases = tuple(_left_singular_vectors(_unfolding(work, k), r) for k, r in enumerate(limits))
    core = tucker_to_tensor(work, [b.mT for b in bases])
    return bases, core.double().square()


def hooi(
    tensor: torch.Tensor,
    ranks,
    *,
    n_iter: int = 30,
    tol: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> TuckerDecomposition:
    """Tucker decomposition by higher-order orthogonal iteration, HOSVD-initialised.

    Each sweep replaces every factor by the leading left singular vectors of the
    tensor projected on all the other factors. The best iterate is kept, so the
    error is never above :func:`hosvd`'s; for a matrix (two modes) HOSVD is already
    the truncated-SVD optimum (Eckart--Young) and HOOI keeps it.

    Args:
        tensor: An N-way floating tensor on any device (meta included).
        ranks: Multilinear ranks, as in :func:`hosvd`.
        n_iter: Most sweeps (``0`` returns the HOSVD).
        tol: Stop when a sweep lowers the relative error by less than ``tol``.
        compute_dtype: As in :func:`hosvd`.

    Returns:
        :class:`TuckerDecomposition` in ``tensor``'s dtype and device.

    Raises:
        ValueError: Bad ranks, ``n_iter`` or ``tol``, NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> t = torch.randn(8, 7, 6, dtype=torch.float64)
        >>> hooi(t, (3, 3, 3)).error <= hosvd(t, (3, 3, 3)).error
        True
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite non-negative number, got {tol!r}")
    ranks, dtype = _tucker_setup(tensor, ranks, compute_dtype)
    if tensor.device.type == "meta":
        return _meta_tucker(tensor, ranks)
    work = tensor.detach().to(dtype)
    norm = float(work.double().norm())
    factors = [_leading_left(work, k, r) for k, r in enumerate(ranks)]
    core = tucker_to_tensor(work, [f.mT for f in factors])
    start = (core, tuple(factors))
    best_error = _relative_error(core, norm)
    best = start
    sweeps = 0
    previous = best_error
    for _ in range(n_iter):
        if best_error == 0.0:
            break
        sweeps += 1
        for k, r in enumerate(ranks):
            if r < work.shape[k]:
                factors[k] = _leading_left(_project_all_but(work, factors, k), k, r)
        core = tucker_to_tensor(work, [f.mT for f in factors])
        error = _relative_error(core, norm)
        if error < best_error:
            best_error, best = error, (core, tuple(factors))
        if previous - error < tol:
            break
        previous = error
    # The sweeps compared errors through ||T||^2 - ||G||^2; decide the final
    # HOSVD-or-HOOI choice on the exact errors so that it can never lose to HOSVD.
    error = _exact_error(work, best[0], best[1], norm)
    if best is not start:
        start_error = _exact_error(work, start[0], start[1], norm)
        if start_error < error:
            best, error = start, start_error
    return _finish(best[0], best[1], error, sweeps, tensor.dtype)


def mode_grams(gram: torch.Tensor, shape: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """Per-mode Gram matrices of inputs seen as tensors of ``shape`` (partial traces).

    For inputs ``x_t`` reshaped (row-major) to ``shape``, the mode-``k`` Gram is
    ``sum_t X_t(k) X_t(k)^T`` with ``X_t(k)`` the mode-``k`` unfolding of ``x_t``: the
    full Gram ``sum_t x_t x_t^T`` with every other mode traced out, so no new
    statistics are needed.

    Args:
        gram: ``(n, n)`` Gram matrix, ``n = prod(shape)``.
        shape: Modes of the inputs.

    Returns:
        One ``(shape[k], shape[k])`` matrix per mode, in ``gram``'s dtype and device.

    Raises:
        ValueError: If ``gram`` is not ``(prod(shape), prod(shape))``.

    Examples:
        >>> x = torch.randn(5, 6, dtype=torch.float64)
        >>> g0, g1 = mode_grams(x.T @ x, (2, 3))
        >>> xs = x.reshape(5, 2, 3)
        >>> torch.allclose(g0, torch.einsum("tab,tcb->ac", xs, xs))
        True
    """
    shape = tuple(int(n) for n in shape)
    features = math.prod(shape)
    _check_gram(gram, features)
    order = len(shape)
    if order == 1:
        return (gram,)
    letters = "abcdefghijklmnopqrstuvwxyz"[:order]
    tensor = gram.reshape(shape + shape)
    grams = []
    for k in range(order):
        columns = "".join(c.upper() if j == k else c for j, c in enumerate(letters))
        grams.append(torch.einsum(f"{letters}{columns}->{letters[k]}{letters[k].upper()}", tensor))
    return tuple(grams)


def _input_mode_roots(
    gram: torch.Tensor, in_shape: Tuple[int, ...], ridge: float, dtype: torch.dtype
) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """The normalised Gram (float64) and ``(E_k, d_k)`` (in ``dtype``) of every mode's root."""
    normalized = _normalized_gram(gram, gram.device, torch.float64)
    # Trace of the normalised Gram = in_features, so every mode's ridge term is the
    # partial trace of ridge * I: the modes share one regularisation.
    roots = [_whitening_eig(g, ridge) for g in mode_grams(normalized, in_shape)]
    return normalized, [(e.to(dtype), d.to(dtype)) for e, d in roots]


def _check_in_modes(tensor: torch.Tensor, in_modes: int) -> Tuple[int, ...]:
    if (
        isinstance(in_modes, bool)
        or not isinstance(in_modes, int)
        or not (1 <= in_modes <= tensor.dim())
    ):
        raise ValueError(
            f"in_modes must be an integer in [1, {tensor.dim()}] (the tensor has "
            f"{tensor.dim()} modes), got {in_modes!r}"
        )
    return tuple(tensor.shape[tensor.dim() - in_modes :])


def whiten_input_modes(
    tensor: torch.Tensor,
    gram: torch.Tensor,
    in_modes: int,
    *,
    ridge: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``tensor`` with every input mode multiplied by its whitening root: ``T x_k S_k^T``.

    The last ``in_modes`` modes of ``tensor`` are the input modes of a weight tensor
    (``out_shape + in_shape``); ``S_k`` is the :func:`whitening_root` of the
    mode-``k`` Gram (:func:`mode_grams` of the normalised ``gram``). For
    Kronecker-structured inputs (``gram = G_1 (x) G_2 (x) ...``) the Frobenius error of
    a Tucker approximation of the result is exactly the output error on the data;
    otherwise it is the Kronecker approximation of it. Its HOSVD energy ranks Tucker
    budgets by output error (:func:`whitened_tucker` decomposes it).

    Args:
        tensor: ``out_shape + in_shape`` weight tensor.
        gram: ``(in, in)`` input Gram matrix ``X^T X``, ``in = prod(in_shape)``.
        in_modes: Number of trailing input modes.
        ridge: Relative ridge of :func:`whitening_root`.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (default as in :func:`hosvd`).

    Returns:
        The whitened tensor in the compute dtype (so that low-precision weights lose
        nothing), on ``tensor``'s device.

    Examples:
        >>> w = torch.randn(4, 2, 3, dtype=torch.float64)
        >>> eye = torch.eye(6, dtype=torch.float64)
        >>> torch.allclose(whiten_input_modes(w, eye, 2, ridge=0.0), w * 6**0.5)
        True
    """
    _check_tucker_tensor(tensor)
    in_shape = _check_in_modes(tensor, in_modes)
    _check_gram(gram, math.prod(in_shape))
    dtype = _compute_dtype(tensor, compute_dtype)
    if tensor.device.type == "meta":
        return torch.empty(tensor.shape, device="meta", dtype=dtype)
    _, roots = _input_mode_roots(gram.detach().to(tensor.device), in_shape, ridge, dtype)
    first = tensor.dim() - in_modes
    work = tensor.detach().to(dtype)
    for k, (vectors, values) in enumerate(roots):
        work = mode_dot(work, (vectors * values).mT, first + k)
    return work


def _gram_weighted_core(
    tensor: torch.Tensor,
    out_factors: Sequence[torch.Tensor],
    in_factors: Sequence[torch.Tensor],
    gram: torch.Tensor,
) -> torch.Tensor:
    """Core ``C`` minimising ``||(W - U C B^T) S||_F`` for ``S S^T = gram`` (float64).

    ``U`` and ``B`` are the Kronecker products of the (orthonormal) output and input
    factors, never formed: ``C = (U^T W) G B (B^T G B)^{-1}``, with the Gram's
    products taken mode by mode on its ``in_shape + in_shape`` view.
    """
    first = len(out_factors)
    in_shape = tuple(tensor.shape[first:])
    in_ranks = tuple(f.shape[1] for f in in_factors)
    projected = tensor
    for k, factor in enumerate(out_factors):
        projected = mode_dot(projected, factor.mT, k)
    out_ranks = tuple(projected.shape[:first])
    flat = projected.double().reshape(math.prod(out_ranks), -1)
    wide = gram.reshape(in_shape + in_shape)
    for k, factor in enumerate(in_factors):
        wide = mode_dot(wide, factor.double().mT, len(in_shape) + k)
    gram_b = wide.reshape(math.prod(in_shape), -1)  # G B
    narrow = wide
    for k, factor in enumerate(in_factors):
        narrow = mode_dot(narrow, factor.double().mT, k)
    system = narrow.reshape(gram_b.shape[1], -1)  # B^T G B
    system = (system + system.mT) / 2
    rhs = (flat @ gram_b).mT
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, chol)
    else:
        solution = torch.linalg.pinv(system, hermitian=True) @ rhs
    return solution.mT.reshape(out_ranks + in_ranks)


def whitened_tucker(
    tensor: torch.Tensor,
    gram: torch.Tensor,
    ranks,
    *,
    in_modes: int,
    ridge: float = 1e-6,
    n_iter: int = 30,
    tol: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> TuckerDecomposition:
    """Tucker approximation of a weight tensor minimising the output error on calibration data.

    ``tensor`` is a linear layer's ``(out, in)`` weight seen as ``out_shape + in_shape``
    (the last ``in_modes`` modes take the input). Three steps, none of which forms an
    inverse of a Gram matrix:

    1. :func:`hooi` of :func:`whiten_input_modes` (each input mode multiplied by the
       root of its partial-trace Gram), giving orthonormal output factors ``U_k`` and
       whitened input factors ``V_k``;
    2. each input factor mapped back to the input space as an orthonormal basis of
       ``S_k^{-T} V_k`` (``S_k = E_k diag(d_k)``, so this is ``E_k diag(1/d_k) V_k``;
       directions the data never visits, ``d = 0`` with ``ridge=0``, get 0);
    3. the core refit exactly for the full Gram: ``C = (U^T W) G B (B^T G B)^{-1}``
       with the ridged, normalised Gram ``G`` (Cholesky in float64, pseudo-inverse
       if singular), the optimal core for these factors.

    The mode whitening is exact only for Kronecker-structured Grams, so the factors
    of plain :func:`hooi` at the same ranks, with their core refit the same way,
    compete, and the lower output error wins: the result is never worse on the
    calibration data than plain HOOI (up to the ridge).

    With isotropic inputs (``gram = c I``) this is :func:`hooi` exactly; for the two-mode
    form ``(out,), (in,)`` the input factor spans the leading right singular vectors
    of ``W S`` and the output error reaches the whitened-SVD optimum. Modes kept whole
    get the identity, as in :func:`hooi`.

    Args:
        tensor: ``out_shape + in_shape`` floating tensor on any device (meta included).
        gram: ``(in, in)`` input Gram ``X^T X`` (e.g. ``InputStats.gram``), any float dtype.
        ranks: Multilinear ranks, output modes first, as in :func:`hosvd`.
        in_modes: Number of trailing input modes.
        ridge: Relative ridge of :func:`whitening_root`, also added to the Gram of the
            core refit; ``0`` is allowed (then rank-deficient data is handled by
            pseudo-inverses).
        n_iter: Most HOOI sweeps.
        tol: HOOI stops when a sweep improves the (whitened) error by less.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (default as in :func:`hosvd`).

    Returns:
        :class:`TuckerDecomposition` in ``tensor``'s dtype and device whose ``error``
        is the relative *output* error ``||(W - W') X^T|| / ||W X^T||`` on the
        calibration data (no ridge), ``n_iter`` the HOOI sweeps of the winning factors.

    Raises:
        ValueError: Bad ranks, ``in_modes``, ``ridge`` or Gram shape; NaN/Inf values.
        TypeError: Non-tensor or non-floating input.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(6, 4, 6, dtype=torch.float64, generator=g)
        >>> x = torch.randn(40, 3, dtype=torch.float64, generator=g)
        >>> x = x @ torch.randn(3, 24, dtype=torch.float64, generator=g)
        >>> result = whitened_tucker(w, x.T @ x, (6, 4, 3), in_modes=2, ridge=0.0)
        >>> result.error < 1e-6
        True
    """
    ranks, dtype = _tucker_setup(tensor, ranks, compute_dtype)
    in_shape = _check_in_modes(tensor, in_modes)
    _check_gram(gram, math.prod(in_shape))
    if tensor.device.type == "meta":
        _check_ridge(ridge)
        return _meta_tucker(tensor, ranks)
    first = tensor.dim() - in_modes
    work = tensor.detach().to(dtype)
    normalized, roots = _input_mode_roots(gram.detach().to(tensor.device), in_shape, ridge, dtype)
    whitened = work
    for k, (vectors, values) in enumerate(roots):
        whitened = mode_dot(whitened, (vectors * values).mT, first + k)
    fitted = hooi(whitened, ranks, n_iter=n_iter, tol=tol, compute_dtype=dtype)
    mapped_in = []
    for (vectors, values), factor, size, rank in zip(
        roots, fitted.factors[first:], in_shape, ranks[first:]
    ):
        if rank == size:
            mapped_in.append(torch.eye(size, device=work.device, dtype=dtype))
            continue
        floor = float(values.max()) * torch.finfo(dtype).eps * size
        inverse = torch.where(
            values > floor, 1.0 / values.clamp_min(floor), torch.zeros_like(values)
        )
        mapped = (vectors * inverse) @ factor
        mapped_in.append(torch.linalg.svd(mapped, full_matrices=False).U)
    # The mode whitening only approximates a non-Kronecker Gram, so the plain HOOI
    # factors (with the refit core) compete: the result never loses to plain HOOI.
    plain = hooi(work, ranks, n_iter=n_iter, tol=tol, compute_dtype=dtype)
    ridged = normalized + ridge * torch.eye(
        normalized.shape[0], device=work.device, dtype=torch.float64
    )
    best = None
    for factors, sweeps in (
        (tuple(fitted.factors[:first]) + tuple(mapped_in), fitted.n_iter),
        (plain.factors, plain.n_iter),
    ):
        core = _gram_weighted_core(work, factors[:first], factors[first:], ridged).to(dtype)
        approximation = tucker_to_tensor(core, factors).reshape(-1, normalized.shape[0])
        error = relative_output_error(work.reshape(approximation.shape), approximation, normalized)
        if best is None or error < best[2]:
            best = (core, factors, error, sweeps)
    return _finish(*best, tensor.dtype)


__all__ += [
    "TuckerDecomposition",
    "mode_dot",
    "tucker_to_tensor",
    "hosvd",
    "hosvd_energy",
    "hooi",
    "mode_grams",
    "whiten_input_modes",
    "whitened_tucker",
]


# ---------------------------------------------------------------------------
# Rank reduction of factored weights (no dense reconstruction)
# ---------------------------------------------------------------------------


def _orthonormal_basis(factor: torch.Tensor, dtype: torch.dtype):
    """``factor = Q R`` with orthonormal ``Q`` (reduced QR in ``dtype``)."""
    return torch.linalg.qr(factor.detach().to(dtype), mode="reduced")


def reduce_low_rank(
    output_factor: torch.Tensor,
    input_factor: torch.Tensor,
    rank: int,
    *,
    compute_dtype: torch.dtype | None = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the best rank-``rank`` approximation of ``B @ A``.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR), then the SVD of the small
    ``R_B R_A^T`` gives the SVD of ``B A`` without forming it: the result is the
    Eckart--Young optimum for ``B A``, in ``O((m + n) r^2)`` instead of
    ``O(m n min(m, n))``. The singular values are split evenly as in
    :func:`low_rank_factors`.

    Args:
        output_factor: ``B``, ``(m, r)``.
        input_factor: ``A``, ``(r, n)``.
        rank: New rank in ``[1, min(m, r, n)]``.
        compute_dtype: float32 (default; float64 for float64 factors) or float64.

    Returns:
        ``(B', A')`` of shapes ``(m, rank)`` and ``(rank, n)`` in the factors' dtype.

    Examples:
        >>> b, a = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        >>> b2, a2 = reduce_low_rank(b, a, 2)
        >>> s = torch.linalg.svdvals(b @ a)
        >>> bool(torch.isclose(torch.linalg.norm(b @ a - b2 @ a2), s[2:].norm()))
        True
    """
    largest = min(output_factor.shape[0], output_factor.shape[1], input_factor.shape[1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= largest:
        raise ValueError(
            f"rank must be an int in [1, {largest}] (at most the current rank and both "
            f"sizes of the product), got {rank!r}"
        )
    dtype = output_factor.dtype
    if output_factor.device.type == "meta":
        meta = dict(device="meta", dtype=dtype)
        return (
            torch.empty(output_factor.shape[0], rank, **meta),
            torch.empty(rank, input_factor.shape[1], **meta),
        )
    compute = _compute_dtype(output_factor, compute_dtype)
    _check_matrix(output_factor)
    _check_matrix(input_factor)
    q_out, r_out = _orthonormal_basis(output_factor, compute)
    q_in, r_in = _orthonormal_basis(input_factor.mT, compute)
    U, S, Vh = torch.linalg.svd(r_out @ r_in.mT)
    root = S[:rank].sqrt()
    new_output = q_out @ (U[:, :rank] * root)
    new_input = (root[:, None] * Vh[:rank]) @ q_in.mT
    return new_output.to(dtype), new_input.to(dtype)


def reduce_tucker(
    core: torch.Tensor,
    factors,
    ranks,
    *,
    n_iter: int = 30,
    tol: float = 1e-6,
    compute_dtype: torch.dtype | None = None,
) -> TuckerDecomposition:
    """Tucker approximation with lower multilinear ranks of a Tucker tensor, from its parts.

    Each factor is orthonormalised (``U_k = Q_k R_k``, ``None`` = identity), the
    ``R_k`` are absorbed into the core, and :func:`hooi` runs on that small core;
    the new factors are ``Q_k`` times the core's factors. Since the ``Q_k`` are
    orthonormal this is exactly HOOI (and its HOSVD start) on the full tensor, which
    is never formed.

    Args:
        core: Core of shape ``r_0 x r_1 x ...``.
        factors: One ``(n_k, r_k)`` factor per mode, or ``None`` (identity, ``n_k = r_k``).
        ranks: New multilinear ranks, each in ``[1, r_k]`` (as :func:`hooi` takes them,
            relative to the full tensor's mode sizes ``n_k``).
        n_iter: Most HOOI sweeps.
        tol: HOOI's stopping threshold.
        compute_dtype: As in :func:`hooi`.

    Returns:
        :class:`TuckerDecomposition` of the full tensor: core of shape ``ranks``,
        orthonormal ``(n_k, ranks[k])`` factors, and the relative error with respect
        to the input Tucker tensor.

    Examples:
        >>> t = torch.randn(6, 5, 4, dtype=torch.float64)
        >>> big = hooi(t, (4, 4, 3))
        >>> small = reduce_tucker(big.core, big.factors, (2, 2, 2))
        >>> full = tucker_to_tensor(big.core, big.factors)
        >>> abs(small.error - hooi(full, (2, 2, 2)).error) < 1e-8
        True
    """
    from .ranks import resolve_tucker_ranks

    if not isinstance(core, torch.Tensor):
        raise TypeError(f"core must be a torch.Tensor, got {type(core).__name__}")
    factors = list(factors)
    if len(factors) != core.dim():
        raise ValueError(f"got {len(factors)} factors for a core with {core.dim()} modes")
    sizes = []
    for k, (factor, r) in enumerate(zip(factors, core.shape)):
        if factor is not None and (factor.dim() != 2 or factor.shape[1] != r):
            raise ValueError(
                f"factor {k} must have shape (n, {r}) to match the core, got {tuple(factor.shape)}"
            )
        sizes.append(r if factor is None else factor.shape[0])
    ranks = resolve_tucker_ranks(ranks, tuple(sizes))
    too_big = [(k, r, c) for k, (r, c) in enumerate(zip(ranks, core.shape)) if r > c]
    if too_big:
        raise ValueError(
            f"new ranks must not exceed the current ones (mode, new, current): {too_big}"
        )
    if core.device.type == "meta":
        return _meta_tucker(torch.empty(sizes, device="meta", dtype=core.dtype), ranks)
    compute = _compute_dtype(core, compute_dtype)
    small = core.detach().to(compute)
    bases = []
    for k, factor in enumerate(factors):
        if factor is None:
            bases.append(None)
            continue
        q, r = _orthonormal_basis(factor, compute)
        small = mode_dot(small, r, k)
        bases.append(q)
    result = hooi(small, ranks, n_iter=n_iter, tol=tol)
    new_factors = tuple(
        inner if q is None else q @ inner for q, inner in zip(bases, result.factors)
    )
    dtype = core.dtype
    return TuckerDecomposition(
        result.core.to(dtype),
        tuple(f.to(dtype) for f in new_factors),
        result.error,
        result.n_iter,
    )


def reduce_cp(
    factors,
    rank: int,
    *,
    n_iter: int = 100,
    tol: float = 1e-7,
    ridge: float = 1e-9,
) -> CPDecomposition:
    """Rank-``rank`` CP approximation of a CP tensor ``[[A_0, ..., A_{N-1}]]``, from its factors.

    ALS on the Kruskal tensor itself: the MTTKRP of mode ``n`` is
    ``A_n (*_{m != n} A_m^T B_m)`` and the error follows from the Gram matrices,
    so every step costs ``O(sum_k n_k R r)`` and the full tensor is never formed.
    It starts from the ``rank`` components of largest norm (so the result is never
    worse than dropping the others) and keeps the best iterate. All algebra runs in
    float64 (the matrices are small).

    Args:
        factors: ``N >= 2`` factors ``(n_k, R)`` with the component weights absorbed.
        rank: New rank in ``[1, R]``.
        n_iter: Most ALS sweeps (``>= 1``).
        tol: Stop when the relative error changes by less than ``tol`` (relative).
        ridge: Relative Tikhonov term of the normal equations, in ``[0, 0.1]``.

    Returns:
        :class:`CPDecomposition` with the weights spread evenly over the factors
        (``weights`` all ones, as :func:`cp_factors`), the relative error with respect
        to the input CP tensor, sweeps run and whether it converged.

    Examples:
        >>> big = cp_factors(torch.randn(5, 4, 3, dtype=torch.float64), 8)
        >>> small = reduce_cp(big.factors, 3)
        >>> full = cp_to_tensor(None, big.factors)
        >>> fit = (full - cp_to_tensor(None, small.factors)).norm() / full.norm()
        >>> abs(float(fit) - small.error) < 1e-8
        True
    """
    factors = list(factors)
    if len(factors) < 2 or any(not isinstance(f, torch.Tensor) or f.dim() != 2 for f in factors):
        raise ValueError("factors must be at least two 2-D tensors (n_k, R)")
    current = factors[0].shape[1]
    if any(f.shape[1] != current for f in factors):
        raise ValueError(
            f"factors must share their column count, got {[tuple(f.shape) for f in factors]}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= current:
        raise ValueError(f"rank must be an int in [1, {current}], got {rank!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if not 0.0 <= ridge <= _CP_MAX_RIDGE:
        raise ValueError(f"ridge must be a number in [0, {_CP_MAX_RIDGE}], got {ridge!r}")
    dtype, device = factors[0].dtype, factors[0].device
    if device.type == "meta":
        return CPDecomposition(
            torch.ones(rank, device=device, dtype=dtype),
            tuple(torch.empty(f.shape[0], rank, device=device, dtype=dtype) for f in factors),
            math.nan,
            0,
            False,
            False,
            float(ridge),
        )
    source = [f.detach().double() for f in factors]
    for k, f in enumerate(source):
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"factor {k} contains NaN/Inf values")
    # Normalise: source components have unit columns times `strength`.
    norms = torch.stack([f.norm(dim=0) for f in source])
    strength = norms.prod(dim=0)
    source = [f / torch.where(n > 0, n, torch.ones_like(n)) for f, n in zip(source, norms)]
    norm_squared = float(strength @ _hadamard([f.T @ f for f in source]) @ strength)
    if norm_squared <= 0.0:
        zero = tuple(torch.zeros(f.shape[0], rank, device=device, dtype=dtype) for f in factors)
        return CPDecomposition(
            torch.ones(rank, device=device, dtype=dtype), zero, 0.0, 0, True, False, float(ridge)
        )
    keep = strength.argsort(descending=True)[:rank]
    approx = [f[:, keep].clone() for f in source]
    weights = strength[keep].clone()
    grams = [f.T @ f for f in approx]
    tiny = torch.finfo(torch.float64).eps

    def relative_error(weights: torch.Tensor, approx) -> float:
        cross = _hadamard([f.T @ a for f, a in zip(source, approx)])
        own = _hadamard([a.T @ a for a in approx])
        squared = (
            norm_squared - 2.0 * float(strength @ cross @ weights) + float(weights @ own @ weights)
        )
        return math.sqrt(max(squared, 0.0) / norm_squared)

    best = (relative_error(weights, approx), weights.clone(), [a.clone() for a in approx])
    previous, sweeps, converged = best[0], 0, False
    for sweep in range(1, n_iter + 1):
        sweeps = sweep
        for mode in range(len(source)):
            cross = _hadamard(
                [f.T @ a for other, (f, a) in enumerate(zip(source, approx)) if other != mode]
            )
            mttkrp = source[mode] @ (strength[:, None] * cross)
            weights, approx[mode], grams[mode] = _als_update(mttkrp, grams, mode, ridge, tiny)
        error = relative_error(weights, approx)
        if not math.isfinite(error):
            break
        if error < best[0]:
            best = (error, weights.clone(), [a.clone() for a in approx])
        if abs(previous - error) <= tol * max(previous, tiny) or error <= 10 * tiny:
            converged = True
            break
        previous = error
    error, weights, approx = best
    root = weights.clamp_min(0) ** (1.0 / len(approx))
    return CPDecomposition(
        torch.ones(rank, device=device, dtype=dtype),
        tuple((a * root).to(dtype) for a in approx),
        error,
        sweeps,
        converged,
        False,
        float(ridge),
    )
