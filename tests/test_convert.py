"""factorize_ / unfactorize_: selection, in-place semantics, policies, budget, report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from factorized_layers import (
    EVBMF,
    Budget,
    CPConv2d,
    Energy,
    ErrorBound,
    SVDLinear,
    factorize_,
    unfactorize_,
)
from factorized_layers.decompose import svd_tail_error
from factorized_layers.testing import linear_with_spectrum


class ToyMLP(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(20, 32, dtype=dtype), nn.GELU())
        self.blocks = nn.ModuleList(
            [
                nn.ModuleDict(
                    {
                        "query": nn.Linear(32, 32, dtype=dtype),
                        "value": nn.Linear(32, 32, bias=False, dtype=dtype),
                    }
                )
                for _ in range(2)
            ]
        )
        self.head = nn.Linear(32, 5, dtype=dtype)

    def forward(self, x):
        h = self.encoder(x)
        for block in self.blocks:
            h = torch.tanh(block["query"](h)) + block["value"](h)
        return self.head(h)


def _linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _factorized_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def test_full_rank_replaces_every_linear_and_keeps_outputs():
    torch.manual_seed(0)
    model = ToyMLP()
    x = torch.randn(7, 20, dtype=torch.float64)
    expected = model(x)
    names = _linear_names(model)
    full_ranks = {
        n: min(m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    # ErrorBound(0) asks for zero error: the full rank of every (generic) weight.
    report = factorize_(model, rank=ErrorBound(0.0), allow_larger=True)
    assert _factorized_names(model) == names and not _linear_names(model)
    assert {row.name: row.rank for row in report.replaced} == full_ranks
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_include_exclude_and_filter_pick_exactly_the_right_layers():
    model = ToyMLP()
    factorize_(model, rank=4, include=["query"], exclude=["blocks.1.query"])
    assert _factorized_names(model) == {"blocks.0.query"}

    model = ToyMLP()
    factorize_(model, rank=4, include=[r"re:blocks\.\d+\.(query|value)"])
    assert _factorized_names(model) == {
        f"blocks.{i}.{k}" for i in range(2) for k in ("query", "value")
    }

    model = ToyMLP()
    factorize_(model, rank=4, filter_fn=lambda module, fqn: module.bias is None)
    assert _factorized_names(model) == {"blocks.0.value", "blocks.1.value"}

    model = ToyMLP()
    factorize_(model, rank=4, exclude=["head", "encoder.0"])
    assert _factorized_names(model) == {
        f"blocks.{i}.{k}" for i in range(2) for k in ("query", "value")
    }


def test_suffix_match_respects_dot_boundary():
    model = nn.ModuleDict({"query": nn.Linear(8, 8), "subquery": nn.Linear(8, 8)})
    factorize_(model, rank=2, include=["query"])
    assert isinstance(model["query"], SVDLinear) and isinstance(model["subquery"], nn.Linear)


def test_second_call_is_a_no_op():
    model = ToyMLP()
    factorize_(model, rank=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    report = factorize_(model, rank=3)
    assert len(report.replaced) == 0
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(modules[n] is m for n, m in model.named_modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_hooks_device_dtype_and_training_flag_are_kept():
    model = ToyMLP(dtype=torch.float64)
    model.eval()
    model.blocks[0].train()
    calls = []
    handle = model.head.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    pre = model.blocks[1]["query"].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    factorize_(model, rank=3)
    model(torch.randn(2, 20, dtype=torch.float64))
    assert calls == ["pre", "SVDLinear"]
    handle.remove()
    pre.remove()
    model(torch.randn(2, 20, dtype=torch.float64))
    assert calls == ["pre", "SVDLinear"]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.blocks[0]["query"].training and not model.blocks[1]["query"].training
    assert not model.head.training


def test_shared_module_is_converted_once_and_stays_shared():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = factorize_(model, rank=4)
    assert len(report) == 1
    assert isinstance(model[0], SVDLinear) and model[0] is model[2]


def test_unfactorize_round_trip_reproduces_outputs():
    torch.manual_seed(0)
    model = ToyMLP()
    factorize_(model, rank=4)
    x = torch.randn(3, 20, dtype=torch.float64)
    expected = model(x)
    unfactorize_(model)
    assert not _factorized_names(model)
    assert len(_linear_names(model)) == 6
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_report_rows_totals_and_skips():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    report = factorize_(model, rank=0.5)
    first, second = report.layers
    assert first.rank == 16 and first.params_after == 16 * 128 + 64
    assert first.flops_before == 64 * 64 and first.flops_after == 16 * 128
    assert 0 < first.weight_error < 1
    assert second.skipped and "would not save" in second.skipped
    assert isinstance(model[2], nn.Linear)
    assert report.params_before == 64 * 65 + 64 + 1
    text = str(report)
    assert "Linear -> SVDLinear" in text and "1 replaced, 1 skipped" in text


def test_weight_error_in_report_is_the_svd_optimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30, dtype=torch.float64))
    optimum = svd_tail_error(torch.linalg.svdvals(model[0].weight.detach()), 7)
    wrapper = nn.Sequential(model)
    report = factorize_(wrapper, rank=7)
    assert report.layers[0].weight_error == pytest.approx(optimum, rel=1e-8)


def test_root_linear_points_to_from_dense():
    with pytest.raises(TypeError, match=r"SVDLinear.from_dense\(layer, rank\)"):
        factorize_(nn.Linear(4, 4))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rank": "half"}, TypeError, "rank must be an int, a float"),
        ({"rank": 1.5}, ValueError, r"\(0, 1\], got 1.5"),
        ({"rank": 40}, ValueError, r"encoder.0 \(Linear\): rank must be in \[1, 20\]"),
        ({"include": ["nothing_like_this"]}, ValueError, "match no layer"),
        ({"exclude": ["re:zzz.*"]}, ValueError, "match no layer"),
        (
            {"layers": {nn.Embedding: SVDLinear}},
            ValueError,
            "SVDLinear cannot be built from Embedding",
        ),
        ({"layers": {nn.Linear: nn.Linear}}, ValueError, "not a registered factorized layer"),
        ({"multiple_of": 0}, ValueError, "multiple_of must be a positive integer, got 0"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, error, match):
    model = ToyMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        factorize_(model, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"params": 1.5}, r"Budget params must be in \(0, 1\], got 1.5"),
        ({"params": 0.0}, r"Budget params must be in \(0, 1\], got 0.0"),
        ({}, "exactly one of params= or flops="),
        ({"params": 0.5, "flops": 0.5}, "exactly one of params= or flops="),
    ],
)
def test_bad_budget(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def _layers_with_spectra(decays, size=48, seed=0):
    """A model of square Linear layers whose weights have singular values decay**i."""
    return nn.Sequential(
        *(linear_with_spectrum(size, size, decay, seed=seed + i) for i, decay in enumerate(decays))
    )


def _squared_error_sum(report):
    return sum((row.weight_error or 0.0) ** 2 for row in report.layers)


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5])
def test_budget_respects_budget_and_beats_uniform(fraction):
    decays = [0.5, 0.9, 0.98, 1.0]
    model = _layers_with_spectra(decays)
    report = factorize_(model, rank=Budget(params=fraction))
    dense_weights = len(decays) * 48 * 48
    weights_after = sum(
        row.params_after - (48 if row.skipped is None else 48) for row in report.layers
    )
    assert weights_after <= fraction * dense_weights
    assert weights_after > fraction * dense_weights - 2 * 48  # within one rank step (96 params)
    uniform = factorize_(_layers_with_spectra(decays), rank=fraction)
    uniform_weights = sum(row.params_after - 48 for row in uniform.layers)
    assert uniform_weights <= fraction * dense_weights
    assert _squared_error_sum(report) < _squared_error_sum(uniform)


def test_budget_on_flops():
    model = _layers_with_spectra([0.7, 1.0])
    report = factorize_(model, rank=Budget(flops=0.4))
    assert report.flops_after <= 0.4 * report.flops_before


def test_budget_can_keep_a_layer_dense():
    model = _layers_with_spectra([0.3, 1.0], size=16)
    report = factorize_(model, rank=Budget(params=0.75))
    notes = [row.skipped for row in report.layers]
    assert "kept dense by the budget" in notes


def test_evbmf_recovers_true_rank_and_never_zero():
    g = torch.Generator().manual_seed(0)
    signal = (
        torch.randn(200, 10, generator=g, dtype=torch.float64)
        @ torch.randn(10, 300, generator=g, dtype=torch.float64)
        / math.sqrt(10)
    )
    noisy = signal + 0.1 * signal.std() * torch.randn(200, 300, generator=g, dtype=torch.float64)
    dense = nn.Linear(300, 200, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(noisy)
    assert SVDLinear.from_dense(dense, EVBMF()).rank == 10
    with torch.no_grad():
        dense.weight.copy_(torch.randn(200, 300, generator=g, dtype=torch.float64))
    assert SVDLinear.from_dense(dense, EVBMF()).rank >= 1


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_energy_and_error_bound_pick_the_smallest_sufficient_rank(threshold):
    layer = _layers_with_spectra([0.9])[0]
    s = torch.linalg.svdvals(layer.weight.detach())
    energy_rank = SVDLinear.from_dense(layer, Energy(threshold)).rank
    kept = (s[:energy_rank] ** 2).sum() / (s**2).sum()
    kept_less = (s[: energy_rank - 1] ** 2).sum() / (s**2).sum()
    assert kept >= threshold > kept_less
    bound = 1 - threshold
    error_rank = SVDLinear.from_dense(layer, ErrorBound(bound)).rank
    assert svd_tail_error(s, error_rank) <= bound < svd_tail_error(s, error_rank - 1)


def test_multiple_of_rounds_ranks():
    model = _layers_with_spectra([0.9, 0.95], size=64)
    report = factorize_(model, rank=0.3, multiple_of=8)
    assert all(row.rank % 8 == 0 for row in report.replaced)
    assert all(row.rank == 8 for row in report.replaced)  # floor(0.3 * 64 * 64 / 128) = 9 -> 8


def test_progress_lines(capsys):
    model = _layers_with_spectra([0.9, 0.9], size=8)
    factorize_(model, rank=2, progress=True)
    assert "factorize_" in capsys.readouterr().err


def test_meta_model_converts_on_meta():
    with torch.device("meta"):
        model = ToyMLP(dtype=torch.float32)
    report = factorize_(model, rank=4)
    assert len(report.replaced) == 6
    assert all(p.device.type == "meta" for p in model.parameters())


def test_bert_from_small_config():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval().double()
    ids = torch.randint(0, 100, (2, 9))
    expected = model(input_ids=ids).last_hidden_state
    encoder_linears = {n for n in _linear_names(model) if n.startswith("encoder.")}
    assert len(encoder_linears) == 12
    report = factorize_(model, rank=32, include=["re:encoder\\..*"], allow_larger=True)
    assert {row.name for row in report.replaced} == encoder_linears
    assert _linear_names(model) == {"pooler.dense"}
    torch.testing.assert_close(
        model(input_ids=ids).last_hidden_state, expected, rtol=1e-9, atol=1e-9
    )
    compressed = transformers.BertModel(config).eval()
    report = factorize_(compressed, rank=0.5, include=["query", "key", "value"])
    assert len(report.replaced) == 6
    assert compressed(input_ids=ids).last_hidden_state.shape == (2, 9, 32)


def test_tucker_selectable_through_layers_mapping():
    from factorized_layers import TuckerLinear

    torch.manual_seed(0)
    model = ToyMLP()
    x = torch.randn(4, 20, dtype=torch.float64)
    expected = model(x)
    report = factorize_(model, rank=1.0, layers={nn.Linear: TuckerLinear}, allow_larger=True)
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert {row.target_type for row in report.replaced} == {"TuckerLinear"}
    # A budget of the full parameter count admits an exact Tucker form of every layer.
    torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("policy", [Energy(0.8), ErrorBound(0.3), EVBMF(), Budget(params=0.5)])
def test_tucker_accepts_rank_policies_and_meets_error_targets(policy):
    from factorized_layers import TuckerLinear

    model = _layers_with_spectra([0.8, 0.95], size=24)
    report = factorize_(model, rank=policy, layers={nn.Linear: TuckerLinear})
    assert report.replaced and {r.target_type for r in report.replaced} == {"TuckerLinear"}
    bound = {Energy: (1 - 0.8) ** 0.5, ErrorBound: 0.3}.get(type(policy))
    if bound is not None:
        assert all(row.weight_error <= bound + 1e-6 for row in report.replaced)
    if isinstance(policy, Budget):
        weights_after = sum(r.params_after - 24 for r in report.layers)
        assert weights_after <= 0.5 * 2 * 24 * 24


class ToyCNN(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, dtype=dtype)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect", dtype=dtype)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, dtype=dtype)
        self.head = nn.Linear(16 * 4 * 4, 10, dtype=dtype)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(self.depthwise(x).flatten(1))


def _set_cp_kernel(conv, rank, seed):
    """Give ``conv`` a kernel that is exactly a sum of ``rank`` rank-1 terms."""
    g = torch.Generator().manual_seed(seed)
    factors = [
        torch.randn(n, rank, generator=g, dtype=conv.weight.dtype) for n in conv.weight.shape
    ]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", *factors))


def test_cnn_convolutions_convert_and_exact_cp_kernels_keep_outputs():
    torch.manual_seed(0)
    model = ToyCNN()
    _set_cp_kernel(model.conv1, 4, seed=1)
    _set_cp_kernel(model.conv2, 4, seed=2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = model(x)
    report = factorize_(model, 4, include=["conv1", "conv2"], seed=0, ridge=0.0, n_iter=1000)
    assert {row.name for row in report.replaced} == {"conv1", "conv2"}
    assert type(model.conv1).__name__ == "CPConv2d" and model.conv2.padding_mode == "reflect"
    assert all(row.weight_error < 1e-6 for row in report.replaced)

    def relative(a, b):
        return float((a - b).detach().norm() / b.detach().norm())

    assert relative(model(x), expected) < 1e-6
    unfactorize_(model)
    assert isinstance(model.conv1, nn.Conv2d) and model.conv2.stride == (2, 2)
    assert relative(model(x), expected) < 1e-6


def test_cnn_default_mapping_skips_grouped_convolutions_with_reason():
    model = ToyCNN()
    report = factorize_(model, rank=Budget(params=0.5))
    rows = {row.name: row for row in report.layers}
    assert rows["depthwise"].skipped.startswith("groups=16")
    assert isinstance(model.depthwise, nn.Conv2d)
    assert rows["conv2"].target_type == "CPConv2d" and rows["head"].target_type == "SVDLinear"
    weights_after = sum(r.params_after - r.shape[0] for r in report.layers if r.name != "depthwise")
    dense_weights = sum(m.weight.numel() for n, m in ToyCNN().named_children() if n != "depthwise")
    assert weights_after <= 0.5 * dense_weights
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).shape == (1, 10)


# ----------------------------------------------------------------- review regressions


def test_multihead_attention_out_proj_is_left_dense_and_model_still_runs():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    x = torch.randn(2, 5, 64)
    report = factorize_(layer, 0.25)
    rows = {row.name: row for row in report.layers}
    assert rows["self_attn.out_proj"].skipped.startswith("out_proj of nn.MultiheadAttention")
    assert rows["linear1"].skipped.startswith("linear1 of nn.TransformerEncoderLayer")
    assert layer(x).shape == (2, 5, 64)
    attention = nn.ModuleDict({"mha": nn.MultiheadAttention(32, 4), "proj": nn.Linear(32, 32)})
    report = factorize_(attention, 8)
    assert [row.name for row in report.replaced] == ["proj"]
    q = torch.randn(3, 2, 32)
    assert attention["mha"](q, q, q)[0].shape == (3, 2, 32)


def test_budget_is_respected_when_strided_convolutions_cannot_save_flops():
    model = nn.Sequential(
        nn.Conv2d(64, 64, 3, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 64)
    )
    report = factorize_(model, Budget(params=0.3))
    weights_after = sum(r.params_after - r.shape[0] for r in report.layers)
    dense_weights = 64 * 64 * 9 + 64 * 64
    assert weights_after <= 0.3 * dense_weights
    for row in report.replaced:
        assert row.flops_after < row.flops_before and row.params_after < row.params_before


def test_evbmf_with_multiple_of_rounds_the_true_rank_up():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(256, 12, generator=g, dtype=torch.float64) @ torch.randn(
        12, 256, generator=g, dtype=torch.float64
    )
    dense = nn.Linear(256, 256, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(signal + 0.01 * torch.randn(256, 256, generator=g, dtype=torch.float64))
    assert SVDLinear.from_dense(dense, EVBMF()).rank == 12
    report = factorize_(nn.Sequential(dense), EVBMF(), multiple_of=8)
    assert report.layers[0].rank == 16


def test_layers_whose_real_factorization_saves_nothing_stay_dense():
    from factorized_layers import TuckerLinear

    model = nn.Sequential(nn.Linear(64, 48))
    report = factorize_(model, 0.9, layers={nn.Linear: TuckerLinear})
    row = report.layers[0]
    if row.skipped is None:
        assert row.flops_after < row.flops_before and row.params_after < row.params_before
    else:
        assert isinstance(model[0], nn.Linear) and "would not save" in row.skipped


def test_parametrized_factor_and_full_backward_hook_survive():
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    fired = []
    model[0].register_full_backward_hook(lambda m, gi, go: fired.append("full"))
    factorize_(model, 2)
    model(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert fired == ["full"]
    parametrize.register_parametrization(model[0], "input_factor", nn.Identity())
    assert model(torch.randn(3, 8)).shape == (3, 2)


def test_repeated_call_with_include_is_a_no_op():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    factorize_(model, 4, include=["0"])
    report = factorize_(model, 4, include=["0"])
    assert len(report) == 0 and isinstance(model[2], nn.Linear)


def test_calibration_runs_in_eval_mode_and_restores_training_flags():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).train()
    model[1].eval()
    data = [torch.randn(10, 8) for _ in range(3)]
    factorize_(model, 4, calibration=data)
    assert model[1].num_batches_tracked.item() == 0
    assert model.training and model[0].training and not model[1].training


def test_frozen_source_stays_frozen():
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    model[0].requires_grad_(False)
    factorize_(model, 3)
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in model[2].parameters())
    unfactorize_(model)
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad


def test_constructor_names_bad_feature_sizes():
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        SVDLinear(0, 4, 1)


def test_per_class_options_and_clear_error_for_options_that_do_not_apply():
    model = ToyCNN(dtype=torch.float32)
    report = factorize_(
        model, 0.3, include=["conv2", "head"], layer_options={CPConv2d: {"n_iter": 5, "ridge": 0.0}}
    )
    assert {row.target_type for row in report.replaced} == {"CPConv2d", "SVDLinear"}
    assert model.conv2.fit_info["n_iter"] <= 5
    data = [torch.randn(4, 20)]
    with pytest.raises(TypeError, match=r"with calibration, from_dense takes ridge=.*\['seed'\]"):
        factorize_(nn.Sequential(nn.Linear(20, 20)), 4, calibration=data, seed=0)
    with pytest.raises(ValueError, match="layer_options keys must be registered layer classes"):
        factorize_(ToyMLP(), 4, layer_options={nn.Linear: {}})


def _speed_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def test_min_speedup_keeps_dense_what_would_be_slower_and_says_why():
    model = _speed_model()
    x = torch.randn(7, 32)
    expected = model(x)
    report = factorize_(model, 0.5, example_inputs=[x], min_speedup=1e6, progress=False)
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))
    assert torch.equal(model(x), expected)
    reasons = [row.skipped for row in report.layers]
    assert "at input (7, 32) (min_speedup=1000000.0)" in reasons[0]
    assert "at input (7, 64) (min_speedup=1000000.0)" in reasons[1]
    assert all(row.speedup is not None and row.speedup > 0 for row in report.layers)
    assert "speed vs dense" in str(report)


def test_min_speedup_converts_what_is_fast_enough_and_allow_slower_times_nothing():
    model = _speed_model()
    x = torch.randn(7, 32)
    report = factorize_(model, 0.5, example_inputs=[x], min_speedup=1e-9, progress=False)
    assert isinstance(model[0], SVDLinear) and isinstance(model[2], SVDLinear)
    assert all(row.speedup is not None for row in report.layers)
    model = _speed_model()
    report = factorize_(model, 0.5, example_inputs=[x], min_speedup=1e6, allow_slower=True,
                        progress=False)  # fmt: skip
    assert isinstance(model[0], SVDLinear)
    assert all(row.speedup is None for row in report.layers)
    assert "speed vs dense" not in str(report)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_min_speedup_is_validated(bad):
    with pytest.raises(ValueError, match="min_speedup must be a positive finite number"):
        factorize_(_speed_model(), 0.5, min_speedup=bad, progress=False)


def _stack(width=48, depth=5):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def test_streaming_converts_like_one_pass_and_frees_each_dense_weight_once_replaced(
    monkeypatch,
):
    import weakref

    import factorized_layers.convert.api as api

    reference, streamed = _stack(), _stack()
    factorize_(reference, 0.3, progress=False)
    weights = [weakref.ref(m.weight) for m in streamed if isinstance(m, nn.Linear)]
    alive_when_built = []
    real_build = api._build

    def build(*args, **kwargs):
        alive_when_built.append([w() is not None for w in weights])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(api, "_build", build)
    report = factorize_(streamed, 0.3, streaming=True, progress=False)
    # When layer k is decomposed, the dense weights of layers 0..k-1 are gone already.
    assert alive_when_built == [[i >= k for i in range(5)] for k in range(5)]
    assert all(w() is None for w in weights)
    assert len(report.replaced) == 5
    x = torch.randn(3, 48)
    assert torch.equal(streamed(x), reference(x))


def test_an_interrupted_streaming_conversion_leaves_whole_layers(monkeypatch):
    import factorized_layers.convert.api as api

    model = _stack()
    real_build = api._build
    calls = {"n": 0}

    def build(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_build(*args, **kwargs)

    monkeypatch.setattr(api, "_build", build)
    with pytest.raises(KeyboardInterrupt):
        factorize_(model, 0.3, streaming=True, progress=False)
    kinds = [type(m) for m in model if not isinstance(m, nn.ReLU)]
    assert kinds == [SVDLinear, SVDLinear, nn.Linear, nn.Linear, nn.Linear]
    assert torch.isfinite(model(torch.randn(3, 48))).all()


def test_streaming_is_validated():
    with pytest.raises(TypeError, match="streaming must be a bool"):
        factorize_(_stack(), 0.3, streaming=1, progress=False)
    with pytest.raises(ValueError, match="not with layers='auto'"):
        factorize_(_stack(), 0.3, streaming=True, layers="auto", progress=False)
