"""Sequential (error-compensating) calibration and sensitivity-aware budgets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from factorized_layers import Budget, CPConv2d, SVDLinear, factorize_
from factorized_layers.blocks import find_blocks
from factorized_layers.calibrate import calibrate
from factorized_layers.compensation import PairedStats, compensated_weight, held_out_error
from factorized_layers.ranks import RankProfile, allocate_budget
from factorized_layers.sequential import Sequential

EXACT = Sequential(holdout=0.0, compensation=(1.0,), ridges=(0.0,), blocks=False)


def _chain(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 8, dtype=torch.float64), nn.Linear(8, 6, dtype=torch.float64)
    ).double()


def _reduced_rank_regression(inputs, targets, rank):
    """Independent oracle: argmin over rank-r W of ||targets - inputs W^T|| (Frobenius)."""
    least_squares = torch.linalg.lstsq(inputs, targets).solution.T
    fitted = inputs @ least_squares.T
    right = torch.linalg.svd(fitted, full_matrices=False).Vh[:rank]
    return right.T @ right @ least_squares


@pytest.mark.parametrize("rank", [2, 3])
def test_second_layer_reaches_the_least_squares_optimum(rank):
    model = _chain()
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(60, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    factorize_(model, rank, sequential=EXACT, calibration=batches, allow_larger=True)
    x = torch.cat(batches)
    with torch.no_grad():
        # The first layer sees dense inputs: its fit is the plain whitened optimum.
        first = _reduced_rank_regression(x, dense[0](x) - dense[0].bias, rank)
        torch.testing.assert_close(model[0].dense_weight(), first, rtol=1e-6, atol=1e-6)
        compressed_inputs = model[0](x)
        target = dense[0](x) @ dense[1].weight.T
        optimum = _reduced_rank_regression(compressed_inputs, target, rank)
        torch.testing.assert_close(model[1].dense_weight(), optimum, rtol=1e-6, atol=1e-6)
        # The compensated layer undoes part of the first layer's error.
        plain = copy.deepcopy(dense)
        factorize_(plain, rank, calibration=batches, allow_larger=True)
        assert (model(x) - dense(x)).norm() < (plain(x) - dense(x)).norm()


def test_compensated_weight_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(50, 4, generator=g, dtype=torch.float64)
    compressed = dense + 0.3 * torch.randn(50, 4, generator=g, dtype=torch.float64)
    stats = PairedStats.zeros(4, dense.device)
    stats.add(dense, compressed)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64)
    exact = torch.linalg.lstsq(compressed, dense @ weight.T).solution.T
    torch.testing.assert_close(compensated_weight(weight, stats, 1.0, 0.0), exact)
    half = compensated_weight(weight, stats, 0.5, 0.0)
    torch.testing.assert_close(half, (weight + exact) / 2)
    # The held-out error formula against the explicit residual.
    error = held_out_error(weight, exact, stats)
    explicit = (dense @ weight.T - compressed @ exact.T).norm() / (dense @ weight.T).norm()
    assert error == pytest.approx(float(explicit), rel=1e-9)


def test_rank_deficient_inputs_give_finite_factors():
    model = _chain()
    x = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
    factorize_(model, 2, sequential=Sequential(holdout=0.5), calibration=[x[:20], x[20:]])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 16)
    )


def test_report_has_held_out_errors_and_choice_never_loses_to_uncompensated():
    model = _mlp()
    data = [torch.randn(64, 16) for _ in range(8)]
    report = factorize_(model, 0.3, calibration=data, sequential=True)
    assert len(report.replaced) == 3
    assert report.model_output_error is not None and report.model_output_error > 0
    for row in report.replaced:
        assert row.output_error is not None and row.output_error_before is not None
        assert row.output_error <= row.output_error_before + 1e-12
        assert "compensation" in row.note
    text = str(report)
    assert "uncompensated" in text and "model output error" in text


def test_sequential_keeps_mode_hooks_and_untargeted_layers():
    model = _mlp().train()
    calls = []
    model[2].register_forward_hook(lambda *args: calls.append(1))
    factorize_(model, 0.3, include=["2"], calibration=[torch.randn(32, 16)] * 4, sequential=True)
    assert isinstance(model[2], SVDLinear) and isinstance(model[0], nn.Linear)
    assert model.training and model[2].training
    calls.clear()
    model(torch.randn(2, 16))
    assert calls == [1]


def test_an_error_midway_leaves_the_model_unchanged(monkeypatch):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    original = SVDLinear.from_dense.__func__
    count = {"n": 0}

    def failing(cls, linear, rank, *, calibration=None, **kwargs):
        count["n"] += 1
        if count["n"] > 6:
            raise ValueError("injected failure")
        return original(cls, linear, rank, calibration=calibration, **kwargs)

    monkeypatch.setattr(SVDLinear, "from_dense", classmethod(failing))
    with pytest.raises(ValueError, match="injected failure"):
        factorize_(model, 0.3, calibration=[torch.randn(32, 16)] * 4, sequential=True)
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2], model[4]))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_cnn_with_cp_convolutions():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )
    dense = copy.deepcopy(model)
    data = [torch.randn(8, 3, 6, 6) for _ in range(4)]
    report = factorize_(
        model,
        0.5,
        calibration=data,
        sequential=True,
        layer_options={CPConv2d: {"seed": 0, "n_iter": 20}},
    )
    assert isinstance(model[0], CPConv2d) and isinstance(model[2], CPConv2d)
    assert isinstance(model[5], SVDLinear)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        relative = (model(x) - dense(x)).norm() / dense(x).norm()
    assert relative < 1.0
    assert report.model_output_error is not None


def test_tiny_transformer_blocks_are_processed_in_order(tiny_llama):
    model = tiny_llama
    dense = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert find_blocks(model, names, None) == [f"model.layers.{i}" for i in range(3)]
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 64, (2, 16), generator=g), "use_cache": False}
        for _ in range(6)
    ]
    report = factorize_(
        model, 0.5, exclude=["lm_head"], calibration=data, sequential=True, progress=False
    )
    assert len(report.replaced) == 21
    assert 0 < report.model_output_error < 1
    ids = torch.randint(0, 64, (1, 16), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        assert not torch.equal(logits, dense(input_ids=ids).logits)


def test_named_blocks_and_bad_options(tiny_llama):
    model = tiny_llama
    data = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    with pytest.raises(ValueError, match="not an nn.ModuleList"):
        factorize_(
            model,
            0.5,
            exclude=["lm_head"],
            calibration=data,
            sequential=Sequential(blocks="model.norm"),
        )
    with pytest.raises(ValueError, match="needs calibration batches"):
        factorize_(model, 0.5, sequential=True)
    with pytest.raises(ValueError, match="holdout"):
        Sequential(holdout=1.0)
    with pytest.raises(ValueError, match="compensation"):
        Sequential(compensation=(1.5,))
    with pytest.raises(ValueError, match="max_cache_bytes"):
        Sequential(max_cache_bytes=0)
    with pytest.raises(TypeError, match="sequential must be"):
        factorize_(model, 0.5, calibration=data, sequential="yes")
    with pytest.raises(ValueError, match="max_cache_bytes"):
        factorize_(
            model,
            0.5,
            exclude=["lm_head"],
            calibration=data,
            sequential=Sequential(max_cache_bytes=100),
        )


def test_sensitivity_matches_the_jacobian_norm():
    # y = W2 (W1 x): with the random-projection probe, E||dL/dy1||^2 = ||W2||_F^2 per row.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 4, bias=False)).double()
    data = [torch.randn(500, 6, dtype=torch.float64) for _ in range(8)]
    stats = calibrate(model, data, sensitivity=True)
    first, last = stats["0"], stats["1"]
    expected = float(model[1].weight.detach().square().sum()) / 5
    assert first.grad_sq / first.output_numel == pytest.approx(expected, rel=0.05)
    assert last.grad_sq / last.output_numel == pytest.approx(1.0, rel=0.05)
    energy = sum(float((x @ model[0].weight.detach().T).square().sum()) for x in data)
    assert first.output_energy == pytest.approx(energy, rel=1e-9)
    assert first.sensitivity == pytest.approx(expected * energy, rel=0.05)
    assert not any(p.requires_grad is False for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_sensitivity_restores_requires_grad_flags():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    model.requires_grad_(False)
    calibrate(model, [torch.randn(4, 6)], sensitivity=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_budget_weights_move_rank_to_the_sensitive_layer():
    spectrum = [1.0 / (i + 1) for i in range(8)]
    profile = RankProfile.from_spectrum(
        spectrum, 8, 8, params_per_rank=16, flops_per_rank=16, dense_params=64, dense_flops=64
    )
    even = allocate_budget([profile, profile], Budget(params=0.5))
    assert even[0] == even[1]
    skewed = allocate_budget([profile, profile], Budget(params=0.5), weights=[100.0, 1.0])
    assert (skewed[0] is None or skewed[0] > even[0]) and skewed[1] < even[1]
    with pytest.raises(ValueError, match="weights"):
        allocate_budget([profile, profile], Budget(params=0.5), weights=[1.0, -1.0])


class _LoudAndQuiet(nn.Module):
    """Two equal branches, one scaled up 100x: its errors matter 10^4 times more."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Linear(24, 24)
        self.quiet = nn.Linear(24, 24)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight)

    def forward(self, x):
        return 10 * self.loud(x) + 0.1 * self.quiet(x)


