"""factorize_(..., layers="auto"): per-layer family choice against single-family conversions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from factorized_layers import Budget, CPConv2d, ErrorBound, SVDLinear, factorize_, registered_layers
from factorized_layers.convert import auto


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 24, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(24, 32, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 48),
        nn.ReLU(),
        nn.Linear(48, 96),
    )
    # Low-rank structure plus noise, as in trained layers, so families differ.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                w = module.weight.view(module.weight.shape[0], -1)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                w.copy_((u * s * torch.exp(-0.3 * torch.arange(s.numel()))) @ vh)
    return model


def _batches(count: int = 3):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, 6, 6, generator=generator) for _ in range(count)]


def _candidates_of(module: nn.Module):
    return [cls for cls, sources in registered_layers().items() if isinstance(module, sources)]


SEEDED = {CPConv2d: {"seed": 0}}


def _seeded(family):
    return {family: SEEDED[family]} if family in SEEDED else None


def _weight_errors(report):
    return {row.name: row.weight_error for row in report.replaced}


def test_auto_is_never_worse_than_any_single_family_at_equal_shares():
    # A float rank gives every family the same share of each layer: auto fits them all
    # there and keeps the lowest error, so no single-family conversion can beat it.
    model = _model()
    report = factorize_(model, 0.4, layers="auto", layer_options=SEEDED)
    chosen = _weight_errors(report)
    assert chosen and all(row.note.startswith("auto: ") for row in report.replaced)
    compared = 0
    for source in (nn.Linear, nn.Conv2d):
        for family in _candidates_of(
            nn.Linear(2, 2) if source is nn.Linear else nn.Conv2d(1, 1, 1)
        ):
            single = _model()
            single_report = factorize_(
                single, 0.4, layers={source: family}, layer_options=_seeded(family)
            )
            for name, error in _weight_errors(single_report).items():
                if name in chosen:
                    assert chosen[name] <= error + 1e-6, (name, family.__name__)
                    compared += 1
    assert compared >= 2 * len(chosen)  # every layer against at least two families


def test_auto_with_a_budget_keeps_the_budget_and_names_the_choice():
    model = _model()
    dense = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight"))
    report = factorize_(
        model, Budget(params=0.5), layers="auto", calibration=_batches(), allow_slower=True
    )
    kept = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("bias"))
    assert kept <= 0.5 * dense * 1.0001
    for row in report.replaced:
        assert row.note.startswith(f"auto: {row.target_type}")
        assert "RMS of output and weight error" in row.note
    linear_rows = [row for row in report.replaced if row.source_type == "Linear"]
    assert all(row.output_error is not None for row in linear_rows)


def test_calibrated_choice_is_never_worse_than_any_single_family_on_hedged_error():
    # With calibration the families are compared on the root mean square of output and
    # weight error; the report computes both for a linear layer independently of the
    # choice (relative_output_error on the Gram, and the weight error).
    batches = _batches()
    report = factorize_(_model(), 0.4, layers="auto", calibration=batches, allow_slower=True)
    linear = [row for row in report.replaced if row.output_error is not None]
    chosen = {row.name: _hedged(row) for row in linear}
    assert chosen and all("RMS of output and weight error" in row.note for row in linear)
    compared = 0
    for family in _candidates_of(nn.Linear(2, 2)):
        single = factorize_(
            _model(), 0.4, layers={nn.Linear: family}, calibration=batches, sequential=False
        )
        for row in single.replaced:
            assert chosen[row.name] <= _hedged(row) + 1e-6, (row.name, family.__name__)
            compared += 1
    assert compared >= 2 * len(chosen)


def _hedged(row) -> float:
    return ((row.output_error**2 + row.weight_error**2) / 2) ** 0.5


def test_speed_guard_drops_slower_families(monkeypatch):
    def fake_speedup(module, layer, shape):
        return 0.5 if isinstance(layer, CPConv2d) else 2.0

    monkeypatch.setattr(auto, "_speedup", fake_speedup)
    model = _model()
    report = factorize_(model, 0.4, layers="auto", example_inputs=_batches(1), layer_options=SEEDED)
    for row in report.replaced:
        assert row.target_type != "CPConv2d"
    convs = [row for row in report.layers if row.source_type == "Conv2d"]
    assert any("CPConv2d: 0.50x dense speed" in (row.note or "") for row in convs)
    model = _model()
    report = factorize_(
        model,
        0.4,
        layers="auto",
        example_inputs=_batches(1),
        allow_slower=True,
        layer_options=SEEDED,
    )
    assert not any("dense speed" in (row.note or "") for row in report.layers)


def test_a_layer_whose_families_are_all_slower_stays_dense(monkeypatch):
    monkeypatch.setattr(auto, "_speedup", lambda module, layer, shape: 0.9)
    model = _model()
    before = copy.deepcopy(model.state_dict())
    report = factorize_(model, Budget(params=0.6), layers="auto", example_inputs=_batches(1))
    assert not report.replaced
    assert all("every family is slower" in row.skipped for row in report.layers)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_error_bound_policy_picks_families_meeting_the_bound():
    model = _model()
    report = factorize_(model, ErrorBound(0.3), layers="auto", layer_options=SEEDED)
    for row in report.replaced:
        if row.target_type in {"SVDLinear", "SVDConv2d"}:
            assert row.weight_error <= 0.3 + 1e-6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rank": 8}, TypeError, "float, Budget, Energy or ErrorBound rank, not 8"),
        ({"rank": 0.5, "layers": "best"}, ValueError, "'auto', got 'best'"),
        ({"rank": 0.5, "multiple_of": 8}, ValueError, "multiple_of"),
        ({"rank": 0.5, "sequential": True}, ValueError, "one pass"),
    ],
)
def test_bad_auto_arguments_are_refused(kwargs, error, match):
    arguments = dict({"layers": "auto"}, **kwargs)
    if arguments.get("sequential"):
        arguments["calibration"] = _batches(2)
    with pytest.raises(error, match=match):
        factorize_(_model(), **arguments)


def test_auto_mapping_covers_every_registered_source_type():
    mapping = auto.auto_mapping()
    for sources in registered_layers().values():
        assert all(source in mapping for source in sources)
    assert mapping[nn.Linear] in registered_layers() and SVDLinear in registered_layers()


def test_svd_conv2d_offers_both_modes_except_for_a_pointwise_kernel():
    def modes(conv):
        return sorted(v["mode"] for cls, v in auto._candidates(conv) if "mode" in v)

    assert modes(nn.Conv2d(4, 8, 3)) == ["channel", "spatial"]
    assert modes(nn.Conv2d(4, 8, 1)) == ["channel"]
    assert auto._candidates(nn.Conv2d(4, 8, 3, groups=2)) == []
