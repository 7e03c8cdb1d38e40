"""Sequential, error-compensating calibration: layers fitted on the compressed model's inputs.

Plain calibration fits every layer to the *dense* model's inputs, but at run time each
layer receives the inputs of the *compressed* model, whose earlier layers already
carry their own errors; on deep models the errors add up. Sequential calibration
(GPTQ-style) converts the layers in execution order. For a layer with weight ``W``
it collects, over the calibration rows, the Gram ``G = X_c^T X_c`` of the inputs
``X_c`` it receives in the partly compressed model, the cross term ``C = X_d^T X_c``
with the dense model's inputs ``X_d``, and ``D = X_d^T X_d``. The exact least-squares
weight for the dense target ``X_d W^T`` is then ``W C G^{-1}`` (the layer *undoes*
part of the upstream error), but that closed form overfits: it is regularised toward
``W`` as ``W_a = (1 - a) W + a W C (G + ridge)^{-1}``, and the layer class fits
``W_a`` under the Gram ``G`` (whitened SVD, whitened Tucker, whitened CP), which for a
low-rank matrix is (with no ridge) the exact optimum of ``||X_d W^T - X_c W'^T||^2 +
(1/a - 1) ||X_c (W - W')^T||^2``. ``a`` and the ridge are chosen per layer among candidates by
the output error on held-out calibration batches, so a layer whose compensation does
not generalise falls back to ``a = 0`` (fit ``W`` on the compressed inputs); the
chosen candidate is then refitted on all batches.

Cost: the model runs once up to the first repeated block; then, on cached block
inputs, each dense block runs once (recording its layers' inputs) and each partly
compressed block a few partial passes (one per group of layers that share an input,
stopped right after that group): a few calibration passes of the whole model in
all, not one per layer. Under ``torch.distributed`` every statistic
is summed over the ranks before each fit, so every rank fits the same factors from all
ranks' data.

Groups of layers are found on the first calibration batch: a layer that batch does
not reach (an expert the router skipped, say) and no later group reaches is converted
without data, with a note in the report.

Memory, for ``T`` calibration rows (tokens) and a layer with ``n`` input features:

- the block inputs of the dense and the compressed path, ``2 T d`` values for a
  hidden size ``d``, kept on ``cache_device`` (the CPU by default);
- the dense inputs of the block being converted, one copy per distinct input tensor
  (``T (3 * 576 + 1536)`` floats per block of SmolLM2); each of the two caches is
  checked against ``max_cache_bytes``;
- per group of layers that read the same input, five float64 ``n x n`` matrices (the
  Gram, cross term and, for the held-out rows, the dense Gram): 94 MiB for
  ``n = 1536``, independent of ``T``; freed once the group is fitted.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .blocks import _block_inputs, _blocks_share_arguments, _Capture, find_blocks
from .calibrate import InputStats, first_tensor, run_batch
from .compensation import PairedStats, _rows_view, compensated_weight, held_out_error, mixing_matrix
from .decompose import whitening_cache
from .sources import source_for

__all__ = ["Sequential", "CacheLimitError", "sequential_convert"]


@dataclasses.dataclass(frozen=True)
class Sequential:
    """Options of sequential calibration (``factorize_(..., sequential=Sequential(...))``).

    Args:
        holdout: Fraction of the calibration batches held out to choose each layer's
            compensation and ridge (every ``1/holdout``-th batch); ``0`` fits on all
            batches with the first candidate of each list.
        compensation: Candidate strengths ``a`` in ``[0, 1]`` of the error
            compensation (``0``: fit the dense weight on the compressed model's inputs;
            ``1``: the least-squares weight that best reproduces the dense outputs).
        ridges: Candidate relative ridges (times the Gram's mean diagonal) of the
            inverse and of the whitening.
        blocks: The repeated blocks to process one after another: the name of an
            ``nn.ModuleList`` (e.g. ``"model.layers"``), ``None`` to pick the
            ``nn.ModuleList`` that holds the most targeted layers, or ``False`` to run
            the whole model for every group of layers (small models). Targeted layers
            outside the blocks are converted after them, with whole-model passes (and
            a copy of the dense model for their targets).
        max_cache_bytes: Cap on the cached block inputs (dense and compressed path).
        cache_device: Where the cached block inputs are kept (default CPU).
        device: Where the decompositions run (e.g. ``"cuda"`` while the model stays on
            the CPU); default: on the weight's device.

    Examples:
        >>> Sequential(holdout=0.25, compensation=(0.0, 1.0))
        Sequential(holdout=0.25, compensation=(0.0, 1.0), ridges=(0.0001, 0.01), blocks=None,
        max_cache_bytes=4294967296, cache_device='cpu', device=None)
    """

    holdout: float = 0.25
    compensation: Tuple[float, ...] = (0.0, 0.5, 1.0)
    ridges: Tuple[float, ...] = (1e-4, 1e-2)
    blocks: str | bool | None = None
    max_cache_bytes: int = 4 * 2**30
    cache_device: str = "cpu"
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.holdout, numbers.Real) or not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be a fraction in [0, 1), got {self.holdout!r}")
        for name, values, low, high in (
            ("compensation", self.compensation, 0.0, 1.0),
            ("ridges", self.ridges, 0.0, math.inf),
        ):
            values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
            if not values or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and low <= v <= high
                for v in values
            ):
                raise ValueError(
                    f"{name} must be one or more numbers in [{low}, {high}], got {values!r}"
                )
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if self.blocks is not None and not isinstance(self.blocks, (str, bool)):
            raise TypeError(
                f"blocks must be a module name, None or False, got {type(self.blocks).__name__}"
            )
        if self.blocks is True:
            object.__setattr__(self, "blocks", None)
        if isinstance(self.max_cache_bytes, bool) or not (
            isinstance(self.max_cache_bytes, int) and self.max_cache_bytes > 0
        ):
            raise ValueError(
                f"max_cache_bytes must be a positive int, got {self.max_cache_bytes!r}"
            )


@dataclasses.dataclass
class FitRecord:
    """How one layer was fitted: the chosen candidate and its held-out errors."""

    strength: float
    ridge: float
    output_error: float | None
    """Held-out relative output error of the chosen fit (``None`` without held-out rows)."""
    output_error_before: float | None
    """Held-out error of the uncompensated fit (``a = 0``), at the chosen ridge when it
    was tried there, else at the first ridge."""
    reached: bool = True
    """False when no calibration batch reached the layer (converted without data)."""


class CacheLimitError(ValueError):
    """The cached activations of sequential calibration would exceed ``max_cache_bytes``.

    Raised before any layer of the unit is swapped in.
    """


def _is_held_out(index: int, holdout: float) -> bool:
    return math.floor((index + 1) * holdout) > math.floor(index * holdout)


@dataclasses.dataclass
class Target:
    """One layer to convert: where it is, what to build, and the report row to fill."""

    name: str
    module: nn.Module
    build: Callable[[nn.Module, InputStats, Dict[str, Any]], nn.Module | None]
    """``build(source, calibration, ridge_options) -> layer`` (``None``: keep it dense)."""
    ridge_options: Callable[[float], Dict[str, Any]]
    record: FitRecord | None = None
    layer: nn.Module | None = None


def _with_weight(module: nn.Module, weight: torch.Tensor, device: torch.device) -> nn.Module:
    """A shallow copy of ``module`` on ``device`` whose weight is ``weight``.

    Its parameters and buffers are new tensors (views where no move is needed), so
    moving the copy never moves the model's own parameters.
    """
    twin = copy.copy(module)
    twin._parameters = {
        name: None if p is None else nn.Parameter(p.detach().to(device), p.requires_grad)
        for name, p in module._parameters.items()
    }
    twin._parameters["weight"] = nn.Parameter(weight.to(device), module.weight.requires_grad)
    twin._buffers = {
        name: None if b is None else b.to(device) for name, b in module._buffers.items()
    }
    return twin


def fit_layer(
    target: Target,
    fit: PairedStats,
    held: PairedStats | None,
    config: Sequential,
    mixings: Dict[Tuple[int, float], torch.Tensor],
) -> nn.Module | None:
    """Choose compensation and ridge on ``held``, refit on all rows; returns the layer.

    The search is coordinate-wise: the compensation strengths in the given order at
    the first ridge, until one does not lower the held-out error, then the other
    ridges at the best strength. ``mixings`` caches
    :func:`mixing_matrix` per statistics object and ridge (layers that read the same
    input share their statistics).
    """
    module = target.module
    weight = module.weight.detach()
    work_device = torch.device(config.device) if config.device is not None else weight.device
    # The dtype the layer's whitened fit computes in, so that the inverse shares its eigh.
    compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32

    moved: Dict[int, torch.Tensor] = {}  # each Gram moved once, so the eigh cache hits

    def build(stats: PairedStats, strength: float, ridge: float) -> nn.Module | None:
        mixing = None
        if strength:
            key = (id(stats), ridge)
            if key not in mixings:
                mixings[key] = mixing_matrix(stats, ridge, compute_dtype)
            mixing = mixings[key]
        source_weight = compensated_weight(weight, stats, strength, ridge, mixing)
        source = _with_weight(module, source_weight.to(dtype=weight.dtype), work_device)
        if id(stats) not in moved:
            moved[id(stats)] = stats.gram.to(work_device)
        layer = target.build(
            source, InputStats(moved[id(stats)], stats.rows), target.ridge_options(ridge)
        )
        return None if layer is None else layer.to(weight.device)

    first_ridge = config.ridges[0]
    if held is None or held.rows == 0:
        strength = config.compensation[0]
        target.record = FitRecord(strength, first_ridge, None, None)
        return build(fit, strength, first_ridge)
    errors: Dict[Tuple[float, float], float] = {}
    rows = _rows_view(weight.to(device=held.gram.device, dtype=torch.float64))
    target_energy = float(((rows @ held.dense_gram) * rows).sum())

    def score(ridge: float, strength: float) -> bool:
        layer = build(fit, strength, ridge)
        if layer is None:
            return False
        with torch.no_grad():
            errors[(ridge, strength)] = held_out_error(
                weight, layer.dense_weight(), held, target_energy
            )
        return True

    best_strength = None
    for strength in config.compensation:
        if not score(first_ridge, strength):
            return None
        if (
            best_strength is not None
            and errors[(first_ridge, strength)] >= errors[(first_ridge, best_strength)]
        ):
            break  # the held-out error stopped falling along the candidates
        best_strength = strength
    for ridge in config.ridges[1:]:
        score(ridge, best_strength)
    ridge, strength = min(errors, key=errors.get)
    before = errors.get((ridge, 0.0), errors.get((first_ridge, 0.0)))
    target.record = FitRecord(strength, ridge, errors[(ridge, strength)], before)
    merged = fit + held
    layer = build(merged, strength, ridge)
    for key in [key for key in mixings if key[0] == id(merged)]:
        del mixings[key]
    moved.pop(id(merged), None)
    return layer


def _convert_unreached(targets: List[Target], swap: Callable[[nn.Module, nn.Module], None]):
    """Layers no calibration batch reaches: converted without data (plain fit)."""
    for target in targets:
        layer = target.build(target.module, None, {})
        target.record = FitRecord(0.0, 0.0, None, None, reached=False)
        if layer is not None:
            target.layer = layer
            swap(target.module, layer)


def sequential_convert(
    model: nn.Module,
    batches: Sequence[Any],
    targets: List[Target],
    config: Sequential,
    swap: Callable[[nn.Module, nn.Module], None],
) -> float | None:
    """Fit and swap every target in execution order on the partly compressed model.

    ``swap(old, new)`` installs ``new`` in place of ``old`` in the model. Returns the
    relative error of the final hidden state (last block's output, or the model's
    output without blocks) on the held-out batches, or ``None`` without any.
    """
    if not targets:
        return None
    with whitening_cache():
        return _sequential_convert(model, batches, targets, config, swap)


def _sequential_convert(model, batches, targets, config, swap) -> float | None:
    names = [t.name for t in targets]
    block_names = find_blocks(model, names, config.blocks)
    modules = dict(model.named_modules())
    if block_names and not _blocks_share_arguments(
        model, [modules[n] for n in block_names], batches[0]
    ):
        if isinstance(config.blocks, str):
            raise ValueError(
                f"the blocks of {config.blocks!r} are not all called with the same arguments "
                "(besides the hidden state), so they cannot be run on cached inputs; use "
                "Sequential(blocks=False)"
            )
        block_names = []  # e.g. per-layer masks or position biases: whole-model passes
    by_name = {t.name: t for t in targets}
    held = [_is_held_out(i, config.holdout) for i in range(len(batches))]
    if not any(held) or all(held):
        held = [False] * len(batches)
    in_blocks = {block: [n for n in names if n.startswith(block + ".")] for block in block_names}
    outside = [n for n in names if not any(n in group for group in in_blocks.values())]
    final_error: float | None = None
    if block_names:
        calls, dense_hidden = _block_inputs(
            model, modules[block_names[0]], batches, config.cache_device
        )
        _check_cache(dense_hidden, config)
        compressed_hidden = [h.clone() for h in dense_hidden]
        dense_twin_of_rest = copy.deepcopy(model) if outside else None
        for block_name in block_names:
            block = modules[block_name]
            twin = copy.deepcopy(block)
            unit_targets = [by_name[n] for n in in_blocks[block_name]]

            def run_compressed(module: nn.Module, i: int) -> torch.Tensor:
                return calls[i](module, compressed_hidden[i])

            def run_dense(module: nn.Module, i: int) -> torch.Tensor:
                return calls[i](module, dense_hidden[i])

            dense_hidden[:] = _convert_unit(
                block,
                twin,
                run_compressed,
                run_dense,
                unit_targets,
                held,
                config,
                swap,
                keep_outputs=[True] * len(batches),
            )
            with torch.no_grad():
                for i in range(len(batches)):
                    compressed_hidden[i] = run_compressed(block, i).to(config.cache_device)
            del twin
        final_error = _relative_error(
            [d for d, h in zip(dense_hidden, held) if h],
            [c for c, h in zip(compressed_hidden, held) if h],
        )
        if outside:
            final_error = _whole_model(
                model,
                dense_twin_of_rest,
                batches,
                [by_name[n] for n in outside],
                held,
                config,
                swap,
            )
    else:
        final_error = _whole_model(
            model, copy.deepcopy(model), batches, targets, held, config, swap
        )
    return final_error


def _whole_model(model, twin, batches, targets, held, config, swap) -> float | None:
    def run(module: nn.Module, i: int) -> Any:
        return run_batch(module, batches[i], i)

    outputs = _convert_unit(model, twin, run, run, targets, held, config, swap, keep_outputs=held)
    if not any(held):
        return None
    with torch.no_grad():
        compressed = [first_tensor(run(model, i)) for i, h in enumerate(held) if h]
    return _relative_error([o for o, h in zip(outputs, held) if h], compressed)


def _relative_error(dense: List[torch.Tensor], compressed: List[torch.Tensor]) -> float | None:
    if not dense:
        return None
    numerator = sum(
        float((c.double() - d.double()).square().sum()) for d, c in zip(dense, compressed)
    )
    denominator = sum(float(d.double().square().sum()) for d in dense)
    return math.sqrt(numerator / max(denominator, 1e-300))


def _check_cache(hidden: List[torch.Tensor], config: Sequential) -> None:
    needed = 2 * sum(h.numel() * h.element_size() for h in hidden)
    if needed > config.max_cache_bytes:
        raise CacheLimitError(
            f"sequential calibration would cache {needed:,} bytes of block inputs (dense and "
            f"compressed path), above max_cache_bytes={config.max_cache_bytes:,}: give fewer "
            "calibration tokens, raise Sequential(max_cache_bytes=...) or pass sequential=False"
        )


def _convert_unit(
    unit: nn.Module,
    twin: nn.Module,
    run_compressed: Callable[[nn.Module, int], Any],
    run_dense: Callable[[nn.Module, int], Any],
    targets: List[Target],
    held: List[bool],
    config: Sequential,
    swap: Callable[[nn.Module, nn.Module], None],
    keep_outputs: Sequence[bool],
) -> List[torch.Tensor | None]:
    """Convert ``targets`` inside ``unit``, group by group, in execution order.

    The dense twin runs once: it records every target's dense inputs (kept on the
    cache device) and returns its outputs for the batches in ``keep_outputs``. Then,
    per group of layers that read the same tensor, the partly compressed unit runs up
    to that group, the group is fitted and swapped in.
    """
    unit_names = {id(m): n for n, m in unit.named_modules()}
    twin_modules = dict(twin.named_modules())
    relative = {t.name: unit_names[id(t.module)] for t in targets}
    adapters = {t.name: source_for(t.module) for t in targets}
    dense_inputs: List[Dict[str, torch.Tensor]] = []
    dense_outputs: List[torch.Tensor | None] = []
    cached = 0
    twin_targets = {t.name: twin_modules[relative[t.name]] for t in targets}
    with torch.no_grad(), _Capture(twin_targets, adapters) as dense:
        for i in range(len(held)):
            dense.inputs, dense.raw = {}, {}
            output = run_dense(twin, i)
            dense_outputs.append(
                first_tensor(output).detach().to(config.cache_device) if keep_outputs[i] else None
            )
            stored: Dict[int, torch.Tensor] = {}
            batch_inputs = {}
            for name, value in dense.inputs.items():
                key = id(dense.raw[name])
                if key not in stored:
                    # A copy: the model may later change the tensor in place.
                    stored[key] = value.detach().to(config.cache_device, copy=True)
                    cached += value.numel() * value.element_size()
                batch_inputs[name] = stored[key]
            dense_inputs.append(batch_inputs)
            if cached > config.max_cache_bytes:
                raise CacheLimitError(
                    f"sequential calibration would cache more than {config.max_cache_bytes:,} "
                    "bytes of dense layer inputs for one unit (a block, or the whole model "
                    "without blocks): give fewer calibration tokens, raise "
                    "Sequential(max_cache_bytes=...) or pass sequential=False"
                )
    pending = {t.name: t for t in targets}
    while pending:
        live = {name: t.module for name, t in pending.items()}
        group: List[str] = []
        stats: Dict[str, Tuple[PairedStats, PairedStats]] = {}
        with torch.no_grad(), _Capture(live, adapters) as compressed:
            for i in range(len(held)):
                compressed.inputs, compressed.raw = {}, {}
                if i == 0:
                    compressed.discover = True
                    compressed.run(lambda: run_compressed(unit, 0))
                    compressed.discover = False
                    group = list(compressed.order)
                    if not group:
                        break
                    compressed.stop_after = set(group)
                else:
                    compressed.run(lambda i=i: run_compressed(unit, i))
                first = group[0]
                for name in group:
                    if name not in dense_inputs[i] and name not in compressed.inputs:
                        continue  # not reached by this batch (e.g. an unrouted expert)
                    if name not in dense_inputs[i] or name not in compressed.inputs:
                        raise ValueError(
                            f"{name} was reached by calibration batch {i} in only one of the "
                            "dense and the compressed model"
                        )
                    shared = (
                        name != first
                        and compressed.raw[name] is compressed.raw[first]
                        and dense_inputs[i][name] is dense_inputs[i][first]
                    )
                    if name not in stats:
                        if shared:
                            stats[name] = stats[first]
                        else:
                            features = compressed.inputs[name].shape[-1]
                            device = compressed.inputs[name].device
                            stats[name] = (
                                PairedStats.zeros(features, device, dense_gram=False),
                                PairedStats.zeros(features, device, dense_gram=True),
                            )
                    if stats[name] is not stats[first] or name == first:
                        stats[name][1 if held[i] else 0].add(
                            dense_inputs[i][name], compressed.inputs[name]
                        )
        if not group:
            _convert_unreached(list(pending.values()), swap)
            break
        reduced = set()
        mixings: Dict[Tuple[int, float], torch.Tensor] = {}
        for name in group:
            fit, held_stats = stats[name]
            if id(fit) not in reduced:
                fit.all_reduce()
                held_stats.all_reduce()
                reduced.add(id(fit))
            target = pending.pop(name)
            # After the all-reduce, every rank sees the same held-out row count.
            layer = fit_layer(target, fit, held_stats, config, mixings)
            if layer is not None:
                target.layer = layer
                swap(target.module, layer)
        for i in range(len(held)):
            for name in group:
                dense_inputs[i].pop(name, None)
    return dense_outputs
