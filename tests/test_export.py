"""torch.export and ONNX Runtime: every layer class, a converted CNN and a transformer.

The oracle is the eager module itself: an exported program (reloaded from disk) and
an ONNX Runtime session built once must reproduce it at batch (and sequence) sizes
other than the example's.
"""

import importlib.util

import pytest
import torch
import torch.nn as nn

from factorized_layers import factorize_
from factorized_layers.contract import shape_free_schedule
from factorized_layers.export import export_onnx, export_program

from .module_db import MODULE_CASES

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the export extra (onnx, onnxscript, onnxruntime)",
)


def _batched(case) -> bool:
    """Whether the case's input has a batch dimension in front."""
    dense = case.make_dense()
    if isinstance(dense, nn.modules.conv._ConvNd):
        return len(case.input_shape) == dense.weight.dim()
    return len(case.input_shape) >= 2


def _with_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    return x[torch.arange(size) % x.shape[0]]


def _layer(case):
    torch.manual_seed(0)
    return case.layer_cls.from_dense(case.make_dense(), case.rank, **case.options).eval()


@pytest.mark.parametrize("case", MODULE_CASES, ids=str)
def test_every_layer_exports_saves_and_reloads_with_dynamic_batch(case, tmp_path):
    layer = _layer(case)
    x = case.input()
    batched = _batched(case)
    program = export_program(layer, _with_batch(x, 1) if batched else x,
                             dynamic_dims={0: "batch"} if batched else {})  # fmt: skip
    torch.export.save(program, tmp_path / "layer.pt2")
    reloaded = torch.export.load(tmp_path / "layer.pt2").module()
    for size in (1, 5, 64) if batched else (None,):
        probe = x if size is None else _with_batch(case.input(), size)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(probe), layer(probe))


class _ShapeFreeProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(shape_free_schedule())
        return x * 2


def test_kernels_choose_shape_free_schedules_only_while_exporting():
    probe = _ShapeFreeProbe()
    probe(torch.ones(2))
    export_program(probe, torch.ones(3, 2))
    assert probe.seen[0] is False and all(probe.seen[1:])


def test_tucker_export_serves_large_batches_the_example_never_saw():
    from factorized_layers import TuckerLinear

    torch.manual_seed(0)
    layer = TuckerLinear.from_dense(nn.Linear(96, 64), rank=0.5).eval()
    program = export_program(layer, torch.randn(2, 96)).module()
    for size in (1, 3, 4096):
        x = torch.randn(size, 96)
        with torch.no_grad():
            torch.testing.assert_close(program(x), layer(x), rtol=1e-4, atol=1e-5)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="reflect")
        self.pointwise = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.pointwise(x))
        return self.head(x.mean(dim=(2, 3)))


def _converted_cnn():
    from factorized_layers import CPConv2d, SVDConv2d, SVDLinear, TuckerConv2d

    torch.manual_seed(0)
    model = _ConvNet().eval()
    layers = {"conv1": CPConv2d, "conv2": TuckerConv2d, "pointwise": SVDConv2d, "head": SVDLinear}
    for name, cls in layers.items():
        options = {"seed": 0} if cls is CPConv2d else {}
        setattr(model, name, cls.from_dense(getattr(model, name), 0.5, **options).eval())
    return model


def test_converted_cnn_exports_with_dynamic_batch_and_image_size(tmp_path):
    model = _converted_cnn()
    program = export_program(model, torch.randn(2, 3, 16, 16),
                             dynamic_dims={0: "batch", 2: "height", 3: "width"})  # fmt: skip
    torch.export.save(program, tmp_path / "cnn.pt2")
    reloaded = torch.export.load(tmp_path / "cnn.pt2").module()
    for shape in ((1, 3, 16, 16), (7, 3, 12, 20)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), model(x))


def _converted_bert():
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    factorize_(model, rank=0.5, progress=False)
    return model


