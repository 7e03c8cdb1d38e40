"""Generic tests over every case of the module database x dtype x device."""

from __future__ import annotations

import inspect
import io
import json
import pickle

import pytest
import torch

from factorized_layers import FactorizedLayer, registered_layers
from factorized_layers.layers.base import input_problem
from factorized_layers.registry import capabilities_of
from factorized_layers.testing import assert_close_to_reference, supported_dtypes

from .module_db import MODULE_CASES, MODULE_DB, Case

CASES = pytest.mark.parametrize("case", MODULE_CASES, ids=str)
EXACT_CASES = pytest.mark.parametrize(
    "case", [c for c in MODULE_CASES if c.full_rank is not None], ids=str
)


def _make_pair(case, device, dtype, seed=0):
    torch.manual_seed(seed)
    dense = case.make_dense(device=device, dtype=dtype)
    return dense, case.layer_cls.from_dense(dense, case.rank, **case.options)


def test_every_registered_layer_is_in_the_module_db():
    assert set(registered_layers()) == {info.layer_cls for info in MODULE_DB}


@pytest.mark.parametrize("info", MODULE_DB, ids=lambda info: info.layer_cls.__name__)
def test_registered_layers_fulfil_the_contract(info):
    cls = info.layer_cls
    assert issubclass(cls, FactorizedLayer) and not getattr(cls, "__abstractmethods__", None)
    assert registered_layers()[cls] == (cls.source.module_type,)
    capabilities = capabilities_of(cls)
    assert capabilities.rank_profile and capabilities.truncation
    assert capabilities.calibration == info.calibration


@CASES
def test_forward_matches_reference_oracle(case, device):
    for dtype in supported_dtypes(device):
        dense, layer = _make_pair(case, device, dtype)
        x = case.input(device, dtype)
        out = layer(x)
        assert out.dtype == dtype and out.device.type == device
        expected = case.info.reference_fn(layer, x)
        assert out.shape == dense(x).shape
        assert_close_to_reference(out, expected, terms=case.reduction_terms, msg=f"{dtype}")
        assert_close_to_reference(layer.to_dense()(x), expected, terms=case.reduction_terms)


@pytest.mark.parametrize("info", MODULE_DB, ids=lambda info: info.layer_cls.__name__)
def test_bad_inputs_are_refused_with_the_expected_shape(info):
    # The error inputs are written for the first case of each class.
    _, layer = _make_pair(Case(info, info.cases[0]), "cpu", torch.float32)
    for error in info.error_inputs:
        with pytest.raises(error.error, match=error.match) as raised:
            layer(torch.randn(error.input_shape).to(error.dtype))
        # Like nn.Linear's errors, but naming the layer: class and configuration.
        assert str(raised.value).startswith(f"{info.layer_cls.__name__}({layer.extra_repr()}): ")
    # An input on another device than the layer's: what a kernel failure is diagnosed as
    # (meta stands in for an accelerator; on CUDA machines the real thing is tried).
    good = info.make_input(info.cases[0].input_shape, "cpu", torch.float32)
    problem = input_problem(layer, good.to("meta"))
    assert isinstance(problem, ValueError) and "expected an input on cpu" in str(problem)
    assert input_problem(layer, good) is None
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="expected an input on cpu"):
            layer(good.cuda())


@EXACT_CASES
def test_full_rank_reproduces_source(case, device):
    for dtype in supported_dtypes(device):
        dense, _ = _make_pair(case, device, dtype)
        layer = case.layer_cls.from_dense(dense, case.full_rank, **case.options)
        x = case.input(device, dtype)
        # The factors go through a float32 SVD, so low-precision results carry one
        # extra rounding of the weight: compare at twice the reduction length.
        assert_close_to_reference(
            layer(x), dense(x), terms=4 * case.reduction_terms, msg=f"{dtype}"
        )


@CASES
def test_no_dense_weight_is_stored(case):
    dense, layer = _make_pair(case, "cpu", torch.float32)
    stored = sum(p.numel() for n, p in layer.named_parameters() if n != "bias")
    assert stored < dense.weight.numel(), f"case {case.name} must save parameters"
    for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
        assert tensor.numel() < dense.weight.numel(), name


