"""int8 factors: rounding bounds, accuracy against the float layer, storage, round trips.

Oracles: the float layer's own output, ``F.linear`` in float64, and the exact error
bound of symmetric rounding (half a quantization step per element).
"""

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from factorized_layers import (
    DynamicInt8SVDLinear,
    SVDLinear,
    factorize_,
    load_factorized,
    save_factorized,
)
from factorized_layers.export import export_onnx, export_program
from factorized_layers.functional.int8 import dequantize_rows, int8_linear, quantize_rows
from factorized_layers.quantize import quantize_

from .module_db import MODULE_CASES

WEIGHT_ONLY_MAX_RELATIVE_ERROR = 0.02
"""Stated bound: relative output error of any int8_weight layer on its test input."""
DYNAMIC_MAX_RELATIVE_ERROR = 0.03
"""Stated bound: relative output error of an int8_dynamic SVDLinear."""


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_rounding_error_is_at_most_half_a_step_per_element(rows, cols, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(rows, cols, generator=generator) * scale
    tensor[0] = 0.0  # an all-zero row dequantizes to exact zeros
    values, row_scale = quantize_rows(tensor)
    assert values.dtype == torch.int8 and values.abs().max() <= 127
    assert row_scale.shape == (rows, 1) and row_scale.dtype == torch.float32
    error = (dequantize_rows(values, row_scale) - tensor).abs()
    assert (error <= row_scale / 2 * (1 + 1e-5) + 1e-30).all()
    assert torch.equal(dequantize_rows(values, row_scale)[0], torch.zeros(cols))
    peaks = values.abs().amax(dim=1)[tensor.abs().amax(dim=1) > 0]
    assert (peaks == 127).all()


def test_quantize_rows_refuses_bad_tensors():
    with pytest.raises(TypeError, match="floating tensor, got torch.int64"):
        quantize_rows(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"2 or more dimensions, got shape \(3,\)"):
        quantize_rows(torch.ones(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("shape", [(1, 24), (5, 24), (2, 7, 24), (300, 24)])
def test_int8_linear_stays_within_the_rounding_bound_of_f_linear(shape):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(10, 24), torch.randn(10), torch.randn(shape)
    values, scale = quantize_rows(weight)
    got = int8_linear(x, values, scale, bias)
    want = F.linear(x.double(), weight.double(), bias.double())
    # |x^ w^ - x w| <= |dx| |w| + |x| |dw| + |dx| |dw| summed over the inner dimension,
    # with |dx| <= s_x / 2 per input row and |dw| <= s_w / 2 per weight row.
    rows = x.reshape(-1, 24).double()
    s_x = rows.abs().amax(dim=1, keepdim=True) / 127
    s_w = scale.double().reshape(1, 10)
    bound = (s_x / 2) * weight.double().abs().sum(1) + (s_w / 2) * rows.abs().sum(1, True)
    bound = bound + 24 * (s_x / 2) * (s_w / 2)
    error = (got.double() - want).reshape(-1, 10).abs()
    assert got.shape == shape[:-1] + (10,) and got.dtype == torch.float32
    assert (error <= bound + 1e-5).all()


def test_int8_linear_keeps_the_input_dtype_and_refuses_bad_widths():
    values, scale = quantize_rows(torch.randn(4, 8))
    assert int8_linear(torch.randn(3, 8, dtype=torch.bfloat16), values, scale).dtype == (
        torch.bfloat16
    )
    with pytest.raises(
        ValueError, match=r"expected input of shape \(\*, 8\), got (shape )?\(3, 5\)"
    ):
        int8_linear(torch.randn(3, 5), values, scale)


def _quantized_pair(case, mode):
    torch.manual_seed(0)
    layer = case.layer_cls.from_dense(case.make_dense(), case.rank, **case.options).eval()
    model = nn.Sequential(layer)
    quantized = copy.deepcopy(model)
    report = quantize_(quantized, mode)
    return model, quantized, report


@pytest.mark.parametrize("case", MODULE_CASES, ids=str)
def test_int8_weight_layers_stay_within_the_stated_bound_and_store_int8(case):
    model, quantized, report = _quantized_pair(case, "int8_weight")
    x = case.input()
    with torch.no_grad():
        assert _relative(quantized(x), model(x)) <= WEIGHT_ONLY_MAX_RELATIVE_ERROR
    # Storage: every factor is int8 plus one float32 scale per row, or stays float
    # where that would not be smaller; the bias stays float32.
    expected = 0
    for p in model[0].parameters():
        smaller = p.dim() >= 2 and p.numel() + 4 * p.shape[0] < 4 * p.numel()
        expected += p.numel() + 4 * p.shape[0] if smaller else 4 * p.numel()
    (row,) = report.layers
    assert (row.mode, row.float_bytes, row.int8_bytes) == ("int8_weight", 4 * sum(
        p.numel() for p in model[0].parameters()), expected)  # fmt: skip
    assert not any(p.requires_grad for p in quantized.parameters())


@pytest.mark.parametrize("case", [c for c in MODULE_CASES if c.layer_cls is SVDLinear], ids=str)
def test_int8_dynamic_svd_linear_stays_within_the_stated_bound(case):
    model, quantized, report = _quantized_pair(case, "int8_dynamic")
    assert isinstance(quantized[0], DynamicInt8SVDLinear)
    x = case.input()
    with torch.no_grad():
        assert _relative(quantized(x), model(x)) <= DYNAMIC_MAX_RELATIVE_ERROR
    layer = model[0]
    factors = layer.input_factor.numel() + layer.output_factor.numel()
    bias = 0 if layer.bias is None else 4 * layer.out_features
    assert report.layers[0].int8_bytes == factors + 4 * (layer.rank + layer.out_features) + bias


def _converted_mlp(seed=0):
    from factorized_layers import TuckerLinear

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(),
                          nn.Linear(48, 10)).eval()  # fmt: skip
    factorize_(model, rank=0.5, layers={nn.Linear: SVDLinear}, progress=False,
               filter_fn=lambda m, name: name != "2")  # fmt: skip
    model[2] = TuckerLinear.from_dense(model[2], 0.5).eval()
    return model


def test_dynamic_mode_falls_back_to_weight_only_with_a_reason():
    model = _converted_mlp()
    report = quantize_(model, "int8_dynamic")
    modes = {row.name: (row.mode, row.reason) for row in report.layers}
    assert modes["0"] == ("int8_dynamic", "") and modes["4"] == ("int8_dynamic", "")
    assert modes["2"][0] == "int8_weight" and "TuckerLinear has no int8 GEMM" in modes["2"][1]
    assert "TuckerLinear has no int8 GEMM" in str(report)
    assert quantize_(model, "int8_dynamic").layers == ()  # idempotent


def test_filter_fn_and_dense_layers_are_respected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    factorize_(model, rank=8, filter_fn=lambda m, name: name == "0", progress=False)
    report = quantize_(model, filter_fn=lambda m, name: name != "0")
    assert report.layers == () and isinstance(model[2], nn.Linear)
    assert model[2].weight.dtype == torch.float32


def test_tied_factors_are_left_in_float_with_a_reason():
    from factorized_layers import SVDEmbedding

    torch.manual_seed(0)
    embedding = SVDEmbedding.from_dense(nn.Embedding(50, 16), 4)
    model = nn.ModuleDict({"embed": embedding, "head": embedding.tied_linear()})
    report = quantize_(model)
    assert report.layers == ()
    assert sorted(name for name, _ in report.skipped) == ["embed", "head"]
    assert model["head"].input_factor is model["embed"].column_factor or any(
        "tied" in reason for _, reason in report.skipped
    )


def test_quantize_refuses_bad_arguments_and_changes_nothing_on_nan():
    model = _converted_mlp()
    with pytest.raises(ValueError, match=r"mode must be one of \('int8_weight', 'int8_dynamic'\)"):
        quantize_(model, "int4")
    with pytest.raises(TypeError, match="expects an nn.Module, got str"):
        quantize_("model")
    with torch.no_grad():
        model[4].input_factor[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer '4': factor 'input_factor' holds NaN or Inf"):
        quantize_(model, "int8_dynamic")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(
        torch.equal(
            before[k],
            after[k],
        )
        or k == "4.input_factor"
        for k in before
    )
    assert isinstance(model[0], SVDLinear)


@pytest.mark.parametrize("mode", ["int8_weight", "int8_dynamic"])
def test_quantized_state_dict_loads_into_a_model_quantized_the_same_way(mode):
    model = _converted_mlp(seed=0)
    quantize_(model, mode)
    fresh = _converted_mlp(seed=1)
    quantize_(fresh, mode)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("mode", ["int8_weight", "int8_dynamic"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_quantized_models_round_trip_through_save_factorized(mode, suffix, tmp_path):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="needs safetensors")
    model = _converted_mlp()
    quantize_(model, mode)
    path = tmp_path / f"model{suffix}"
    save_factorized(model, path)
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(),
                          nn.Linear(48, 10)).eval()  # fmt: skip
    loaded = load_factorized(dense, path)
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in model]
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_plan_with_an_unknown_quantization_is_refused(tmp_path):
    import json

    model = _converted_mlp()
    quantize_(model)
    path = tmp_path / "model.pt"
    save_factorized(model, path)
    payload = torch.load(path, weights_only=True)
    plan = json.loads(payload["plan"])
    plan["layers"][0]["quantization"] = "int3"
    payload["plan"] = json.dumps(plan)
    torch.save(payload, path)
    dense = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(),
                          nn.Linear(48, 10))  # fmt: skip
    with pytest.raises(ValueError, match="quantization must be one of .* got 'int3'"):
        load_factorized(dense, path)
    assert all(isinstance(m, (nn.Linear, nn.ReLU)) for m in dense)


@pytest.mark.parametrize("mode", ["int8_weight", "int8_dynamic"])
def test_quantized_models_export_and_reload(mode, tmp_path):
    model = _converted_mlp()
    quantize_(model, mode)
    program = export_program(model, torch.randn(1, 64))
    torch.export.save(program, tmp_path / "q.pt2")
    reloaded = torch.export.load(tmp_path / "q.pt2").module()
    for size in (1, 9):
        x = torch.randn(size, 64)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), model(x))


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the export extra (onnx, onnxscript, onnxruntime)",
)
@pytest.mark.parametrize("mode", ["int8_weight", "int8_dynamic"])
def test_quantized_models_run_in_onnx_runtime_with_int8_weights_in_the_file(mode, tmp_path):
    import onnx

    model = _converted_mlp()
    fp32 = export_onnx(model, torch.randn(3, 64), tmp_path / "fp32.onnx", repeats=2)
    quantize_(model, mode)
    result = export_onnx(model, torch.randn(3, 64), tmp_path / "int8.onnx", repeats=2)
    assert max(result.max_relative_error.values()) <= 1e-4

    def weight_bytes(path):
        return sum(len(t.raw_data) for t in onnx.load(path).graph.initializer)

    initializers = onnx.load(tmp_path / "int8.onnx").graph.initializer
    assert any(t.data_type == onnx.TensorProto.INT8 for t in initializers)
    assert weight_bytes(tmp_path / "int8.onnx") < 0.4 * weight_bytes(tmp_path / "fp32.onnx")
    assert fp32.file_bytes > 0
    if mode == "int8_dynamic":
        assert result.op_counts["MatMulInteger"] == 4
