"""SVDEmbedding specifics: optimality, nn.Embedding gradient semantics, weight-tied heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import (
    Budget,
    SVDEmbedding,
    SVDLinear,
    calibrate,
    factorize_,
    load_factorized,
    save_factorized,
    truncate_,
    unfactorize_,
)

TIED_LAYERS = {nn.Embedding: SVDEmbedding, nn.Linear: SVDLinear}


class TiedLM(nn.Module):
    """Embedding -> MLP -> output head whose weight is the embedding table."""

    def __init__(self, vocab: int = 120, width: int = 24, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(tokens))))


def _tied_lm() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


def _is_tied(model: nn.Module) -> bool:
    return model.head.output_factor is model.embed.row_factor and (
        model.head.input_factor is model.embed.column_factor
    )


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_table_error_is_the_eckart_young_optimum(rank):
    torch.manual_seed(1)
    dense = nn.Embedding(40, 16)
    layer = SVDEmbedding.from_dense(dense, rank)
    singular_values = torch.linalg.svdvals(dense.weight.detach().double())
    optimum = singular_values[rank:].square().sum().sqrt()
    error = (layer.dense_weight() - dense.weight).detach().double().norm()
    assert math.isclose(float(error), float(optimum), rel_tol=1e-4)


def test_gradients_follow_nn_embedding_semantics_for_the_table():
    # With W = A B, nn.Embedding's (padding-masked, frequency-scaled) table gradient G
    # gives the factorized lookup's row-factor gradient G B^T.
    torch.manual_seed(2)
    dense = nn.Embedding(20, 8, padding_idx=3, scale_grad_by_freq=True)
    layer = SVDEmbedding.from_dense(dense, 8)
    tokens = torch.tensor([[3, 1, 1, 5], [3, 7, 1, 0]])
    upstream = torch.randn(2, 4, 8)
    reference = nn.Embedding(20, 8, padding_idx=3, scale_grad_by_freq=True)
    with torch.no_grad():
        reference.weight.copy_(layer.dense_weight())
    (reference(tokens) * upstream).sum().backward()
    (layer(tokens) * upstream).sum().backward()
    expected = reference.weight.grad @ layer.column_factor.detach().T
    torch.testing.assert_close(layer.row_factor.grad, expected, rtol=1e-5, atol=1e-6)
    assert layer.row_factor.grad[3].abs().max() == 0


def test_padding_row_is_zero_at_initialisation_and_stays_zero():
    layer = SVDEmbedding(10, 6, rank=3, padding_idx=-2)
    assert layer.padding_idx == 8
    assert layer(torch.tensor([8])).abs().max() == 0
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.tensor([8, 2, 8])).sum().backward()
    optimizer.step()
    assert layer(torch.tensor([8])).abs().max() == 0


def test_sparse_gives_a_sparse_row_factor_gradient():
    layer = SVDEmbedding(50, 6, rank=3, sparse=True)
    layer(torch.tensor([1, 2, 2])).sum().backward()
    assert layer.row_factor.grad.is_sparse
    assert not layer.column_factor.grad.is_sparse


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"padding_idx": 10}, ValueError, r"padding_idx must be in \[-10, 10\), got 10"),
        ({"padding_idx": 1.5}, TypeError, r"padding_idx must be an int or None, got 1\.5"),
        ({"rank": 11}, ValueError, r"11"),
        ({"num_embeddings": 0}, ValueError, r"num_embeddings must be a positive integer, got 0"),
    ],
)
def test_bad_constructor_arguments_are_refused(kwargs, error, match):
    arguments = dict({"num_embeddings": 10, "embedding_dim": 12, "rank": 3}, **kwargs)
    with pytest.raises(error, match=match):
        SVDEmbedding(**arguments)


def test_max_norm_and_wrong_sources_are_refused():
    with pytest.raises(ValueError, match=r"max_norm=1\.0"):
        SVDEmbedding.from_dense(nn.Embedding(10, 4, max_norm=1.0), 2)
    with pytest.raises(TypeError, match="expects an nn.Embedding"):
        SVDEmbedding.from_dense(nn.Linear(4, 10), 2)
    with pytest.raises(TypeError, match=r"Linear\(4, 10\) only"):
        SVDEmbedding(10, 4, rank=2).tie(nn.Linear(10, 4))


def test_tied_linear_shares_the_factors_and_computes_the_transposed_table():
    table = SVDEmbedding(30, 8, rank=4)
    bias = torch.randn(30)
    head = table.tied_linear(bias)
    assert head.output_factor is table.row_factor and head.input_factor is table.column_factor
    x = torch.randn(5, 8)
    torch.testing.assert_close(head(x), F.linear(x, table.dense_weight(), bias))
    assert head.bias is not bias and torch.equal(head.bias, bias)
    before = table(torch.tensor([3])).detach()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    head(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(table(torch.tensor([3])), before)  # training the head trains both


def test_factorize_keeps_a_weight_tie_and_counts_the_table_once():
    model = _tied_lm()
    tokens = torch.randint(1, 120, (3, 7))
    report = factorize_(model, rank=6, layers=TIED_LAYERS)
    assert isinstance(model.embed, SVDEmbedding) and isinstance(model.head, SVDLinear)
    assert _is_tied(model)
    rows = {row.name: row for row in report.layers}
    assert "tied to embed" in rows["head"].note
    assert rows["head"].params_before == rows["head"].params_after == 0
    stored = sum(p.numel() for p in model.parameters())
    assert report.params_after == stored
    assert report.params_before == sum(p.numel() for p in _tied_lm().parameters())
    expected = F.linear(
        torch.tanh(model.body(F.embedding(tokens, model.embed.dense_weight()))),
        model.embed.dense_weight(),
    )
    torch.testing.assert_close(model(tokens), expected)


def test_factorize_with_a_budget_counts_a_lookup_by_parameters():
    model = _tied_lm()
    factorize_(model, Budget(params=0.5), layers=TIED_LAYERS)
    assert isinstance(model.embed, SVDEmbedding) and _is_tied(model)
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("bias"))
    assert weights <= 0.5 * (120 * 24 + 24 * 24)


def test_a_tie_to_a_layer_that_is_not_converted_stays_dense():
    model = _tied_lm()
    report = factorize_(model, rank=6, layers=TIED_LAYERS, exclude=["embed"], allow_larger=True)
    row = {r.name: r for r in report.layers}["head"]
    assert "tied to ['embed']" in row.skipped
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight


def test_sequential_calibration_refuses_ties():
    model = _tied_lm()
    batches = [torch.randint(1, 120, (2, 5))]
    with pytest.raises(ValueError, match="weight-tied"):
        factorize_(model, rank=6, layers=TIED_LAYERS, calibration=batches, sequential=True)
    assert type(model.embed) is nn.Embedding


def test_calibration_skips_lookups_and_still_converts_them():
    model = _tied_lm()
    batches = [torch.randint(1, 120, (2, 5)) for _ in range(2)]
    assert set(calibrate(model, batches)) == {"body", "head"}
    report = factorize_(model, rank=6, layers=TIED_LAYERS, calibration=batches)
    rows = {r.name: r for r in report.layers}
    assert rows["embed"].note == "SVDEmbedding has no calibrated from_dense"
    assert rows["body"].output_error is not None and _is_tied(model)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoints_restore_the_tie(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="needs safetensors")
    model = _tied_lm()
    factorize_(model, rank=6, layers=TIED_LAYERS)
    path = tmp_path / f"tied{suffix}"
    save_factorized(model, path)
    fresh = load_factorized(TiedLM(), path)
    assert _is_tied(fresh)
    tokens = torch.randint(0, 120, (2, 6))
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)


def test_truncate_and_unfactorize_keep_the_tie():
    model = _tied_lm()
    factorize_(model, rank=6, layers=TIED_LAYERS)
    report = truncate_(model, rank=3)
    assert model.embed.rank == model.head.rank == 3 and _is_tied(model)
    rows = {r.name: r for r in report.layers}
    assert rows["head"].params_after == 0 and rows["embed"].params_after == 3 * (120 + 24)
    tokens = torch.randint(0, 120, (2, 6))
    expected = model(tokens)
    unfactorize_(model)
    assert type(model.embed) is nn.Embedding and model.head.weight is model.embed.weight
    torch.testing.assert_close(model(tokens), expected)


def test_truncating_only_the_follower_is_reported_not_done():
    model = _tied_lm()
    factorize_(model, rank=6, layers=TIED_LAYERS)
    report = truncate_(model, rank=3, include=["head"])
    assert "shares its factors with embed" in report.layers[0].skipped
    assert model.head.rank == 6 and _is_tied(model)


def test_tied_llama_embeddings_compress_end_to_end():
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = torch.randint(0, 96, (2, 9))
    report = factorize_(model, rank=16, layers=TIED_LAYERS, include=["embed_tokens", "lm_head"])
    assert model.lm_head.output_factor is model.model.embed_tokens.row_factor
    assert report.params_after < report.params_before
    logits = model(tokens).logits
    table = model.model.embed_tokens.dense_weight()
    dense = transformers.LlamaForCausalLM(config).eval()
    dense.model.embed_tokens.weight = nn.Parameter(table.detach())
    dense.lm_head.weight = dense.model.embed_tokens.weight
    for name, value in model.state_dict().items():
        if name in dense.state_dict() and "embed" not in name and "lm_head" not in name:
            dense.state_dict()[name].copy_(value)
    torch.testing.assert_close(logits, dense(tokens).logits, rtol=1e-4, atol=1e-5)
