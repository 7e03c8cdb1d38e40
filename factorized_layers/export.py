"""Deploy converted models: ``torch.export`` with dynamic sizes, and ONNX Runtime.

Factorized layers export as plain ``mm``/``linear``/``conv`` nodes: while
``torch.export`` traces, every kernel picks its schedule without looking at the
input's sizes (:func:`~factorized_layers.contract.shape_free_schedule`), so one
exported program serves every batch (and sequence, and image) size.

:func:`export_program` wraps :func:`torch.export.export` with the dynamic dimensions
named once for all inputs; :func:`export_onnx` writes an ONNX file with the dynamo
exporter, checks ONNX Runtime against eager PyTorch at several sizes of the dynamic
dimensions, and times both. Models quantized by :func:`~factorized_layers.quantize.quantize_`
export too: weight-only int8 factors stay int8 in the file, and dynamic int8 products
become ``MatMulInteger`` nodes. ONNX needs the optional packages ``onnx``, ``onnxscript``
and ``onnxruntime`` (``pip install factorized_layers[export]``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import statistics
import time
from collections import Counter
from typing import Any, Callable, Dict, Mapping, NamedTuple, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = ["OnnxExport", "export_onnx", "export_program"]

Inputs = Tuple[Tuple[Any, ...], Dict[str, Any]]


def _split_inputs(example_inputs: Any) -> Inputs:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional inputs or a dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


def _check_dynamic_dims(dynamic_dims: Mapping[int, str]) -> Dict[int, str]:
    if not isinstance(dynamic_dims, Mapping):
        raise TypeError(
            "dynamic_dims must map a dimension index to a name, e.g. {0: 'batch', 1: 'sequence'}, "
            f"got {type(dynamic_dims).__name__}"
        )
    for dim, name in dynamic_dims.items():
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ValueError(f"dynamic_dims keys must be dimension indices >= 0, got {dim!r}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"dynamic_dims names must be identifiers, got {name!r} for dim {dim}")
    return dict(dynamic_dims)


def _resized(value: Any, dynamic_dims: Mapping[int, str], sizes: Mapping[str, int]) -> Any:
    """Every tensor input with its dynamic dimensions cycled (or cut) to ``sizes``."""

    def resize(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        for dim, name in dynamic_dims.items():
            if dim < t.dim() and name in sizes:
                index = torch.arange(sizes[name], device=t.device) % t.shape[dim]
                t = t.index_select(dim, index)
        return t

    return pytree.tree_map(resize, value)


def _dynamic_shapes(args, kwargs, dynamic_dims: Mapping[int, str], forward: Callable):
    """``dynamic_shapes`` for :func:`torch.export.export`: the named dims of every tensor."""

    def spec(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return None
        return {d: torch.export.Dim.DYNAMIC for d in dynamic_dims if d < t.dim()} or None

    names = list(inspect.signature(forward).parameters)
    shapes = {name: pytree.tree_map(spec, arg) for name, arg in zip(names, args)}
    shapes.update({name: pytree.tree_map(spec, value) for name, value in kwargs.items()})
    return shapes


def _traceable(args, kwargs, dynamic_dims: Mapping[int, str]) -> Inputs:
    """The example with every dynamic dimension of size 1 grown to 2.

    ``torch.export`` specialises a dimension whose example size is 0 or 1, so a
    batch-1 example would pin the program to batch 1. Values are repeated, which
    does not change the traced graph.
    """
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    sizes: Dict[str, int] = {}
    for t in leaves:
        for dim, name in dynamic_dims.items():
            if dim < t.dim():
                sizes[name] = max(sizes.get(name, 0), t.shape[dim])
    grow = {name: 2 for name, size in sizes.items() if size == 1}
    if not grow:
        return args, kwargs
    return _resized(args, dynamic_dims, grow), _resized(kwargs, dynamic_dims, grow)


class _Trace(NamedTuple):
    """The example as given, and as traced (size-1 dynamic dims grown to 2)."""

    dims: Dict[int, str]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    traced_args: Tuple[Any, ...]
    traced_kwargs: Dict[str, Any]
    shapes: Dict[str, Any] | None


def _trace_inputs(model: nn.Module, example_inputs: Any, dynamic_dims) -> _Trace:
    """Checked dims (default ``{0: "batch"}``), the split example and its tracing form."""
    dims = _check_dynamic_dims({0: "batch"} if dynamic_dims is None else dynamic_dims)
    args, kwargs = _split_inputs(example_inputs)
    traced_args, traced_kwargs = _traceable(args, kwargs, dims)
    shapes = _dynamic_shapes(traced_args, traced_kwargs, dims, model.forward) if dims else None
    return _Trace(dims, args, kwargs, traced_args, traced_kwargs, shapes)


def export_program(
    model: nn.Module,
    example_inputs: Any,
    *,
    dynamic_dims: Mapping[int, str] | None = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a (converted) model with named dynamic dimensions.

    Args:
        model: Any module; factorized layers export as plain matrix products and
            convolutions valid at every size of the dynamic dimensions.
        example_inputs: A tensor, a tuple of positional inputs, or a dict of keyword
            inputs (e.g. ``{"input_ids": ids, "attention_mask": mask}``).
        dynamic_dims: Dimension index -> name, applied to every tensor input that has
            that dimension (``{0: "batch", 1: "sequence"}`` for token inputs); names
            label the sizes :func:`export_onnx` checks. Ranges and equalities between
            inputs are inferred from the model (``torch.export.Dim.DYNAMIC``), e.g. a
            sequence up to ``max_position_embeddings``. Default ``{0: "batch"}``;
            ``{}`` exports static sizes.
            An example size of 1 in a dynamic dimension is repeated to 2 for tracing
            (``torch.export`` would otherwise specialise it).
        strict: Passed to :func:`torch.export.export`.

    Returns:
        The :class:`torch.export.ExportedProgram`; save it with
        :func:`torch.export.save`.

    Raises:
        TypeError, ValueError: For malformed ``example_inputs`` or ``dynamic_dims``.

    Examples:
        >>> from factorized_layers import SVDLinear
        >>> layer = SVDLinear.from_dense(nn.Linear(16, 8), rank=4)
        >>> program = export_program(layer, torch.randn(1, 16))
        >>> program.module()(torch.randn(5, 16)).shape
        torch.Size([5, 8])
    """
    trace = _trace_inputs(model, example_inputs, dynamic_dims)
    return torch.export.export(
        model, trace.traced_args, trace.traced_kwargs, dynamic_shapes=trace.shapes, strict=strict
    )


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and measured.

    Attributes:
        path: The ONNX file.
        file_bytes: Its size (weights included).
        op_counts: Node count per ONNX operator type (``"Einsum"`` absent means none).
        max_relative_error: Per checked size (``"batch=1"``, ...): the largest
            ``max|onnx - eager| / max|eager|`` over the model's outputs.
        eager_seconds: Median eager PyTorch time of one forward at the example inputs.
        onnx_seconds: Median ONNX Runtime time of the same call.
    """

    path: str
    file_bytes: int
    op_counts: Dict[str, int]
    max_relative_error: Dict[str, float]
    eager_seconds: float
    onnx_seconds: float

    @property
    def speedup(self) -> float:
        """Eager time over ONNX Runtime time (above 1: ONNX Runtime is faster)."""
        return self.eager_seconds / self.onnx_seconds


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as error:
        raise ImportError(
            f"export_onnx needs onnx, onnxscript and onnxruntime ({error}); install them with "
            "`pip install factorized_layers[export]`"
        ) from None
    return onnx, onnxruntime


def _int8_translations() -> Dict[Any, Callable]:
    """ONNX for ``aten._int_mm`` (int8 x int8 -> int32): ``MatMulInteger``.

    The int8 activations are shifted to uint8 with zero point 128 (the same integer
    products): ONNX Runtime's fast integer GEMMs take unsigned activations, and its
    signed-by-signed path measured several times slower.
    """
    from onnx import TensorProto, helper
    from onnxscript import opset18 as op

    zero_point = helper.make_tensor("zero_point", TensorProto.UINT8, [], [128])

    def int_mm(input, mat2):
        wide = op.Cast(input, to=TensorProto.INT32)
        offset = op.CastLike(op.Constant(value_int=128), wide)
        shifted = op.Cast(op.Add(wide, offset), to=TensorProto.UINT8)
        return op.MatMulInteger(shifted, mat2, op.Constant(value=zero_point))

    return {torch.ops.aten._int_mm.default: int_mm}


def _median_seconds(run: Callable[[], Any], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _feeds(session, args, kwargs) -> Dict[str, Any]:
    """ONNX Runtime inputs: keyword inputs by name, positional ones in order."""
    names = [i.name for i in session.get_inputs()]
    positional = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    feeds = {}
    for name, value in kwargs.items():
        leaves = [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        if name in names and len(leaves) == 1:
            feeds[name] = leaves[0]
    rest = [n for n in names if n not in feeds]
    feeds.update(zip(rest, positional))
    return {name: t.detach().cpu().numpy() for name, t in feeds.items() if name in names}


def _relative_error(expected: Any, actual: Sequence[Any]) -> float:
    reference = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    if len(reference) != len(actual):
        raise RuntimeError(
            f"ONNX Runtime returned {len(actual)} outputs, eager PyTorch {len(reference)}"
        )
    worst = 0.0
    for want, got in zip(reference, actual):
        want = want.detach().cpu().double()
        got = torch.as_tensor(got).double()
        if want.shape != got.shape:
            raise RuntimeError(
                f"ONNX Runtime output of shape {tuple(got.shape)} where eager PyTorch gives "
                f"{tuple(want.shape)}"
            )
        scale = want.abs().max().item() if want.numel() else 0.0
        error = (got - want).abs().max().item() if want.numel() else 0.0
        worst = max(worst, error / scale if scale > 0 else error)
    return worst


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamic_dims: Mapping[int, str] | None = None,
    check_sizes: Sequence[int] = (1, 7),
    rtol: float = 1e-4,
    repeats: int = 20,
    opset_version: int | None = None,
) -> OnnxExport:
    """Export to ONNX, check ONNX Runtime against eager PyTorch, and time both.

    The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) writes ``path``
    with the dimensions of ``dynamic_dims`` dynamic; ONNX Runtime (CPU, all graph
    optimisations, as many threads as ``torch.get_num_threads()``) then runs the file
    with the example inputs and with every dynamic dimension resized to each of
    ``check_sizes`` (inputs repeated or cut), and its outputs must match eager
    PyTorch's within ``rtol`` (``max|onnx - eager| / max|eager|`` per output).

    Args:
        model: The model, in the mode it is deployed in (call ``.eval()`` first).
        example_inputs: A tensor, a tuple of positional inputs or a dict of keyword
            inputs, on the CPU.
        path: Where to write the ``.onnx`` file (weights inside it).
        dynamic_dims: As in :func:`export_program` (default ``{0: "batch"}``).
        check_sizes: Sizes every dynamic dimension is checked at, besides the example's.
        rtol: Largest accepted relative error (1e-4 suits float32; with int8
            activations, ``quantize_(model, "int8_dynamic")``, float differences of
            1e-7 upstream can move a value across a rounding boundary, one int8 step:
            allow about 1e-2 for deep models).
        repeats: Timed calls per side (the median is reported).
        opset_version: ONNX opset (the exporter's default when ``None``).

    Returns:
        An :class:`OnnxExport` with the file size, the operator counts, the errors
        and the median times.

    Raises:
        ImportError: If onnx, onnxscript or onnxruntime is missing.
        ValueError: For a bad ``rtol``, ``repeats`` or ``check_sizes``.
        RuntimeError: If ONNX Runtime disagrees with eager PyTorch beyond ``rtol``
            (the file is kept for inspection).

    Examples:
        >>> from factorized_layers import SVDLinear
        >>> layer = SVDLinear.from_dense(nn.Linear(16, 8), rank=4).eval()
        >>> result = export_onnx(layer, torch.randn(3, 16), "/tmp/svd.onnx")  # doctest: +SKIP
        >>> result.max_relative_error["batch=7"] < 1e-4  # doctest: +SKIP
        True
    """
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"rtol must be a positive number, got {rtol!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in check_sizes):
        raise ValueError(f"check_sizes must be integers >= 1, got {tuple(check_sizes)!r}")
    onnx, onnxruntime = _onnx_modules()
    trace = _trace_inputs(model, example_inputs, dynamic_dims)
    dynamic_dims, args, kwargs = trace.dims, trace.args, trace.kwargs
    path = os.fspath(path)
    # Folding constants would turn weight-only int8 factors (int8 * scale) back into
    # float32 initializers; ONNX Runtime folds them in memory instead, the file stays int8.
    int8_parameters = any(p.dtype == torch.int8 for p in model.parameters())
    torch.onnx.export(
        model,
        trace.traced_args,
        path,
        kwargs=trace.traced_kwargs,
        dynamo=True,
        dynamic_shapes=trace.shapes,
        opset_version=opset_version,
        external_data=False,
        optimize=not int8_parameters,
        custom_translation_table=_int8_translations(),
        verbose=False,
    )
    graph = onnx.load(path).graph
    op_counts = dict(Counter(node.op_type for node in graph.node))

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run_both(call_args, call_kwargs):
        with torch.no_grad():
            expected = model(*call_args, **call_kwargs)
        return expected, session.run(None, _feeds(session, call_args, call_kwargs))

    errors = {"example": _relative_error(*run_both(args, kwargs))}
    names = sorted(set(dynamic_dims.values()))
    for size in check_sizes if names else ():
        sizes = {name: size for name in names}
        resized = (_resized(args, dynamic_dims, sizes), _resized(kwargs, dynamic_dims, sizes))
        label = ",".join(f"{name}={size}" for name in names)
        errors[label] = _relative_error(*run_both(*resized))
    worst = max(errors, key=errors.get)
    if errors[worst] > rtol:
        raise RuntimeError(
            f"ONNX Runtime differs from eager PyTorch at {worst}: relative error "
            f"{errors[worst]:.2e} > rtol={rtol:g} (file kept at {path})"
        )

    feeds = _feeds(session, args, kwargs)
    with torch.no_grad():
        eager = _median_seconds(lambda: model(*args, **kwargs), repeats)
    onnx_time = _median_seconds(lambda: session.run(None, feeds), repeats)
    return OnnxExport(
        path=path,
        file_bytes=os.path.getsize(path),
        op_counts=op_counts,
        max_relative_error=errors,
        eager_seconds=eager,
        onnx_seconds=onnx_time,
    )
