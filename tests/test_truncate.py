"""Post-training truncation: ``layer.truncated`` and ``truncate_`` against independent oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from factorized_layers import (
    CPConv2d,
    Energy,
    SVDLinear,
    TuckerLinear,
    factorize_,
    resolve_matrix_rank,
    truncate_,
)
from factorized_layers.decompose import cp_factors, cp_to_tensor, hooi, hosvd


def _perturbed(layer: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """``layer`` as after fine-tuning: factors no longer orthogonal or balanced."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(
                scale * p.abs().mean() * torch.randn(p.shape, generator=generator, dtype=p.dtype)
            )
    return layer


def _relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((reference - approximation).norm() / reference.norm())


@pytest.mark.parametrize("new_rank", [1, 5, 11])
def test_svd_truncation_is_eckart_young_optimal(new_rank):
    torch.manual_seed(0)
    layer = _perturbed(SVDLinear.from_dense(nn.Linear(40, 30).double(), 12))
    weight = layer.dense_weight().detach()
    truncated = layer.truncated(new_rank)
    singular_values = torch.linalg.svdvals(weight)
    optimum = float(singular_values[new_rank:].norm())
    error = float((weight - truncated.dense_weight().detach()).norm())
    assert truncated.rank == new_rank
    assert abs(error - optimum) <= 1e-10 * float(singular_values.norm())
    # Balanced split: both factors carry sqrt of the singular values.
    torch.testing.assert_close(
        truncated.output_factor.norm(dim=0), truncated.input_factor.norm(dim=1)
    )


def test_svd_truncation_keeps_bias_flags_and_mode():
    layer = SVDLinear.from_dense(nn.Linear(20, 10), 8).eval()
    layer.input_factor.requires_grad_(False)
    truncated = layer.truncated(0.3)  # 60 parameters: rank 2 of (20 + 10) each
    assert truncated.rank == 2 and not truncated.training
    assert not truncated.input_factor.requires_grad and truncated.output_factor.requires_grad
    assert torch.equal(truncated.bias, layer.bias) and truncated.bias is not layer.bias
    assert layer.truncated(9).rank == 8  # never raises the rank
    meta = SVDLinear(20, 10, 8, device="meta").truncated(3)
    assert meta.input_factor.device.type == "meta" and meta.rank == 3
    with pytest.raises(ValueError, match="rank"):
        layer.truncated(0)


@pytest.mark.parametrize(
    "ranks, new_ranks",
    [((6, 5, 4, 7), (3, 2, 2, 3)), ((8, 6, 4, 4), (8, 3, 2, 2)), ((6, 6, 8, 8), (6, 6, 3, 3))],
)
def test_tucker_truncation_equals_hooi_of_the_weight(ranks, new_ranks):
    torch.manual_seed(0)
    dense = nn.Linear(64, 48).double()
    layer = TuckerLinear.from_dense(dense, ranks, in_shape=(8, 8), out_shape=(8, 6))
    layer = _perturbed(layer)
    weight = layer.dense_weight().detach()
    truncated = layer.truncated(new_ranks)
    assert truncated.rank == new_ranks
    tensor = weight.reshape(8, 6, 8, 8)
    error = _relative_error(weight, truncated.dense_weight().detach())
    assert abs(error - hooi(tensor, new_ranks).error) < 1e-8
    assert error <= hosvd(tensor, new_ranks).error + 1e-12
    # Modes at full size stay folded into the core (no factor is stored).
    for factor, size, rank in zip(
        truncated.out_factors() + truncated.in_factors(), (8, 6, 8, 8), new_ranks
    ):
        assert (factor is None) == (rank == size)