def test_sensitive_budget_protects_the_layer_the_output_depends_on():
    torch.manual_seed(0)
    model = _LoudAndQuiet()
    data = [torch.randn(128, 24) for _ in range(4)]
    weighted = copy.deepcopy(model)
    factorize_(weighted, Budget(params=0.4), calibration=data, allow_larger=True)
    plain = copy.deepcopy(model)
    factorize_(plain, Budget(params=0.4, sensitivity=False), calibration=data, allow_larger=True)
    assert weighted.loud.rank > plain.loud.rank
    x = torch.randn(256, 24)
    with torch.no_grad():
        reference = model(x)
        assert (weighted(x) - reference).norm() < (plain(x) - reference).norm()


def test_two_gloo_processes_match_one_process_on_the_union(tmp_path):
    from .gloo_tasks import calibrate_task, run_on_two_processes

    ranks = run_on_two_processes("calibrate", tmp_path / "calibrated.pt")
    single = calibrate_task()
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    assert any(key.endswith("input_factor") for key in single)
    for key, value in single.items():
        # Every rank ends with the same statistics and factors ...
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, msg=key)
        # ... those of one process on the union of the data, except the sensitivities,
        # whose random probes differ per process (Monte Carlo estimates, all positive).
        if key.startswith("sensitivity."):
            assert float(ranks[0][key]) > 0
        else:
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-9, atol=1e-9, msg=key)


