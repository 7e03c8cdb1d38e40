"""Dense subclasses that override forward: the static-padding idiom converts, others refuse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import (
    CPConv2d,
    SVDLinear,
    factorize_,
    load_factorized,
    registered_layers,
    save_factorized,
    truncate_,
    unfactorize_,
)


class StaticSameConv(nn.Conv2d):
    """TensorFlow "same" padding computed for a fixed image size (efficientnet_pytorch style)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=9):
        super().__init__(in_channels, out_channels, kernel_size, stride, bias=True)
        kh, kw = self.kernel_size
        out = math.ceil(image_size / self.stride[0])
        pad_h = max((out - 1) * self.stride[0] + kh - image_size, 0)
        pad_w = max((out - 1) * self.stride[1] + kw - image_size, 0)
        self.static_padding = nn.ZeroPad2d(
            (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        )

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        StaticSameConv(12, 16, 3, stride=2), nn.ReLU(), StaticSameConv(16, 6, 2, image_size=5)
    ).eval()


def _conv_classes():
    return [cls for cls, sources in registered_layers().items() if nn.Conv2d in sources]


@pytest.mark.parametrize("layer_cls", _conv_classes(), ids=lambda cls: cls.__name__)
def test_static_padding_subclass_converts_exactly_at_full_rank(layer_cls):
    conv = _net()[0]
    x = torch.randn(2, 12, 9, 9)
    options = {"seed": 0} if layer_cls is CPConv2d else {}
    layer = layer_cls.from_dense(conv, _full_rank(layer_cls, conv), **options)
    assert isinstance(layer.input_prelude, nn.ZeroPad2d)
    expected = conv(x)
    assert layer(x).shape == expected.shape == (2, 16, 5, 5)
    if layer_cls is not CPConv2d:  # CP-ALS is not exact; the others are at full rank
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.to_dense()(x), layer(x), rtol=1e-4, atol=1e-5)


def _full_rank(layer_cls, conv):
    profile = layer_cls.rank_profile(conv)
    return profile.ranks[-1]


def test_factorize_checkpoint_truncate_and_unfactorize_keep_the_padding(tmp_path):
    model = _net()
    x = torch.randn(3, 12, 9, 9)
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    factorize_(model, rank=0.3, layer_options={CPConv2d: {"seed": 0}})
    assert all(isinstance(model[i], CPConv2d) for i in (0, 2))
    converted = model(x)
    assert seen[-1] == (3, 12, 9, 9)  # the user's hook still sees the unpadded input
    # Oracle: the dense subclass (padding included) with the factorized kernels.
    dense = _net()
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.copy_(model[i].dense_weight())
    reference = dense(x)
    torch.testing.assert_close(converted, reference, rtol=1e-4, atol=1e-5)
    path = tmp_path / "model.pt"
    save_factorized(model, path)
    loaded = load_factorized(_net(), path)
    torch.testing.assert_close(loaded(x), converted, rtol=0, atol=0)
    truncate_(model, rank=2)
    assert model(x).shape == reference.shape and model[0].rank == 2
    truncated = model(x)
    unfactorize_(model)
    assert type(model[0]) is nn.Conv2d
    torch.testing.assert_close(model(x), truncated, rtol=1e-4, atol=1e-5)


def test_other_overridden_forwards_are_refused_and_reported():
    model = nn.Sequential(ScaledLinear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    report = factorize_(model, rank=2, allow_larger=True)
    assert type(model[0]) is ScaledLinear and isinstance(model[2], SVDLinear)
    assert "ScaledLinear overrides forward" in report.skipped[0].skipped
    with pytest.raises(ValueError, match="ScaledLinear overrides forward"):
        SVDLinear.from_dense(ScaledLinear(8, 8), 2)
