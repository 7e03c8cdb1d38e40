"""int8 factors for CPU inference: ``quantize_(model, mode)`` on a converted model.

Two modes, both symmetric int8 with one float32 scale per row of each factor (per
output channel of each product), biases kept in float32:

- ``"int8_weight"`` (weight-only): every factor and core of every factorized layer is
  stored as int8 (unless its row scales would make it larger, as for a rank-1 factor)
  through a ``torch.nn.utils.parametrize`` parametrization
  (:class:`Int8Rows`) and dequantized when the layer reads it; the layer's own
  forward runs unchanged in floating point. Any family; a quarter of the factor bytes.
- ``"int8_dynamic"``: layers whose family has an int8 GEMM schedule
  (:meth:`~factorized_layers.layers.FactorizedLayer.dynamic_int8`; today
  :class:`~factorized_layers.SVDLinear`) are replaced by an inference module that also
  quantizes activations per row at run time and multiplies int8 by int8
  (``torch._int_mm``); the other layers get weight-only int8, and the report says so.

Quantized models are for inference: the int8 tensors do not train. They save and
load with ``state_dict`` (quantize a freshly converted model the same way, then
``load_state_dict``), with :func:`~factorized_layers.checkpoint.save_factorized`,
and export with ``torch.export`` (:func:`~factorized_layers.export.export_program`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Callable, List, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .convert.walk import _parents, _swap_all
from .decompose._common import all_finite
from .functional.int8 import dequantize_rows, quantize_rows
from .registry import registered_layers

__all__ = [
    "QUANTIZATION_MODES",
    "Int8Rows",
    "QuantizationReport",
    "QuantizedLayer",
    "apply_quantization",
    "quantization_of",
    "quantize_",
]

QUANTIZATION_MODES = ("int8_weight", "int8_dynamic")


class Int8Rows(nn.Module):
    """Parametrization storing a factor as int8 values and one float32 scale per row.

    Registered with ``parametrize.register_parametrization(layer, name, Int8Rows(dtype),
    unsafe=True)``: :meth:`right_inverse` turns the factor into ``(values, scale)``
    (kept as ``parametrizations.<name>.original0`` / ``original1``, neither
    trainable) and :meth:`forward` returns ``values * scale`` in ``dtype``.

    Args:
        dtype: The dtype the layer computes in (the factor's original dtype).

    Examples:
        >>> layer = nn.Linear(8, 4)
        >>> layer.weight.requires_grad_(False)
        Parameter containing:...
        >>> _ = parametrize.register_parametrization(layer, "weight", Int8Rows(torch.float32),
        ...                                          unsafe=True)
        >>> layer.parametrizations.weight.original0.dtype
        torch.int8
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(values, scale, self.dtype)

    def right_inverse(self, factor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows(factor)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    """One layer :func:`quantize_` changed.

    Attributes:
        name: Fully qualified module name.
        family: The factorized layer's class name.
        mode: ``"int8_weight"`` or ``"int8_dynamic"`` -- what the layer got.
        float_bytes: Bytes of its parameters and buffers before.
        int8_bytes: Bytes after (int8 values, float32 scales and biases).
        reason: Why the layer got less than the requested mode (empty otherwise).
    """

    name: str
    family: str
    mode: str
    float_bytes: int
    int8_bytes: int
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_` did, layer by layer (``str()`` prints a table)."""

    mode: str
    layers: Tuple[QuantizedLayer, ...]
    skipped: Tuple[Tuple[str, str], ...]
    """``(name, reason)`` of factorized layers left in floating point."""

    @property
    def float_bytes(self) -> int:
        return sum(row.float_bytes for row in self.layers)

    @property
    def int8_bytes(self) -> int:
        return sum(row.int8_bytes for row in self.layers)

    def __str__(self) -> str:
        lines = [f"quantize_(mode={self.mode!r}): {len(self.layers)} layers"]
        lines.append(f"{'name':40} {'family':14} {'mode':12} {'float B':>10} {'int8 B':>10}")
        for row in self.layers:
            lines.append(
                f"{row.name:40} {row.family:14} {row.mode:12} {row.float_bytes:>10} "
                f"{row.int8_bytes:>10}" + (f"  ({row.reason})" if row.reason else "")
            )
        for name, reason in self.skipped:
            lines.append(f"{name:40} skipped: {reason}")
        if self.layers:
            ratio = self.int8_bytes / self.float_bytes
            lines.append(f"total {self.float_bytes} -> {self.int8_bytes} bytes ({ratio:.3f})")
        return "\n".join(lines)


def _bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _is_quantized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) and any(
        isinstance(p, Int8Rows) for plist in module.parametrizations.values() for p in plist
    )


def _factor_names(layer: nn.Module) -> List[str]:
    """The layer's own floating parameters with two or more dimensions (not biases)
    whose int8 form (values plus one float32 scale per row) takes fewer bytes."""
    return [
        name
        for name, p in layer.named_parameters(recurse=False)
        if p.is_floating_point()
        and p.dim() >= 2
        and p.numel() + 4 * p.shape[0] < p.numel() * p.element_size()
    ]


def _quantize_weights(layer: nn.Module) -> None:
    """int8 factors through :class:`Int8Rows`; the whole layer is frozen (inference only)."""
    for parameter in layer.parameters(recurse=False):
        parameter.requires_grad_(False)
    for name in _factor_names(layer):
        factor = getattr(layer, name)
        parametrize.register_parametrization(layer, name, Int8Rows(factor.dtype), unsafe=True)


def quantization_of(module: nn.Module) -> Tuple[str | None, type]:
    """``(mode, float class)`` of a module: how it was quantized and what it was.

    ``(None, type(module))`` for anything :func:`quantize_` did not produce. An
    ``int8_dynamic`` module names its float class in a ``float_layer`` class
    attribute (e.g. :class:`~factorized_layers.layers.svd.DynamicInt8SVDLinear`).
    """
    float_layer = getattr(type(module), "float_layer", None)
    if float_layer is not None:
        return "int8_dynamic", float_layer
    if _is_quantized(module):
        return "int8_weight", parametrize.type_before_parametrizations(module)
    return None, type(module)


def apply_quantization(layer: nn.Module, mode: str) -> nn.Module:
    """``layer`` quantized in ``mode`` exactly as :func:`quantize_` would do it.

    Returns the layer itself (``int8_weight``, changed in place) or its int8
    replacement (``int8_dynamic``).

    Raises:
        ValueError: For an unknown mode, a factor with NaN or Inf, or
            ``int8_dynamic`` on a family without an int8 GEMM schedule.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"mode must be one of {QUANTIZATION_MODES}, got {mode!r}")
    if mode == "int8_dynamic":
        replacement = layer.dynamic_int8()
        if replacement is None:
            raise ValueError(f"{type(layer).__name__} has no int8_dynamic form")
        return replacement
    _quantize_weights(layer)
    return layer


def quantize_(
    model: nn.Module,
    mode: str = "int8_weight",
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> QuantizationReport:
    """Store the factors of every factorized layer of ``model`` as int8, in place.

    Like ``torchao.quantization.quantize_``: modifies ``model`` and is idempotent
    (already quantized layers are left as they are). Dense layers are not touched.

    Args:
        model: A converted model (or a factorized layer's parent).
        mode: ``"int8_weight"`` (int8 storage, float compute, every family) or
            ``"int8_dynamic"`` (int8 activations and GEMMs where the family has them,
            weight-only elsewhere). See the module docstring.
        filter_fn: ``filter_fn(module, fqn) -> bool``; only layers it accepts change.

    Returns:
        A :class:`QuantizationReport` (bytes before and after per layer).

    Raises:
        ValueError: For an unknown ``mode``, a factor with NaN or Inf (nothing is
            changed then), or a ``model`` that is itself a factorized layer in
            ``"int8_dynamic"`` mode (its replacement could not be returned).
        TypeError: If ``model`` is not an ``nn.Module``.

    Examples:
        >>> from factorized_layers import factorize_
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        >>> _ = factorize_(model, rank=8)
        >>> report = quantize_(model, "int8_dynamic")
        >>> [row.mode for row in report.layers]
        ['int8_dynamic', 'int8_dynamic']
        >>> model(torch.randn(3, 64)).shape
        torch.Size([3, 32])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"mode must be one of {QUANTIZATION_MODES}, got {mode!r}")
    classes = tuple(registered_layers())
    holders = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    targets: List[Tuple[str, nn.Module]] = []
    skipped: List[Tuple[str, str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, classes) or _is_quantized(module):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if any(holders[id(p)] > 1 for p in module.parameters(recurse=False)):
            skipped.append((name, "shares parameters with another module (tied); left in float"))
            continue
        targets.append((name, module))
    for name, module in targets:
        for factor_name in _factor_names(module):
            if not all_finite(getattr(module, factor_name)):
                raise ValueError(f"layer {name!r}: factor {factor_name!r} holds NaN or Inf")
    if mode == "int8_dynamic" and any(name == "" for name, _ in targets):
        raise ValueError(
            "the model itself is a factorized layer; call layer.dynamic_int8() for its "
            "int8 replacement, or quantize_ its parent"
        )

    rows: List[QuantizedLayer] = []
    swaps: List[Tuple[nn.Module, nn.Module]] = []
    for name, module in targets:
        before = _bytes(module)
        family = type(module).__name__
        replacement = module.dynamic_int8() if mode == "int8_dynamic" else None
        if replacement is not None:
            swaps.append((module, replacement))
            rows.append(QuantizedLayer(name, family, mode, before, _bytes(replacement)))
            continue
        apply_quantization(module, "int8_weight")
        reason = (
            f"{family} has no int8 GEMM schedule; int8 storage, float compute"
            if mode == "int8_dynamic"
            else ""
        )
        rows.append(QuantizedLayer(name, family, "int8_weight", before, _bytes(module), reason))
    _swap_all(swaps, _parents(model))
    return QuantizationReport(mode, tuple(rows), tuple(skipped))
