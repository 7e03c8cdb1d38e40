"""The layer contract: registration refuses incomplete and duplicate classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import factorized_layers.registry as registry
from factorized_layers import Capabilities, FactorizedLayer, SVDLinear, register_layer
from factorized_layers.layers.base import Fit
from factorized_layers.sources import LinearSource


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Each test registers into a copy, so the global registry stays as it was."""
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))


class DiagonalLinear(FactorizedLayer):
    """A minimal complete family: a diagonal weight (for square layers)."""

    source = LinearSource()

    def __init__(self, features, rank=None, bias=True, device=None, dtype=None):
        super().__init__()
        self.features, self.rank = features, features
        self.diagonal = nn.Parameter(torch.ones(features, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.zeros(features, device=device, dtype=dtype)) if bias else None
        )

    def forward(self, x):
        return x * self.diagonal + (0 if self.bias is None else self.bias)

    @classmethod
    def fit_factors(cls, linear, rank):
        config = {"features": linear.in_features, "bias": linear.bias is not None}
        return Fit(config, {"diagonal": linear.weight.diagonal().clone()})

    def dense_weight(self):
        return torch.diag(self.diagonal)

    def flops_per_position(self):
        return self.features

    def get_config(self):
        return {"features": self.features, "bias": self.bias is not None}


def test_a_complete_family_registers_and_gets_the_shared_skeleton():
    assert register_layer(DiagonalLinear) is DiagonalLinear
    assert registry.registered_layers()[DiagonalLinear] == (nn.Linear,)
    dense = nn.Linear(4, 4).eval()
    with torch.no_grad():
        dense.weight.copy_(torch.diag(torch.arange(1.0, 5.0)))
    layer = DiagonalLinear.from_dense(dense, None)
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), dense(x))
    assert not layer.training and layer.bias is not dense.bias
    rebuilt = layer.to_dense()
    assert type(rebuilt) is nn.Linear
    torch.testing.assert_close(rebuilt(x), dense(x))
    with pytest.raises(TypeError, match="does not support truncated"):
        layer.truncated(1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['seed'\]"):
        DiagonalLinear.from_dense(dense, None, seed=0)
    with pytest.raises(TypeError, match="takes no calibration"):
        DiagonalLinear.from_dense(dense, None, calibration=torch.eye(4))


def test_registering_again_is_a_no_op_and_other_sources_are_refused():
    register_layer(SVDLinear, nn.Linear)
    assert registry.registered_layers()[SVDLinear] == (nn.Linear,)
    with pytest.raises(
        ValueError, match=r"already registered for \['Linear'\], not \['Bilinear'\]"
    ):
        register_layer(SVDLinear, nn.Bilinear)


def test_a_second_class_under_a_registered_name_is_refused():
    duplicate = type("SVDLinear", (DiagonalLinear,), {})
    with pytest.raises(ValueError, match="class named 'SVDLinear' is already registered"):
        register_layer(duplicate)


def test_incomplete_classes_are_refused_with_what_they_miss():
    class NoFit(FactorizedLayer):
        source = LinearSource()

        def dense_weight(self):
            return torch.zeros(1, 1)

        def flops_per_position(self):
            return 1

        def get_config(self):
            return {}

    with pytest.raises(
        TypeError,
        match=r"NoFit does not fulfil the layer contract: fit_factors\(\) not implemented",
    ):
        register_layer(NoFit)

    class ClaimsTooMuch(DiagonalLinear):
        capabilities = Capabilities(calibration=True, rank_profile=True, truncation=True)

    with pytest.raises(TypeError) as error:
        register_layer(ClaimsTooMuch)
    message = str(error.value)
    assert "takes no gram=" in message and "no rank_profile()" in message
    assert "no truncate_factors()" in message


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="expects a class"):
        register_layer(SVDLinear(4, 4, 2))
    with pytest.raises(TypeError, match="needs source types"):
        register_layer(type("Loose", (), {}))
    with pytest.raises(TypeError, match="source types must be classes"):
        register_layer(DiagonalLinear, "Linear")