@CASES
def test_state_dict_round_trip_weights_only(case, tmp_path):
    _, layer = _make_pair(case, "cpu", torch.float32)
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = case.layer_cls.from_config(layer.get_config())
    fresh.load_state_dict(state)
    x = case.input()
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@CASES
def test_config_round_trip_through_json(case):
    _, layer = _make_pair(case, "cpu", torch.float32)
    config = json.loads(json.dumps(layer.get_config()))
    fresh = case.layer_cls.from_config(config, dtype=torch.float64)
    assert repr(fresh) == repr(layer)
    assert next(fresh.parameters()).dtype == torch.float64
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in layer.state_dict().items()
    }
    with pytest.raises(TypeError, match="unknown argument"):
        case.layer_cls.from_config(dict(config, nonlinearity="relu"))


@CASES
def test_truncated_lowers_rank_and_keeps_device_dtype_mode_flags(case, device):
    for dtype in supported_dtypes(device):
        _, layer = _make_pair(case, device, dtype)
        layer.eval()
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        truncated = layer.truncated(1)
        expected = 1 if isinstance(layer.rank, int) else (1,) * len(layer.rank)
        assert truncated.rank == expected
        assert not truncated.training
        if layer.bias is not None:
            assert not truncated.bias.requires_grad
            torch.testing.assert_close(truncated.bias, layer.bias, rtol=0, atol=0)
        params = [p for n, p in truncated.named_parameters() if n != "bias"]
        assert all(p.requires_grad for p in params)
        assert all(p.dtype == dtype and p.device.type == device for p in truncated.parameters())
        assert sum(p.numel() for p in params) <= sum(p.numel() for p in layer.parameters())
        assert torch.isfinite(truncated(case.input(device, dtype))).all()


@CASES
def test_pickle_round_trip(case):
    _, layer = _make_pair(case, "cpu", torch.float64)
    clone = pickle.loads(pickle.dumps(layer))
    x = case.input(dtype=torch.float64)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert repr(torch.load(buffer, weights_only=False)) == repr(layer)


@pytest.mark.parametrize("case", [c for c in MODULE_CASES if c.true_gradient], ids=str)
def test_gradcheck_float64(case):
    _, layer = _make_pair(case, "cpu", torch.float64)
    x = case.input(dtype=torch.float64)
    params = [p for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *params):
        state = dict(zip(names, params))
        return torch.func.functional_call(layer, state, (x,))

    if x.is_floating_point():
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *params))
    else:  # the indices of a lookup have no gradient
        assert torch.autograd.gradcheck(lambda *params: fn(x, *params), tuple(params))


@CASES
def test_meta_construction_and_from_dense_stay_on_meta(case):
    dense = case.make_dense(device="meta")
    layer = case.layer_cls.from_dense(dense, case.rank, **case.options)
    assert all(p.device.type == "meta" for p in layer.parameters())
    x = case.input("meta")
    out = layer(x)
    assert out.device.type == "meta"
    assert out.shape == dense(x).shape
    shell = case.layer_cls.from_config(layer.get_config(), device="meta")
    assert all(p.device.type == "meta" for p in shell.parameters())


@CASES
def test_from_dense_keeps_training_mode_bias_and_frozen_flags(case):
    dense, _ = _make_pair(case, "cpu", torch.float32)
    for training in (True, False):
        dense.train(training)
        layer = case.layer_cls.from_dense(dense, case.rank, **case.options)
        assert layer.training is training
        assert layer.to_dense().training is training
        if getattr(dense, "bias", None) is None:
            assert layer.bias is None and getattr(layer.to_dense(), "bias", None) is None
        else:
            torch.testing.assert_close(layer.bias, dense.bias, rtol=0, atol=0)
            assert layer.bias.data_ptr() != dense.bias.data_ptr()
    dense.requires_grad_(False)
    frozen = case.layer_cls.from_dense(dense, case.rank, **case.options)
    assert not any(p.requires_grad for p in frozen.parameters())


@CASES
def test_to_dense_rebuilds_the_source_type_and_options(case):
    dense, layer = _make_pair(case, "cpu", torch.float32)
    rebuilt = layer.to_dense()
    assert type(rebuilt) is type(dense)
    assert rebuilt.extra_repr() == dense.extra_repr()
    torch.testing.assert_close(rebuilt.weight, layer.dense_weight(), rtol=0, atol=0)


@CASES
def test_compile_fullgraph_matches_eager(case):
    torch._dynamo.reset()
    _, layer = _make_pair(case, "cpu", torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = case.input()
    torch.testing.assert_close(compiled(x), layer(x))


@CASES
def test_extra_repr_shows_constructor_arguments(case):
    _, layer = _make_pair(case, "cpu", torch.float32)
    text = repr(layer)
    assert f"rank={layer.rank}" in text
    if "bias" in inspect.signature(case.layer_cls.__init__).parameters:
        assert f"bias={layer.bias is not None}" in text
