"""Generic tests over every case of the module database x dtype x device."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from factorized_layers.testing import assert_close_to_reference, supported_dtypes

from .module_db import MODULE_CASES

CASES = pytest.mark.parametrize("case", MODULE_CASES, ids=str)


def _dtypes(device):
    return supported_dtypes(device)


def _make_pair(case, device, dtype, seed=0):
    torch.manual_seed(seed)
    dense = case.make_dense(device=device, dtype=dtype)
    return dense, case.layer_cls.from_dense(dense, case.rank)


@CASES
def test_forward_matches_dense_weight_oracle(case, device):
    for dtype in _dtypes(device):
        dense, layer = _make_pair(case, device, dtype)
        x = torch.randn(case.input_shape, device=device, dtype=dtype)
        out = layer(x)
        assert out.dtype == dtype and out.device.type == device
        expected = F.linear(x, layer.dense_weight(), layer.bias)
        assert_close_to_reference(out, expected, terms=case.reduction_terms, msg=f"{dtype}")
        assert_close_to_reference(layer.to_dense()(x), expected, terms=case.reduction_terms)


@CASES
def test_full_rank_reproduces_source(case, device):
    for dtype in _dtypes(device):
        dense, _ = _make_pair(case, device, dtype)
        layer = case.layer_cls.from_dense(dense, case.full_rank)
        x = torch.randn(case.input_shape, device=device, dtype=dtype)
        # The factors go through a float32 SVD, so low-precision results carry one
        # extra rounding of the weight: compare at twice the reduction length.
        assert_close_to_reference(
            layer(x), dense(x), terms=4 * case.reduction_terms, msg=f"{dtype}"
        )


@CASES
def test_no_dense_weight_is_stored(case):
    dense, layer = _make_pair(case, "cpu", torch.float32)
    if layer.rank == min(dense.weight.shape):
        pytest.fail(f"case {case.name} must use a rank below full rank to test storage")
    for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
        assert tensor.numel() < dense.weight.numel(), name


@CASES
def test_state_dict_round_trip_weights_only(case, tmp_path):
    dense, layer = _make_pair(case, "cpu", torch.float32)
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = case.layer_cls(
        *_constructor_args(layer), **_constructor_kwargs(layer), bias=layer.bias is not None
    )
    fresh.load_state_dict(state)
    x = torch.randn(case.input_shape)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def _constructor_args(layer):
    return layer.in_features, layer.out_features, layer.rank


def _constructor_kwargs(layer):
    # Tensorized layers also need their mode shapes (from_dense may choose them).
    return {k: getattr(layer, k) for k in ("in_shape", "out_shape") if hasattr(layer, k)}


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
def test_truncated_lowers_rank_and_keeps_device_dtype_mode(case, device):
    for dtype in _dtypes(device):
        _, layer = _make_pair(case, device, dtype)
        layer.eval()
        truncated = layer.truncated(1)
        expected = 1 if isinstance(layer.rank, int) else (1,) * len(layer.rank)
        assert truncated.rank == expected
        assert not truncated.training
        params = list(truncated.parameters())
        assert all(p.dtype == dtype and p.device.type == device for p in params)
        assert sum(p.numel() for p in params) <= sum(p.numel() for p in layer.parameters())
        x = torch.randn(case.input_shape, device=device, dtype=dtype)
        assert torch.isfinite(truncated(x)).all()


@CASES
def test_pickle_round_trip(case):
    _, layer = _make_pair(case, "cpu", torch.float64)
    clone = pickle.loads(pickle.dumps(layer))
    x = torch.randn(case.input_shape, dtype=torch.float64)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert repr(torch.load(buffer, weights_only=False)) == repr(layer)


@CASES
def test_gradcheck_float64(case):
    _, layer = _make_pair(case, "cpu", torch.float64)
    x = torch.randn(case.input_shape, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *params):
        state = dict(zip(names, params))
        return torch.func.functional_call(layer, state, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@CASES
def test_meta_construction_and_from_dense_stay_on_meta(case):
    dense = case.make_dense(device="meta")
    layer = case.layer_cls.from_dense(dense, case.rank)
    assert all(p.device.type == "meta" for p in layer.parameters())
    out = layer(torch.empty(case.input_shape, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == dense(torch.empty(case.input_shape, device="meta")).shape
    with torch.device("meta"):
        shell = case.layer_cls(*_constructor_args(layer), **_constructor_kwargs(layer))
    assert all(p.device.type == "meta" for p in shell.parameters())


@CASES
def test_from_dense_keeps_training_mode_and_bias(case):
    dense, _ = _make_pair(case, "cpu", torch.float32)
    for training in (True, False):
        dense.train(training)
        layer = case.layer_cls.from_dense(dense, case.rank)
        assert layer.training is training
        assert layer.to_dense().training is training
        if dense.bias is None:
            assert layer.bias is None and layer.to_dense().bias is None
        else:
            torch.testing.assert_close(layer.bias, dense.bias, rtol=0, atol=0)
            assert layer.bias.data_ptr() != dense.bias.data_ptr()


@CASES
def test_compile_fullgraph_matches_eager(case):
    torch._dynamo.reset()
    _, layer = _make_pair(case, "cpu", torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(case.input_shape)
    torch.testing.assert_close(compiled(x), layer(x))


@CASES
def test_extra_repr_shows_constructor_arguments(case):
    _, layer = _make_pair(case, "cpu", torch.float32)
    text = repr(layer)
    assert f"rank={layer.rank}" in text
    assert f"bias={layer.bias is not None}" in text
