"""Low-rank (truncated SVD) embedding table, and the tied output head that shares it."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decompose import low_rank_factors, reduce_low_rank
from ..ranks import RankProfile, RankSpec, check_positive, resolve_matrix_rank
from ..registry import Capabilities, register_layer
from ..sources import EmbeddingSource, copied_parameter
from .base import FactorizedLayer, Fit, fast_parameter, names_bad_input
from .svd import SVDLinear

__all__ = ["SVDEmbedding"]


@register_layer
class SVDEmbedding(FactorizedLayer):
    r"""Embedding whose table is a rank-``r`` product ``row_factor @ column_factor``.

    A lookup of index ``i`` returns ``row_factor[i] @ column_factor``: the ``rank``
    values of row ``i`` are gathered (``F.embedding``, so ``padding_idx``,
    ``scale_grad_by_freq`` and ``sparse`` gradients behave as in ``nn.Embedding``) and
    projected to ``embedding_dim``. The ``num_embeddings x embedding_dim`` table is
    never formed. ``rank * (num_embeddings + embedding_dim)`` parameters are stored.

    Language models that tie their output head to the embedding table keep the tie
    with :meth:`tied_linear`: an :class:`SVDLinear` whose factors *are* this layer's
    parameters (``factorize_`` does this by itself when it converts both).

    ``max_norm`` is not supported: ``nn.Embedding`` renormalises the stored rows in
    place, and a factorized table has no stored rows.

    Args:
        num_embeddings: Size of the dictionary.
        embedding_dim: Size of each embedding vector.
        rank: ``int`` in ``[1, min(num_embeddings, embedding_dim)]``, or ``float`` in
            ``(0, 1]``: the fraction of the dense table's parameters to keep.
        padding_idx: As in ``nn.Embedding``: this entry's row of ``row_factor`` is
            zero at initialisation and gets no gradient (negative values count from
            the end).
        scale_grad_by_freq: As in ``nn.Embedding``.
        sparse: As in ``nn.Embedding`` (sparse gradients for ``row_factor``).
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``(*)``, ``torch.long`` or ``torch.int`` indices.
        - Output: ``(*, embedding_dim)``.

    Attributes:
        row_factor: ``(num_embeddings, rank)`` learnable factor.
        column_factor: ``(rank, embedding_dim)`` learnable factor.
        rank: The concrete rank (``int``).

    Examples:
        >>> table = SVDEmbedding(1000, 64, rank=16, padding_idx=0)
        >>> table(torch.tensor([[0, 5, 7]])).shape
        torch.Size([1, 3, 64])
        >>> dense = nn.Embedding(1000, 64)
        >>> SVDEmbedding.from_dense(dense, rank=0.25).rank
        15
    """

    source = EmbeddingSource()
    capabilities = Capabilities(rank_profile=True, truncation=True)
    __constants__ = ["num_embeddings", "embedding_dim", "rank", "padding_idx"]
    num_embeddings: int
    embedding_dim: int
    rank: int
    padding_idx: int | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: RankSpec,
        padding_idx: int | None = None,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_embeddings = check_positive("num_embeddings", num_embeddings)
        self.embedding_dim = check_positive("embedding_dim", embedding_dim)
        self.rank = resolve_matrix_rank(rank, num_embeddings, embedding_dim)
        self.padding_idx = _normalised_padding_idx(padding_idx, num_embeddings)
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self.sparse = bool(sparse)
        self.row_factor = nn.Parameter(torch.empty((num_embeddings, self.rank), **factory_kwargs))
        self.column_factor = nn.Parameter(torch.empty((self.rank, embedding_dim), **factory_kwargs))
        self.bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that the table's entries are ``N(0, 1)``, as in ``nn.Embedding``.

        ``row_factor`` ~ ``N(0, 1)`` and ``column_factor`` ~ ``N(0, 1/rank)``: each
        entry of the product is a sum of ``rank`` terms of variance ``1/rank``. The
        ``padding_idx`` row of ``row_factor`` is zero, so that entry looks up zeros.
        """
        nn.init.normal_(self.row_factor)
        nn.init.normal_(self.column_factor, std=1.0 / math.sqrt(self.rank))
        if self.padding_idx is not None:
            with torch.no_grad():
                self.row_factor[self.padding_idx].fill_(0)

    @names_bad_input
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Non-integer indices fail in F.embedding; names_bad_input reports them.
        rows = F.embedding(
            input,
            fast_parameter(self, "row_factor"),
            self.padding_idx,
            None,
            2.0,
            self.scale_grad_by_freq,
            self.sparse,
        )
        return rows @ fast_parameter(self, "column_factor")

    def tied_linear(self, bias: torch.Tensor | None = None) -> SVDLinear:
        """An output head ``x -> x @ table^T (+ bias)`` that shares this layer's factors.

        The returned :class:`SVDLinear` (``embedding_dim -> num_embeddings``) holds
        ``column_factor`` as its ``input_factor`` and ``row_factor`` as its
        ``output_factor`` -- the same ``nn.Parameter`` objects, so training either
        module trains both and a ``state_dict`` saves the factors under both names,
        exactly like a weight-tied ``nn.Linear`` and ``nn.Embedding``.

        Args:
            bias: The head's bias (copied), or ``None``.

        Examples:
            >>> table = SVDEmbedding(100, 16, rank=4)
            >>> head = table.tied_linear()
            >>> head.output_factor is table.row_factor
            True
            >>> head(torch.randn(2, 16)).shape
            torch.Size([2, 100])
        """
        with torch.device("meta"):
            head = SVDLinear(
                self.embedding_dim,
                self.num_embeddings,
                self.rank,
                bias=bias is not None,
                dtype=self.row_factor.dtype,
            )
        head.input_factor = self.column_factor
        head.output_factor = self.row_factor
        if bias is not None:
            head.bias = copied_parameter(bias)
        return head.train(self.training)

    def tie(self, module: nn.Module) -> nn.Module:
        """``module`` (a head tied to this table) rebuilt to share this layer's factors.

        Used by :func:`~factorized_layers.convert.factorize_` and
        :func:`~factorized_layers.convert.truncate_` on weight-tied models: an
        ``nn.Linear(embedding_dim, num_embeddings)`` (or the :class:`SVDLinear` an
        earlier tie made) becomes :meth:`tied_linear` with ``module``'s bias.

        Raises:
            TypeError: ``module`` is not a linear layer of the transposed shape.
        """
        shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if not isinstance(module, (nn.Linear, SVDLinear)) or shape != (
            self.embedding_dim,
            self.num_embeddings,
        ):
            raise TypeError(
                f"SVDEmbedding({self.num_embeddings}, {self.embedding_dim}) can share its "
                f"factors with a Linear({self.embedding_dim}, {self.num_embeddings}) only, "
                f"got {type(module).__name__} with (in, out) = {shape}"
            )
        return self.tied_linear(module.bias)

    def dense_weight(self) -> torch.Tensor:
        """The ``(num_embeddings, embedding_dim)`` table the factors represent."""
        return self.row_factor @ self.column_factor

    def flops_per_position(self) -> int:
        """Multiply-accumulates per looked-up index: ``rank * embedding_dim``."""
        return self.rank * self.embedding_dim

    @classmethod
    def unsupported_reason(cls, embedding: nn.Module) -> str | None:
        if embedding.max_norm is not None:
            return (
                f"max_norm={embedding.max_norm} renormalises stored rows in place, and a "
                "factorized table stores no rows"
            )
        return None

    @classmethod
    def rank_profile(cls, embedding: nn.Embedding) -> RankProfile:
        """Every rank ``1..min(num_embeddings, embedding_dim)`` with its exact table error.

        The errors are the Eckart--Young optima of the table's singular values
        (float32; float64 for a float64 table). A lookup has no dense multiply-adds, so
        the profile's dense FLOPs are 0 and policies judge it by parameters.
        """
        cls.source.check(embedding, cls.__name__)
        weight = embedding.weight.detach()
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        rows, cols = embedding.num_embeddings, embedding.embedding_dim
        return RankProfile.from_spectrum(
            torch.linalg.svdvals(weight.to(compute)).tolist(),
            rows,
            cols,
            params_per_rank=rows + cols,
            flops_per_rank=cols,
            dense_params=rows * cols,
            dense_flops=0,
        )

    @classmethod
    def plain_rank(cls, embedding: nn.Embedding, spec: RankSpec) -> int:
        """The concrete rank of an ``int``/``float`` spec (``ranks.resolve_matrix_rank``)."""
        return resolve_matrix_rank(spec, embedding.num_embeddings, embedding.embedding_dim)

    @classmethod
    def fit_factors(cls, embedding: nn.Embedding, rank: int, **svd_options: Any) -> Fit:
        """Best rank-``rank`` factors of the table (truncated SVD, Eckart--Young).

        Args:
            embedding: The trained table (any ``nn.Embedding`` subclass, no ``max_norm``).
            rank: The concrete rank.
            **svd_options: ``method``, ``oversample``, ``n_iter``, ``seed``,
                ``generator``, ``compute_dtype`` of
                :func:`factorized_layers.decompose.truncated_svd`.

        Examples:
            >>> dense = nn.Embedding(20, 8)
            >>> layer = SVDEmbedding.from_dense(dense, rank=8)
            >>> torch.allclose(layer.dense_weight(), dense.weight, atol=1e-5)
            True
        """
        row_factor, column_factor = low_rank_factors(embedding.weight, rank, **svd_options)
        config = {
            "num_embeddings": embedding.num_embeddings,
            "embedding_dim": embedding.embedding_dim,
            "rank": rank,
            "padding_idx": embedding.padding_idx,
            "scale_grad_by_freq": embedding.scale_grad_by_freq,
            "sparse": embedding.sparse,
        }
        return Fit(config, {"row_factor": row_factor, "column_factor": column_factor})

    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this layer's structure (JSON-serialisable)."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "rank": self.rank,
            "padding_idx": self.padding_idx,
            "scale_grad_by_freq": self.scale_grad_by_freq,
            "sparse": self.sparse,
        }

    def truncate_factors(self, rank: RankSpec) -> Fit:
        """The factors of :meth:`truncated`: the best lower-rank table, from the factors.

        Examples:
            >>> SVDEmbedding(50, 16, rank=8).truncated(3).rank
            3
        """
        rows, cols = self.num_embeddings, self.embedding_dim
        new_rank = min(resolve_matrix_rank(rank, rows, cols), self.rank)
        row_factor, column_factor = reduce_low_rank(self.row_factor, self.column_factor, new_rank)
        config = dict(self.get_config(), rank=new_rank)
        return Fit(config, {"row_factor": row_factor, "column_factor": column_factor})

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        if self.scale_grad_by_freq:
            text += ", scale_grad_by_freq=True"
        if self.sparse:
            text += ", sparse=True"
        return text


def _normalised_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """``padding_idx`` in ``[0, num_embeddings)`` (negative counts from the end), or ``None``."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}"
        )
    return padding_idx % num_embeddings