def test_tucker_layers_convert_sequentially():
    from factorized_layers import TuckerLinear

    model = _mlp()
    data = [torch.randn(64, 16) for _ in range(8)]
    report = factorize_(
        model, 0.3, layers={nn.Linear: TuckerLinear}, calibration=data, include=["2"]
    )
    assert isinstance(model[2], TuckerLinear)
    row = report.replaced[0]
    assert row.output_error is not None and row.output_error <= row.output_error_before


@pytest.mark.parametrize(
    "device",
    ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
)
def test_decompositions_on_another_device_return_to_the_model_device(device):
    data = [torch.randn(64, 16) for _ in range(4)]
    here, there = _mlp(), _mlp()
    factorize_(here, 0.3, calibration=data)
    factorize_(there, 0.3, calibration=data, sequential=Sequential(device=device))
    for a, b in zip(here.parameters(), there.parameters()):
        assert b.device.type == "cpu"
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_default_is_sequential_only_with_calibration_batches():
    data = [torch.randn(64, 16) for _ in range(4)]
    batches_report = factorize_(_mlp(), 0.3, calibration=data)
    assert batches_report.model_output_error is not None
    stats = calibrate(_mlp(), data)
    stats_report = factorize_(_mlp(), 0.3, calibration=stats)
    assert stats_report.model_output_error is None
    assert all(row.output_error_before is None for row in stats_report.layers)
    off = factorize_(_mlp(), 0.3, calibration=data, sequential=False)
    assert off.model_output_error is None


class _WithUnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)

    def forward(self, x):
        return self.used(x)