def _tokens(batch: int, sequence: int):
    ids = torch.randint(0, 100, (batch, sequence))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_converted_transformer_exports_with_dynamic_batch_and_sequence(tmp_path):
    model = _converted_bert()
    program = export_program(model, _tokens(1, 9), dynamic_dims={0: "batch", 1: "sequence"})
    torch.export.save(program, tmp_path / "bert.pt2")
    reloaded = torch.export.load(tmp_path / "bert.pt2").module()
    for batch, sequence in ((1, 1), (3, 5), (7, 17)):
        tokens = _tokens(batch, sequence)
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(**tokens).last_hidden_state, model(**tokens).last_hidden_state
            )


def test_export_program_refuses_bad_arguments():
    layer = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        export_program(layer, 3.0)
    with pytest.raises(ValueError, match=r"dimension indices >= 0, got -1"):
        export_program(layer, torch.randn(2, 4), dynamic_dims={-1: "batch"})
    with pytest.raises(ValueError, match="must be identifiers, got 'a b'"):
        export_program(layer, torch.randn(2, 4), dynamic_dims={0: "a b"})
    with pytest.raises(TypeError, match="dynamic_dims must map"):
        export_program(layer, torch.randn(2, 4), dynamic_dims=[0])


FIRST_CASE_PER_CLASS = tuple({case.layer_cls: case for case in reversed(MODULE_CASES)}.values())
"""One case per layer class (its first): an ONNX export costs about a second."""


@needs_onnx
@pytest.mark.parametrize("case", FIRST_CASE_PER_CLASS, ids=str)
def test_every_layer_class_matches_in_onnx_runtime_at_batch_1_and_7(case, tmp_path):
    layer = _layer(case)
    batched = _batched(case)
    result = export_onnx(layer, case.input(), tmp_path / "layer.onnx",
                         dynamic_dims={0: "batch"} if batched else {}, repeats=2)  # fmt: skip
    assert "Einsum" not in result.op_counts
    assert set(result.max_relative_error) == (
        {"example", "batch=1", "batch=7"} if batched else {"example"}
    )
    assert max(result.max_relative_error.values()) <= 1e-4
    assert result.file_bytes > 0 and result.eager_seconds > 0 and result.onnx_seconds > 0


@needs_onnx
def test_converted_cnn_matches_in_onnx_runtime(tmp_path):
    result = export_onnx(_converted_cnn(), torch.randn(3, 3, 16, 16), tmp_path / "cnn.onnx")
    assert set(result.max_relative_error) == {"example", "batch=1", "batch=7"}
    assert "Einsum" not in result.op_counts and result.op_counts["Conv"] >= 3


@needs_onnx
def test_converted_transformer_matches_in_onnx_runtime(tmp_path):
    result = export_onnx(_converted_bert(), _tokens(2, 9), tmp_path / "bert.onnx",
                         dynamic_dims={0: "batch", 1: "sequence"}, repeats=2)  # fmt: skip
    assert set(result.max_relative_error) == {"example", "batch=1,sequence=1", "batch=7,sequence=7"}
    assert "Einsum" not in result.op_counts


class _ExportsDifferently(nn.Module):
    """A model whose exported graph computes something else than eager PyTorch."""

    def forward(self, x):
        return x + 1 if torch.compiler.is_exporting() else x


@needs_onnx
def test_export_onnx_refuses_a_file_that_disagrees_with_eager(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(RuntimeError, match=r"differs from eager PyTorch at .*rtol=0.0001"):
        export_onnx(_ExportsDifferently(), torch.randn(2, 3), path)
    assert path.exists()


@needs_onnx
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rtol": 0}, "rtol must be a positive number, got 0"),
        ({"repeats": 0}, "repeats must be an integer >= 1, got 0"),
        ({"check_sizes": (1, 0)}, r"check_sizes must be integers >= 1, got \(1, 0\)"),
    ],
)
def test_export_onnx_refuses_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        export_onnx(nn.Linear(3, 2), torch.randn(2, 3), tmp_path / "x.onnx", **kwargs)
