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

import contextlib
import math
from typing import Iterator, NamedTuple, Tuple

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
    Gram of large activations can overflow float32.
    """
    wide = gram.detach().to(device=device, dtype=torch.float64)
    scale = wide.diagonal().mean()
    if scale > 0:
        wide = wide / scale
    return wide.to(dtype)


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
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite non-negative float, got {ridge!r}")
    symmetric = (gram + gram.mT) / 2
    scale = symmetric.diagonal().mean().clamp_min(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    eigenvalues = eigenvalues.clamp_min(0) + ridge * scale
    return eigenvectors * eigenvalues.sqrt()


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
    root = whitening_root(_normalized_gram(gram, weight.device, dtype), ridge=ridge)
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
    root = whitening_root(_normalized_gram(gram, weight.device, dtype), ridge=ridge)
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
    """Whether the relative change of the error fell below ``tol`` (or the fit is exact)."""
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


def _partial_contraction(tensor: torch.Tensor, factors, contracted) -> torch.Tensor:
    """Contract ``tensor`` with the factors of the modes ``contracted``, rank-wise.

    Returns a tensor indexed by the remaining modes (in order) and the rank last.
    The largest contracted mode goes first, as one GEMM (temporary of
    ``numel * rank / size`` entries); the others follow rank-wise by a cached einsum.
    """
    from .contract import contract

    first = max(contracted, key=lambda n: tensor.shape[n])
    partial = torch.tensordot(tensor, factors[first], dims=([first], [0]))
    rest = [n for n in range(tensor.dim()) if n != first]
    later = [n for n in rest if n in contracted]
    if not later:
        return partial
    letters = "abcdefghijklmnopqrstuvwxy"
    terms = ["".join(letters[n] for n in rest) + "z"] + [letters[n] + "z" for n in later]
    kept = "".join(letters[n] for n in rest if n not in contracted)
    return contract(",".join(terms) + "->" + kept + "z", partial, *[factors[n] for n in later])


def _mttkrp_from_partial(partial: torch.Tensor, group, factors, mode: int) -> torch.Tensor:
    """MTTKRP of ``mode`` from ``partial`` (indexed by the modes of ``group``, then rank)."""
    if len(group) == 1:
        return partial
    from .contract import contract

    letters = "abcdefghijklmnopqrstuvwxy"
    terms = ["".join(letters[n] for n in group) + "z"]
    terms += [letters[n] + "z" for n in group if n != mode]
    operands = [factors[n] for n in group if n != mode]
    return contract(",".join(terms) + "->" + letters[mode] + "z", partial, *operands)


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


def _als_update(mttkrp: torch.Tensor, grams, mode: int, ridge: float, tiny: float):
    """Ridge-regularised normal equations of one factor; returns (column norms, unit factor)."""
    gram = torch.ones_like(grams[0])
    for other, g in enumerate(grams):
        if other != mode:
            gram = gram * g
    damping = ridge * max(float(gram.diagonal().mean()), tiny)
    system = gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        update = torch.cholesky_solve(mttkrp.T, chol).T
    else:
        update = (torch.linalg.pinv(system, hermitian=True) @ mttkrp.T).T
    norms = update.norm(dim=0)
    return norms, update / torch.where(norms > 0, norms, torch.ones_like(norms))


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
    # Small R x R algebra (Gram matrices, solves) always runs in float64.
    grams = [(f.double().T @ f.double()) for f in factors]
    weights = torch.ones(r, device=data.device, dtype=torch.float64)
    eye = torch.eye(r, device=data.device, dtype=torch.float64)
    tiny = torch.finfo(dtype).eps
    current_ridge = float(ridge)
    degenerate = False
    converged = False
    best = (math.inf, weights.clone(), [f.clone() for f in factors])
    groups = _mode_groups(shape)
    previous = math.inf
    sweeps = 0
    for sweep in range(1, n_iter + 1):
        sweeps = sweep
        for group in groups:
            others = [n for n in range(data.dim()) if n not in group]
            partial = _partial_contraction(data, factors, others)
            for mode in group:
                mttkrp = _mttkrp_from_partial(partial, group, factors, mode).double()
                weights, update = _als_update(mttkrp, grams, mode, current_ridge, tiny)
                factors[mode] = update.to(dtype)
                grams[mode] = update.T @ update

        finite = bool(torch.isfinite(weights).all()) and all(
            bool(torch.isfinite(f).all()) for f in factors
        )
        if finite:
            # ||T - X||^2 = 1 - 2 <T, X> + ||X||^2 (||T|| = 1) from the last MTTKRP and
            # the Gram matrices: no reconstruction. It loses digits by cancellation for
            # close fits, so below a 3% error the residual is formed exactly.
            gram_all = torch.ones_like(eye)
            for g in grams:
                gram_all = gram_all * g
            inner = float((mttkrp * factors[mode].double()).sum(0) @ weights)
            squared = 1.0 - 2.0 * inner + float(weights @ gram_all @ weights)
            if squared < 1e-3:
                error = float((data - cp_to_tensor(weights.to(dtype), factors)).norm())
            else:
                error = math.sqrt(squared)
            finite = math.isfinite(error)
        if not finite:
            # A non-finite update: go back to the best iterate with a stronger ridge.
            degenerate = True
            current_ridge = min(max(current_ridge * 10, _CP_MIN_RIDGE_STEP), _CP_MAX_RIDGE)
            _, weights, factors = best[0], best[1].clone(), [f.clone() for f in best[2]]
            grams = [(f.double().T @ f.double()) for f in factors]
            continue
        if error < best[0]:
            best = (error, weights.clone(), [f.clone() for f in factors])

        # Degeneracy (Phan et al. 2020): rank-1 terms whose norms grow far beyond the
        # tensor's while pairs of them point in opposite directions and cancel.
        big_weight = float(weights.max()) > diverging_norm
        if big_weight and r > 1:
            congruence = torch.ones_like(eye)
            for g in grams:
                congruence = congruence * g
            congruence.fill_diagonal_(0.0)
            heavy = weights > 1.0
            cancelling = congruence[heavy][:, heavy]
            if cancelling.numel() and float(cancelling.min()) < _CP_CANCEL_COSINE:
                degenerate = True
                current_ridge = min(max(current_ridge * 10, _CP_MIN_RIDGE_STEP), _CP_MAX_RIDGE)

        stalled = math.isfinite(previous) and abs(previous - error) <= tol * max(previous, tiny)
        # "Exact": within a few roundings, or within the ridge's own bias.
        if error <= 10 * max(tiny, current_ridge) or stalled:
            converged = True
            break
        previous = error

    _, weights, factors = best
    # The exact error of the returned iterate (the loop may have used the estimate).
    error = float((data - cp_to_tensor(weights.to(dtype), factors)).norm())
    return CPDecomposition(
        (weights * scale).to(dtype),
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
) -> CPDecomposition:
    """CP (CANDECOMP/PARAFAC) decomposition of an N-way tensor by alternating least squares.

    Finds ``weights`` and unit-column ``factors`` with
    ``tensor ~= sum_r weights[r] * factors[0][:, r] o ... o factors[N-1][:, r]``.

    * **Initialisation**: leading left singular vectors of every unfolding (HOSVD);
      only when ``rank`` exceeds a mode's size are the remaining columns random
      (seeded by ``seed``, the global random state is not touched).
    * **Sweeps**: each factor solves its normal equations (Hadamard product of the
      other factors' Gram matrices plus ``ridge`` times its mean diagonal, Cholesky in
      float64) against the MTTKRP, computed from the tensor by einsum without
      materialising unfoldings or Khatri--Rao products of the full size; the columns
      are then normalised into ``weights``.
    * **Stopping**: when the relative change of the relative error falls below
      ``tol``, the fit is exact to working precision (relative error below ten
      times the larger of the dtype's epsilon and the ridge, whose bias is of that
      order -- pass ``ridge=0`` to fit exact tensors further), or after ``n_iter``
      sweeps.
    * **Degeneracy guard**: when rank-1 terms grow to more than ``diverging_norm``
      times the tensor's norm while two of them have congruence (product of cosines over all modes)
      below -0.85 -- the diverging, cancelling components of a degenerate CP fit --
      or an update turns non-finite, the ridge is raised tenfold (from at least
      1e-4, at most 0.1), ``degenerate`` is reported, and the best iterate seen is
      returned.

    Memory stays within a small multiple of the tensor: the largest temporaries
    hold ``numel * rank / max(shape)`` entries (the MTTKRP's first contraction and
    the residual's reconstruction).

    Args:
        tensor: Floating tensor with at least 2 modes, on any device (meta included).
        rank: ``int`` rank or ``float`` parameter fraction, see
            :func:`factorized_layers.ranks.resolve_cp_rank`.
        n_iter: Maximum number of ALS sweeps (``>= 1``).
        tol: Stop when ``|e_prev - e| <= tol * e_prev`` for the relative error ``e``.
        seed: Seed of the random columns used when ``rank`` exceeds a mode size
            (default 0: reproducible by default).
        ridge: Relative Tikhonov term of the normal equations, in ``[0, 0.1]``.
        compute_dtype: ``torch.float32`` or ``torch.float64``; default float64 for
            float64 input, float32 otherwise (so fp16/bf16 tensors are upcast).
        diverging_norm: Weight, relative to the tensor's norm, above which a rank-1
            term counts as diverging for the degeneracy guard (default 10).

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


__all__ += [
    "TuckerDecomposition",
    "mode_dot",
    "tucker_to_tensor",
    "hosvd",
    "hosvd_energy",
    "hooi",
]