def test_layers_no_batch_reaches_are_converted_without_data():
    torch.manual_seed(0)
    model = _WithUnusedBranch()
    report = factorize_(model, 0.25, calibration=[torch.randn(32, 16) for _ in range(4)])
    rows = {row.name: row for row in report.layers}
    assert isinstance(model.unused, SVDLinear) and isinstance(model.used, SVDLinear)
    assert rows["unused"].note == "not reached by the calibration data"
    assert rows["unused"].output_error is None and rows["used"].output_error is not None


def test_second_call_changes_nothing():
    model = _mlp()
    data = [torch.randn(32, 16) for _ in range(4)]
    factorize_(model, 0.3, calibration=data)
    state = copy.deepcopy(model.state_dict())
    report = factorize_(model, 0.3, calibration=data)
    assert len(report) == 0 and report.model_output_error is None
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])


def test_keyboard_interrupt_midway_leaves_the_model_unchanged(monkeypatch):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    original = SVDLinear.from_dense.__func__
    count = {"n": 0}

    def interrupted(cls, linear, rank, *, calibration=None, **kwargs):
        count["n"] += 1
        if count["n"] > 8:
            raise KeyboardInterrupt
        return original(cls, linear, rank, calibration=calibration, **kwargs)

    monkeypatch.setattr(SVDLinear, "from_dense", classmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        factorize_(model, 0.3, calibration=[torch.randn(32, 16)] * 4)
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2], model[4]))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


class _ScaledBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, hidden, scale):
        return torch.tanh(self.linear(hidden)) * scale


class _PerBlockArguments(nn.Module):
    """Blocks called with a different extra argument each (like T5's position bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_ScaledBlock() for _ in range(3))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x, float(i + 1))
        return x


def test_blocks_called_with_different_arguments_fall_back_to_whole_model_passes():
    torch.manual_seed(0)
    model = _PerBlockArguments()
    dense = copy.deepcopy(model)
    data = [torch.randn(64, 16) for _ in range(4)]
    exact = Sequential(holdout=0.0, compensation=(0.0,), ridges=(0.0,))
    factorize_(model, 4, calibration=data, sequential=exact, allow_larger=True)
    whole = copy.deepcopy(dense)
    factorize_(
        whole, 4, calibration=data, allow_larger=True,
        sequential=Sequential(holdout=0.0, compensation=(0.0,), ridges=(0.0,), blocks=False),
    )  # fmt: skip
    for a, b in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="not all called with the same arguments"):
        factorize_(
            copy.deepcopy(dense), 4, calibration=data, sequential=Sequential(blocks="layers")
        )


def test_default_falls_back_to_one_pass_when_the_cache_would_overflow(monkeypatch):
    import factorized_layers.convert.api as convert

    class Tiny(Sequential):
        def __init__(self, **kwargs):
            super().__init__(max_cache_bytes=100, **kwargs)

    monkeypatch.setattr(convert, "Sequential", Tiny)
    model = _mlp()
    with pytest.warns(UserWarning, match="sequential=False"):
        report = factorize_(model, 0.3, calibration=[torch.randn(32, 16)] * 4)
    assert len(report.replaced) == 3 and report.model_output_error is None


def test_sensitivity_sees_outputs_before_in_place_ops():
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    in_place = nn.Sequential(layer, nn.ReLU(inplace=True), nn.Linear(8, 3))
    out_of_place = nn.Sequential(layer, nn.ReLU(), in_place[2])
    data = [torch.randn(64, 6) for _ in range(3)]
    a = calibrate(in_place, data, sensitivity=True)["0"]
    b = calibrate(out_of_place, data, sensitivity=True)["0"]
    assert a.output_energy == pytest.approx(b.output_energy, rel=1e-6)
    assert a.grad_sq == pytest.approx(b.grad_sq, rel=1e-6)


def test_shared_grams_are_not_aliased_by_add():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.q(x) + self.k(x)

    stats = calibrate(Shared(), [torch.randn(10, 4)])
    assert stats["q"].gram is stats["k"].gram  # one tensor for equal inputs
    before = stats["k"].gram.clone()
    stats["q"].add(torch.randn(5, 4))
    assert torch.equal(stats["k"].gram, before) and stats["k"].rows == 10
