"""CPConv1d and CPConv3d through the whole library: conversion, calibration, checkpoints.

The generic layer tests (forward oracle, gradcheck, meta, compile, ...) run over
these classes from ``tests/module_db.py``; here they go through ``factorize_``,
calibration, sequential calibration, ``truncate_`` and ``save/load_factorized``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from factorized_layers import (
    Budget,
    CPConv1d,
    CPConv3d,
    calibrate,
    factorize_,
    load_factorized,
    save_factorized,
    truncate_,
    unfactorize_,
)


def _audio_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(4, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 3),
    ).eval()  # fmt: skip


def _video_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv3d(12, 12, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(12, 3),
    ).eval()  # fmt: skip


CASES = [(_audio_net, CPConv1d, (8, 4, 20)), (_video_net, CPConv3d, (4, 3, 5, 6, 6))]


@pytest.mark.parametrize("make, cls, shape", CASES, ids=["conv1d", "conv3d"])
def test_factorize_converts_nd_convolutions_by_default(make, cls, shape):
    model = make()
    report = factorize_(model, rank=0.5, include=["0", "2"], seed=0)
    assert [type(model[i]) for i in (0, 2)] == [cls, cls]
    assert [row.target_type for row in report.replaced] == [cls.__name__] * 2
    dense = make()
    for row, index in zip(report.replaced, (0, 2)):
        assert row.params_before == sum(p.numel() for p in dense[index].parameters())
        assert row.flops_before == dense[index].weight.numel()
        assert 0 < row.weight_error < 1
    x = torch.randn(shape)
    with torch.no_grad():
        assert model(x).shape == dense(x).shape
    unfactorize_(model)
    assert type(model[0]) is type(dense[0])
    assert model[0].extra_repr() == dense[0].extra_repr()


@pytest.mark.parametrize("make, cls, shape", CASES, ids=["conv1d", "conv3d"])
def test_calibrated_nd_conversion_fits_the_data_better(make, cls, shape):
    torch.manual_seed(1)
    # Inputs with a few dominant channels: the calibrated fit spends the rank there.
    mixing = torch.randn(shape[1], shape[1]) * torch.tensor([3.0] + [0.05] * (shape[1] - 1))
    data = [torch.einsum("ci,ni...->nc...", mixing, torch.randn(shape)) for _ in range(6)]
    stats = calibrate(make(), data)
    assert stats["0"].gram.shape == (shape[1], shape[1])
    assert stats["0"].rows == 6 * shape[0] * int(torch.tensor(shape[2:]).prod())
    reference = make()
    held_out = data[-1]
    errors = {}
    for calibrated in (False, True):
        model = make()
        factorize_(
            model, rank=0.25, include=["0"], calibration=data[:-1] if calibrated else None,
            sequential=False, seed=0,
        )  # fmt: skip
        with torch.no_grad():
            out, expected = model[0](held_out), reference[0](held_out)
        errors[calibrated] = float((out - expected).norm() / expected.norm())
    assert errors[True] < errors[False]


@pytest.mark.parametrize("make, cls, shape", CASES, ids=["conv1d", "conv3d"])
def test_sequential_budget_conversion_and_checkpoint_round_trip(make, cls, shape, tmp_path):
    torch.manual_seed(2)
    data = [torch.randn(shape) for _ in range(8)]
    model = make()
    report = factorize_(
        model, rank=Budget(params=0.6), calibration=data, layer_options={cls: {"seed": 0}}
    )
    assert report.model_output_error is not None
    assert any(row.target_type == cls.__name__ for row in report.replaced)
    path = tmp_path / "model.pt"
    save_factorized(model, path)
    loaded = load_factorized(make(), path)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    before = copy.deepcopy(model)
    truncated = truncate_(model, 1, n_iter=5)
    assert all(row.rank == 1 for row in truncated.replaced)
    assert all(isinstance(m, type(b)) for m, b in zip(model, before))