def test_cp_truncation_beats_dropping_components_and_matches_a_refit():
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 24, 3).double()
    layer = _perturbed(CPConv2d.from_dense(dense, 30, n_iter=30))
    kernel = layer.dense_weight().detach()
    truncated = layer.truncated(10)
    error = _relative_error(kernel, truncated.dense_weight().detach())
    assert truncated.rank == 10 and abs(error - truncated.fit_error) < 1e-8
    factors = [
        layer.out_channel_factor,
        layer.in_channel_factor,
        layer.height_factor,
        layer.width_factor,
    ]
    strength = torch.stack([f.detach().norm(dim=0) for f in factors]).prod(0)
    strongest = strength.argsort(descending=True)[:10]
    dropped = cp_to_tensor(None, [f.detach()[:, strongest] for f in factors])
    assert error < _relative_error(kernel, dropped)
    refit = cp_factors(kernel, 10, n_iter=200)
    assert error <= 1.05 * refit.error


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.Linear(64, 10),
    )


def _converted() -> nn.Module:
    model = _model()
    factorize_(model, rank=0.6, exclude=["6"], layer_options={CPConv2d: {"n_iter": 10}}, seed=0)
    factorize_(model, rank=0.5, layers={nn.Linear: TuckerLinear}, include=["6"], allow_larger=True)
    return model


def test_truncate_lowers_parameters_and_reports_each_layer():
    model = _converted()
    x = torch.randn(2, 3, 6, 6)
    hook_calls = []
    model[3].register_forward_hook(lambda *args: hook_calls.append(1))
    before = sum(p.numel() for p in model.parameters())
    weight_before = model[3].dense_weight().detach()
    report = truncate_(model, rank=0.2)
    after = sum(p.numel() for p in model.parameters())
    assert after < before
    assert {row.name for row in report.replaced} == {"0", "3", "5", "6"}
    assert report.params_before - report.params_after == before - after
    new_rank = resolve_matrix_rank(0.2, 64, 576)
    assert isinstance(model[3], SVDLinear) and model[3].rank == new_rank
    singular_values = torch.linalg.svdvals(weight_before)
    row = next(r for r in report if r.name == "3")
    expected = float(singular_values[new_rank:].norm() / singular_values.norm())
    assert abs(row.weight_error - expected) < 1e-4
    assert "SVDLinear" in str(report)
    model(x).sum().backward()
    assert hook_calls == [1]
    # A second call at the same rank changes nothing and says why.
    again = truncate_(model, rank=0.2)
    assert not again.replaced and all("already" in r.skipped for r in again.skipped)


def test_truncate_per_layer_ranks_and_filters():
    model = _converted()
    report = truncate_(model, rank={"3": 2, "5": 4})
    assert [r.name for r in report] == ["3", "5"]
    assert model[3].rank == 2 and model[5].rank == 4
    report = truncate_(model, rank=1, exclude=["6"], filter_fn=lambda m, n: n != "0")
    assert [r.name for r in report.replaced] == ["3", "5"]
    with pytest.raises(ValueError, match="not targeted"):
        truncate_(model, rank={"classifier": 2})
    with pytest.raises(TypeError, match="policy"):
        truncate_(model, rank=Energy(0.9))
    with pytest.raises(TypeError, match="truncated"):
        truncate_(model[3], rank=1)
    with pytest.raises(ValueError, match="match no layer"):
        truncate_(model, rank=1, include=["nothing"])


def test_truncated_model_keeps_training():
    model = _converted()
    truncate_(model, rank=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_truncate_options_reach_only_the_classes_that_take_them():
    model = _converted()
    ranks_before = [getattr(m, "rank", None) for m in model]
    with pytest.raises(TypeError, match="taken by no targeted layer"):
        truncate_(model, rank=2, max_sweeps=3)
    assert [getattr(m, "rank", None) for m in model] == ranks_before
    report = truncate_(model, rank=2, n_iter=5)  # Tucker and CP take n_iter, SVD does not
    assert {row.name for row in report.replaced} == {"0", "3", "5", "6"}


def test_truncate_error_in_one_layer_leaves_the_model_unchanged():
    model = _converted()
    ranks_before = [getattr(m, "rank", None) for m in model]
    with pytest.raises(ValueError, match="5 \\(SVDLinear\\)"):
        truncate_(model, rank={"3": 2, "5": 1000})
    assert [getattr(m, "rank", None) for m in model] == ranks_before
