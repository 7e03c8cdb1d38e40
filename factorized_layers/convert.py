"""Whole-model conversion: ``factorize_`` and ``unfactorize_``, with a report.

``factorize_`` walks a model, picks the layers to convert (types, filters, name
patterns), chooses their ranks (a spec or policy per layer, or a global
:class:`~factorized_layers.ranks.Budget`), replaces them in place with
``layer_cls.from_dense`` and returns a :class:`FactorizationReport`. It knows the layer
classes only through a small registry (:func:`register_layer`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import numbers
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

from .calibrate import InputStats, calibrate
from .decompose import relative_output_error
from .decompose import whitening_cache
from .sequential import CacheLimitError, Sequential, Target, sequential_convert
from .layers import CPConv2d, SVDLinear, TuckerLinear
from .ranks import POLICY_TYPES, Budget, RankProfile, allocate_budget, check_positive, select_rank

__all__ = [
    "FactorizationReport",
    "LayerReport",
    "factorize_",
    "unfactorize_",
    "truncate_",
    "register_layer",
    "registered_layers",
    "default_layers",
]

_SOURCES: Dict[type, Tuple[type, ...]] = {}
"""Registry: factorized layer class -> dense module types it can be built from."""

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def register_layer(layer_cls: type, *source_types: type) -> None:
    """Declare that ``layer_cls.from_dense`` accepts modules of ``source_types``.

    A registered class must provide ``from_dense(module, rank, **options)``,
    ``to_dense()``, ``dense_weight()``, ``flops_per_position()`` and, for rank
    policies and budgets, ``rank_profile(module)``.

    Examples:
        >>> register_layer(SVDLinear, nn.Linear)
    """
    if not source_types:
        raise ValueError(f"register_layer({layer_cls.__name__}) needs at least one source type")
    _SOURCES[layer_cls] = tuple(source_types)


def registered_layers() -> Dict[type, Tuple[type, ...]]:
    """A copy of the registry: factorized layer class -> dense types it replaces.

    Examples:
        >>> registered_layers()[SVDLinear]
        (<class 'torch.nn.modules.linear.Linear'>,)
    """
    return dict(_SOURCES)


register_layer(SVDLinear, nn.Linear)
register_layer(TuckerLinear, nn.Linear)
register_layer(CPConv2d, nn.Conv2d)


def default_layers() -> Dict[type, type]:
    """The default ``layers=`` mapping of :func:`factorize_`.

    ``{nn.Linear: SVDLinear, nn.Conv2d: CPConv2d}``; ``TuckerLinear`` is selectable.
    """
    return {nn.Linear: SVDLinear, nn.Conv2d: CPConv2d}


@dataclasses.dataclass
class LayerReport:
    """One targeted layer in a :class:`FactorizationReport`.

    FLOPs are multiply-accumulates per output position: per token (input row) for
    linear layers, per output pixel for convolutions. Parameters include the bias.
    """

    name: str
    source_type: str
    target_type: str
    shape: Tuple[int, ...]
    rank: Any
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    weight_error: float | None
    skipped: str | None = None
    output_error: float | None = None
    """Relative output error on the calibration data (``None`` without calibration).

    With sequential calibration: on the held-out calibration batches, against the
    dense model's outputs of this layer, with the inputs of the compressed model; for
    a convolution a proxy from channel statistics that treats kernel positions as
    independent."""
    output_error_before: float | None = None
    """Sequential calibration: the held-out output error without error compensation."""
    note: str | None = None


@dataclasses.dataclass
class FactorizationReport:
    """What :func:`factorize_` did: one :class:`LayerReport` per targeted layer.

    ``str(report)`` is a readable table with totals.
    """

    layers: List[LayerReport]
    model_output_error: float | None = None
    """Sequential calibration: relative error of the last block's output (or of the
    model's output without blocks) on the held-out calibration batches."""

    @property
    def replaced(self) -> List[LayerReport]:
        """Rows of the layers that were converted."""
        return [row for row in self.layers if row.skipped is None]

    @property
    def skipped(self) -> List[LayerReport]:
        """Rows of the layers left dense, with the reason."""
        return [row for row in self.layers if row.skipped is not None]

    @property
    def params_before(self) -> int:
        return sum(row.params_before for row in self.layers)

    @property
    def params_after(self) -> int:
        return sum(row.params_after for row in self.layers)

    @property
    def flops_before(self) -> int:
        return sum(row.flops_before for row in self.layers)

    @property
    def flops_after(self) -> int:
        return sum(row.flops_after for row in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __str__(self) -> str:
        calibrated = any(row.output_error is not None for row in self.layers)
        compensated = any(row.output_error_before is not None for row in self.layers)
        header = ("layer", "type", "shape", "rank", "params", "FLOPs/pos", "weight err")
        header += ("output err",) if calibrated else ()
        header += ("uncompensated",) if compensated else ()
        header += ("note",)
        rows = [header]
        for row in self.layers:
            change = (
                f"{row.source_type} -> {row.target_type}"
                if row.skipped is None
                else row.source_type
            )
            cells = (
                row.name,
                change,
                "x".join(str(d) for d in row.shape),
                "-" if row.rank is None else str(row.rank),
                f"{row.params_before:,} -> {row.params_after:,}",
                f"{row.flops_before:,} -> {row.flops_after:,}",
                _fmt(row.weight_error),
            )
            if calibrated:
                cells += (_fmt(row.output_error),)
            if compensated:
                cells += (_fmt(row.output_error_before),)
            rows.append(cells + (row.skipped or row.note or "",))
        ratio = self.params_before / max(self.params_after, 1)
        totals = (
            f"total ({len(self.replaced)} replaced, {len(self.skipped)} skipped)",
            "",
            "",
            "",
            f"{self.params_before:,} -> {self.params_after:,} ({ratio:.2f}x fewer)",
            f"{self.flops_before:,} -> {self.flops_after:,}",
        )
        rows.append(totals + ("",) * (len(header) - len(totals)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, lines[1])
        if self.model_output_error is not None:
            lines.append(
                f"model output error on held-out calibration batches: {self.model_output_error:.4f}"
            )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _dense_flops_per_position(module: nn.Module) -> int:
    weight = module.weight
    if isinstance(module, nn.Linear):
        return weight.shape[0] * weight.shape[1]
    # Convolutions: one output pixel of every output channel.
    return weight.numel()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _matches(fqn: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return fqn == pattern or fqn.endswith("." + pattern)


def _check_patterns(name: str, patterns: Sequence[str] | None) -> Tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} patterns must be strings, got {pattern!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(
                    f"{name} pattern {pattern!r} is not a valid regex: {exc}"
                ) from None
    return patterns


def _check_layers(layers: Mapping[type, type] | None) -> Dict[type, type]:
    mapping = default_layers() if layers is None else dict(layers)
    if not mapping:
        raise ValueError("layers must map at least one dense module type to a layer class")
    for source, target in mapping.items():
        supported = _SOURCES.get(target)
        if supported is None:
            known = ", ".join(sorted(cls.__name__ for cls in _SOURCES))
            raise ValueError(
                f"layers maps {getattr(source, '__name__', source)} to "
                f"{getattr(target, '__name__', target)}, which is not a registered factorized "
                f"layer (registered: {known}; see register_layer)"
            )
        if not (isinstance(source, type) and issubclass(source, supported)):
            raise ValueError(
                f"{target.__name__} cannot be built from {getattr(source, '__name__', source)}; "
                f"it converts {', '.join(t.__name__ for t in supported)}"
            )
    return mapping


def _target_class(module: nn.Module, mapping: Mapping[type, type]) -> type | None:
    exact = mapping.get(type(module))
    if exact is not None:
        return exact
    for source, target in mapping.items():
        if isinstance(module, source):
            return target
    return None


def _meta_twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose parameters live on meta (for free shape checks)."""
    twin = copy.copy(module)
    twin._parameters = {
        name: None
        if p is None
        else nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, p in module._parameters.items()
    }
    return twin


def _progress(items: Sequence[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(items)
    return tqdm(items, desc="factorize_", unit="layer")


def _plain_progress(items: Sequence[Any]) -> Iterator[Any]:
    for i, item in enumerate(items, 1):
        print(f"factorize_ [{i}/{len(items)}] {item[0]}", file=sys.stderr, flush=True)
        yield item


def _parents(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute) that holds it (shared modules have several)."""
    parents: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, attr))
    return parents


def _swap(old: nn.Module, new: nn.Module, parents: List[Tuple[nn.Module, str]]) -> None:
    # Move (not copy) the hook dicts, so that handles returned by register_*_hook on the
    # old module still remove the hooks from the new one.
    for attr in _HOOK_DICTS:
        if attr in old.__dict__:
            setattr(new, attr, getattr(old, attr))
    new._is_full_backward_hook = old._is_full_backward_hook
    for parent, attr in parents:
        setattr(parent, attr, new)


def _collect_targets(
    model: nn.Module,
    mapping: Mapping[type, type],
    filter_fn: Callable[[nn.Module, str], bool] | None,
    include: Tuple[str, ...] | None,
    exclude: Tuple[str, ...] | None,
) -> List[Tuple[str, nn.Module, type]]:
    candidates = [
        (fqn, module, target)
        for fqn, module in model.named_modules()
        if fqn and (target := _target_class(module, mapping)) is not None
    ]
    # Already-factorized layers count as matches, so that a second call with the same
    # patterns is a no-op rather than an error.
    known = [fqn for fqn, _, _ in candidates] + [
        fqn for fqn, module in model.named_modules() if isinstance(module, tuple(_SOURCES))
    ]
    for name, patterns in (("include", include), ("exclude", exclude)):
        if patterns:
            unmatched = [p for p in patterns if not any(_matches(fqn, p) for fqn in known)]
            if unmatched:
                raise ValueError(
                    f"{name} pattern(s) {unmatched} match no layer of a converted type; "
                    f"candidates are {[fqn for fqn, _, _ in candidates][:20]}"
                )
    selected = []
    for fqn, module, target in candidates:
        if include is not None and not any(_matches(fqn, p) for p in include):
            continue
        if exclude is not None and any(_matches(fqn, p) for p in exclude):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        selected.append((fqn, module, target))
    return selected


def factorize_(
    model: nn.Module,
    rank: Any = 0.5,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    layers: Mapping[type, type] | None = None,
    multiple_of: int = 1,
    allow_larger: bool = False,
    progress: bool | None = None,
    calibration: Iterable[Any] | Mapping[str, InputStats] | None = None,
    sequential: bool | Sequential | None = None,
    layer_options: Mapping[type, Mapping[str, Any]] | None = None,
    **options: Any,
) -> FactorizationReport:
    """Replace the dense layers of ``model`` by factorized ones, in place.

    Like ``torchao.quantize_``: the model is modified in place; replaced modules are
    not descended into; a module shared under several names is converted once and
    stays shared; forward/backward hooks, device, dtype and ``training`` are kept;
    calling it again changes nothing that is already factorized.

    Args:
        model: The model; its root must not itself be a converted type (use the layer
            class's ``from_dense`` for a single layer).
        rank: ``int`` rank, ``float`` fraction of each layer's parameters, a per-layer
            policy (``Energy``, ``ErrorBound``, ``EVBMF``), or a global ``Budget``
            that allocates ranks across all targeted layers.
        filter_fn: ``filter_fn(module, fqn) -> bool``; only layers it accepts convert.
        include: Names to convert: exact names, suffixes on a ``.`` boundary
            (``"query"`` matches ``"encoder.layer.0.attention.self.query"``), or
            ``"re:"``-prefixed full regexes. Every pattern must match some layer.
        exclude: Names to leave dense, same syntax; applied after ``include``.
        layers: ``{dense type: factorized class}``; default :func:`default_layers`.
        multiple_of: Only ranks divisible by this (hardware-friendly shapes).
        allow_larger: Convert even layers whose factorization does not save
            parameters (default: leave them dense and report them as skipped).
        progress: Show a progress bar (tqdm if installed, else lines on stderr);
            default: only when there are 20 or more layers to convert.
        calibration: Data-aware conversion: an iterable of batches the model is run
            on (see :func:`factorized_layers.calibrate.calibrate`; it is iterated
            several times, so a one-shot iterator is first read into a list), or the
            ``{name: InputStats}`` it returned. Layer classes whose ``from_dense``
            accepts ``calibration`` then minimise the output error on that data; rank
            policies use output-error spectra; ``Budget`` allocates on the root mean
            square of output and weight error (robust to calibration data unlike the
            data the model will see); the report gives each linear layer's relative
            output error on the data (a convolution's input-channel Gram does not
            determine its output error). With a ``Budget`` whose ``sensitivity`` is
            on, calibration batches also measure each layer's effect on the model's
            output (one backward pass per batch) and the budget goes where it hurts
            the model least.
        sequential: Convert the layers in execution order, each fitted to the dense
            model's outputs from the inputs of the already compressed model, with
            error compensation validated on held-out calibration batches
            (:mod:`factorized_layers.sequential`); ``True`` or a
            :class:`~factorized_layers.sequential.Sequential` with options. Needs
            calibration batches (not precomputed statistics). Default (``None``): on
            when ``calibration`` is batches and every targeted class has a calibrated
            ``from_dense`` (it won on held-out data on SmolLM2-135M and MiniLM,
            ``benchmarks/README.md``), off otherwise; ``False`` fits every layer to
            the dense model's inputs in one pass.
        layer_options: ``{layer class: {option: value}}`` for one class's
            ``from_dense`` only, e.g. ``{CPConv2d: {"n_iter": 300}}`` (options mean
            different things per class: ``n_iter`` is power iterations for SVD, HOOI
            sweeps for Tucker, ALS sweeps for CP).
        **options: Passed to every ``from_dense`` (e.g. ``seed=``).

    Returns:
        A :class:`FactorizationReport`.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or is itself a converted type.
        ValueError: Bad ``layers``, patterns that match nothing, bad ranks or budget.

    Examples:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> report = factorize_(model, rank=0.25, include=["0"])
        >>> type(model[0]).__name__, report.replaced[0].rank
        ('SVDLinear', 8)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"factorize_ expects an nn.Module, got {type(model).__name__}")
    mapping = _check_layers(layers)
    root_target = _target_class(model, mapping)
    if root_target is not None:
        raise TypeError(
            f"factorize_ converts the layers inside a model, but the model itself is a "
            f"{type(model).__name__}: use {root_target.__name__}.from_dense(layer, rank)"
        )
    multiple_of = check_positive("multiple_of", multiple_of)
    if not (isinstance(rank, numbers.Real) and not isinstance(rank, bool)) and not isinstance(
        rank, POLICY_TYPES
    ):
        raise TypeError(
            "rank must be an int, a float in (0, 1], or one of Energy, ErrorBound, EVBMF, "
            f"Budget; got {type(rank).__name__} {rank!r}"
        )
    targets = _collect_targets(
        model,
        mapping,
        filter_fn,
        _check_patterns("include", include),
        _check_patterns("exclude", exclude),
    )
    read_by_parent = {
        id(getattr(parent, name)): f"{name} of nn.{type(parent).__name__}, {why}"
        for parent in model.modules()
        for owner, (names, why) in _READ_BY_PARENT.items()
        if isinstance(parent, owner)
        for name in names
    }
    skips = {
        fqn: _Skip(reason)
        for fqn, module, layer_cls in targets
        if (reason := _unsupported_reason(layer_cls, module, read_by_parent)) is not None
    }
    targets_to_rank = [t for t in targets if t[0] not in skips]
    automatic = sequential is None
    if automatic:
        sequential = (
            calibration is not None
            and not isinstance(calibration, Mapping)
            and bool(targets)
            and all(_accepts_calibration(layer_cls) for _, _, layer_cls in targets)
        )
    config = _check_sequential(sequential, calibration)
    if config is not None:
        calibration = list(calibration)  # iterated once per pass
    needs_profiles = isinstance(rank, POLICY_TYPES) or multiple_of > 1
    with_sensitivity = isinstance(rank, Budget) and rank.sensitivity
    stats = (
        {}
        if config is not None and not needs_profiles
        else _calibration_stats(model, targets, calibration, with_sensitivity)
    )
    per_class = dict(layer_options or {})
    unknown = [cls for cls in per_class if cls not in _SOURCES]
    if unknown:
        raise ValueError(
            f"layer_options keys must be registered layer classes, got {unknown}; "
            f"registered: {sorted(c.__name__ for c in _SOURCES)}"
        )
    per_layer_options = [
        dict(options, **per_class.get(layer_cls, {}), calibration=stats[fqn])
        if fqn in stats and _accepts_calibration(layer_cls)
        else dict(options, **per_class.get(layer_cls, {}))
        for fqn, _, layer_cls in targets
    ]
    ranked = dict(
        zip(
            (fqn for fqn, _, _ in targets_to_rank),
            _rank_specs(
                targets_to_rank,
                rank,
                multiple_of,
                [o for (fqn, _, _), o in zip(targets, per_layer_options) if fqn not in skips],
                allow_larger,
                [stats.get(fqn) for fqn, _, _ in targets_to_rank],
            ),
        )
    )
    specs = [skips.get(fqn, ranked.get(fqn)) for fqn, _, _ in targets]
    show = len(targets) >= 20 if progress is None else bool(progress)
    # Check every target on meta first, then decompose, then swap: an error anywhere
    # leaves the model untouched.
    plans = [
        (
            fqn,
            module,
            layer_cls,
            spec,
            layer_options,
            _plan_one(fqn, module, layer_cls, spec, layer_options, allow_larger),
        )
        for (fqn, module, layer_cls), spec, layer_options in zip(targets, specs, per_layer_options)
    ]
    if config is not None:
        try:
            return _convert_sequentially(model, calibration, plans, config, allow_larger)
        except CacheLimitError as exc:
            if not automatic:
                raise
            # The default must not fail where plain calibration works: the model was
            # left unchanged, convert it in one pass instead.
            warnings.warn(f"{exc}; converting with sequential=False instead", stacklevel=2)
            return factorize_(
                model, rank, filter_fn=filter_fn, include=include, exclude=exclude,
                layers=layers, multiple_of=multiple_of, allow_larger=allow_larger,
                progress=progress, calibration=calibration, sequential=False,
                layer_options=layer_options, **options,
            )  # fmt: skip
    rows, swaps = [], []
    for fqn, module, layer_cls, spec, layer_options, row in _progress(plans, show):
        if row.skipped is None:
            layer = _build(fqn, module, module, layer_cls, spec, layer_options, row, allow_larger)
            if layer is not None:
                _fill_converted_row(row, module, layer, stats.get(fqn))
                if calibration is not None and "calibration" not in layer_options:
                    row.note = (
                        f"{layer_cls.__name__} has no calibrated from_dense"
                        if not _accepts_calibration(layer_cls)
                        else "not reached by the calibration data"
                    )
                swaps.append((module, layer))
        rows.append(row)
    parents = _parents(model)
    for module, layer in swaps:
        _swap(module, layer, parents.get(id(module), []))
    return FactorizationReport(rows)


def _floored(sensitivities: List[float | None]) -> List[float] | None:
    """Sensitivities with a floor of 1e-3 of their median (``None`` if any is missing).

    A layer the probe's output does not depend on (e.g. a pooler beside the hidden
    states) measures 0, yet its output may be used: it keeps a small weight rather
    than being cut to the smallest rank for free.
    """
    if not sensitivities or any(w is None for w in sensitivities):
        return None
    positive = sorted(w for w in sensitivities if w > 0)
    if not positive:
        return None
    floor = 1e-3 * positive[len(positive) // 2]
    return [max(w, floor) for w in sensitivities]


def _build(
    fqn: str,
    module: nn.Module,
    source: nn.Module,
    layer_cls: type,
    spec: Any,
    options: Dict[str, Any],
    row: LayerReport,
    allow_larger: bool,
) -> nn.Module | None:
    """``layer_cls.from_dense(source, ...)`` for the target ``module``, or ``None``.

    Errors name the layer. The meta plan can differ from the real layer (e.g. Tucker
    picks its tensorization from the values), so the saving rule is applied to what
    was built: a layer that saves nothing is not returned and ``row`` says why.
    """
    try:
        layer = layer_cls.from_dense(source, spec, **options)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{fqn} ({type(module).__name__}): {exc}") from exc
    reason = None if allow_larger else _no_saving_reason(layer, module, row)
    if reason is not None:
        row.skipped = reason
        return None
    return layer


def _check_sequential(
    sequential: bool | Sequential, calibration: Any
) -> Sequential | None:
    if sequential is False:
        return None
    config = Sequential() if sequential is True else sequential
    if not isinstance(config, Sequential):
        raise TypeError(
            f"sequential must be a bool or a Sequential(...), got {type(sequential).__name__}"
        )
    if calibration is None or isinstance(calibration, Mapping):
        raise ValueError(
            "sequential=True needs calibration batches (an iterable the model runs on), "
            "not " + ("None" if calibration is None else "precomputed statistics")
        )
    return config


def _ridge_option(layer_cls: type) -> str | None:
    accepted = inspect.signature(layer_cls.from_dense).parameters
    for name in ("ridge", "whitening_ridge"):
        if name in accepted:
            return name
    return None


def _convert_sequentially(
    model: nn.Module,
    batches: List[Any],
    plans: List[Tuple[str, nn.Module, type, Any, Dict[str, Any], LayerReport]],
    config: Sequential,
    allow_larger: bool,
) -> FactorizationReport:
    """Fit and swap the planned layers in execution order (see :mod:`.sequential`).

    Layers are swapped in as they are fitted; on any error every swap is undone, so
    the model is left as it was.
    """
    parents = _parents(model)
    swapped: List[Tuple[nn.Module, nn.Module]] = []

    def swap(old: nn.Module, new: nn.Module) -> None:
        _swap(old, new, parents.get(id(old), []))
        swapped.append((old, new))

    def builder(fqn, module, layer_cls, spec, layer_options, row):
        options = {k: v for k, v in layer_options.items() if k != "calibration"}
        ridge_name = _ridge_option(layer_cls)

        def build(
            source: nn.Module, stats: InputStats | None, ridge: Dict[str, Any]
        ) -> nn.Module | None:
            build_options = dict(options, calibration=stats, **ridge)
            return _build(fqn, module, source, layer_cls, spec, build_options, row, allow_larger)

        return build, (lambda r: {} if ridge_name is None else {ridge_name: r})

    targets, rows = [], {}
    for plan in plans:
        fqn, module, layer_cls, _, _, row = plan
        if row.skipped is not None:
            continue
        if not _accepts_calibration(layer_cls):
            raise TypeError(
                f"sequential calibration needs layer classes whose from_dense takes "
                f"calibration=; {layer_cls.__name__} ({fqn}) does not"
            )
        build, ridge_options = builder(*plan)
        targets.append(Target(fqn, module, build, ridge_options))
        rows[fqn] = row
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        final_error = sequential_convert(model, batches, targets, config, swap)
    except BaseException:
        parents = _parents(model)
        for old, new in reversed(swapped):
            _swap(new, old, parents.get(id(new), []))
        raise
    finally:
        for module, training in modes.items():
            module.training = training
    for target in targets:
        row = rows[target.name]
        if target.layer is None:
            continue
        target.layer.train(modes[target.module])
        _fill_converted_row(row, target.module, target.layer, None)
        record = target.record
        row.output_error = record.output_error
        row.output_error_before = record.output_error_before
        row.note = (
            f"compensation {record.strength:g}, ridge {record.ridge:g}"
            if record.reached
            else "not reached by the calibration data"
        )
    return FactorizationReport([plan[-1] for plan in plans], model_output_error=final_error)


@dataclasses.dataclass(frozen=True)
class _Skip:
    """A rank decision that leaves the layer dense, with the reason for the report."""

    reason: str


_READ_BY_PARENT = {
    nn.MultiheadAttention: (("out_proj",), "whose forward reads its weight directly"),
    nn.TransformerEncoderLayer: (
        ("linear1", "linear2"),
        "whose eval fast path reads their weights directly",
    ),
}
"""Layers whose parent module uses their ``.weight`` tensor instead of calling them."""


def _unsupported_reason(
    layer_cls: type, module: nn.Module, read_by_parent: Dict[int, str]
) -> str | None:
    if id(module) in read_by_parent:
        return read_by_parent[id(module)]
    check = getattr(layer_cls, "unsupported_reason", None)
    return None if check is None else check(module)


def _accepts_calibration(layer_cls: type) -> bool:
    return "calibration" in inspect.signature(layer_cls.from_dense).parameters


def _calibration_stats(
    model: nn.Module,
    targets: List[Tuple[str, nn.Module, type]],
    calibration: Iterable[Any] | Mapping[str, InputStats] | None,
    sensitivity: bool = False,
) -> Dict[str, InputStats]:
    if calibration is None:
        return {}
    if isinstance(calibration, Mapping):
        for name, value in calibration.items():
            if not isinstance(value, InputStats):
                raise TypeError(
                    f"calibration[{name!r}] must be InputStats (from calibrate()), "
                    f"got {type(value).__name__}"
                )
        return dict(calibration)
    names = {fqn for fqn, _, layer_cls in targets if _accepts_calibration(layer_cls)}
    if not names:
        return {}
    # Eval mode, so that calibration does not update e.g. BatchNorm running statistics.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        return calibrate(
            model,
            calibration,
            filter_fn=lambda module, fqn: fqn in names,
            sensitivity=sensitivity,
        )
    finally:
        for module, training in modes.items():
            module.training = training


def _hedged(output_profile: RankProfile, weight_profile: RankProfile) -> RankProfile:
    """Budget errors with calibration but no sensitivity: RMS of output and weight error.

    The output term targets the calibration data; the weight term guards against
    calibration data unlike the data the model will see. On all-MiniLM-L6-v2 the pure
    output-error allocation lost to plain SVD at 90% of the parameters, while this mix
    beat it at every budget measured (benchmarks/README.md). With measured
    sensitivities the pure output error is used: on MiniLM at half the parameters the
    hedge cost 0.04-0.06 of embedding cosine there.
    """
    if output_profile.ranks != weight_profile.ranks:
        return output_profile
    errors = tuple(
        math.sqrt((a * a + b * b) / 2) for a, b in zip(output_profile.errors, weight_profile.errors)
    )
    return dataclasses.replace(output_profile, errors=errors)


def _rank_specs(
    targets: List[Tuple[str, nn.Module, type]],
    rank: Any,
    multiple_of: int,
    per_layer_options: List[Dict[str, Any]],
    allow_larger: bool,
    stats: List[InputStats | None],
) -> List[Any]:
    """One concrete rank spec per target (or a :class:`_Skip`), from a spec or a policy."""
    needs_profile = isinstance(rank, POLICY_TYPES) or multiple_of > 1
    if not needs_profile:
        return [rank] * len(targets)
    without_profile = sorted({c.__name__ for _, _, c in targets if not hasattr(c, "rank_profile")})
    if without_profile:
        raise TypeError(
            f"rank {rank!r} (multiple_of={multiple_of}) needs a rank profile, which "
            f"{', '.join(without_profile)} does not provide; give an int or float rank"
        )
    sensitivities = _floored([None if entry is None else entry.sensitivity for entry in stats])
    weighted = isinstance(rank, Budget) and rank.sensitivity and sensitivities is not None
    with whitening_cache():  # layers that read the same inputs share one eigh
        profiles = _profiles(targets, rank, multiple_of, per_layer_options, weighted)
    if isinstance(rank, Budget):
        if not allow_larger:
            # Only candidates that save both parameters and FLOPs, so that the budget's
            # decisions and the skip rule of _plan_one agree.
            profiles = [p.saving() for p in profiles]
        choice = allocate_budget(profiles, rank, sensitivities if weighted else None)
        return [
            _Skip("kept dense by the budget") if i is None else p.ranks[i]
            for p, i in zip(profiles, choice)
        ]
    return [select_rank(rank, profile) for profile in profiles]


def _profiles(
    targets: List[Tuple[str, nn.Module, type]],
    rank: Any,
    multiple_of: int,
    per_layer_options: List[Dict[str, Any]],
    weighted: bool,
) -> List[RankProfile]:
    """Each target's rank profile (output-error spectra with calibration)."""
    profiles: List[RankProfile] = []
    for (fqn, module, layer_cls), layer_options in zip(targets, per_layer_options):
        if module.weight.device.type == "meta":
            raise ValueError(
                f"rank {rank!r} with multiple_of={multiple_of} needs weight values, but {fqn} "
                "is on the meta device"
            )
        profile_options = {}
        if "calibration" in layer_options:
            # The whitening options (e.g. ridge=) shape the output-error spectrum: the
            # profile gets every option of from_dense it takes.
            accepted = inspect.signature(layer_cls.rank_profile).parameters
            profile_options = {
                name: value for name, value in layer_options.items() if name in accepted
            }
        profile = layer_cls.rank_profile(module, **profile_options)
        if isinstance(rank, Budget) and profile_options and not weighted:
            profile = _hedged(profile, layer_cls.rank_profile(module))
        profiles.append(profile.restrict_to_multiples(multiple_of))
    return profiles


def _plan_one(
    fqn: str,
    module: nn.Module,
    layer_cls: type,
    spec: Any,
    options: Dict[str, Any],
    allow_larger: bool,
) -> LayerReport:
    """The report row of one target, decided on a meta twin (no decomposition yet)."""
    params_before = _params(module)
    flops_before = _dense_flops_per_position(module)
    row = LayerReport(
        name=fqn,
        source_type=type(module).__name__,
        target_type=type(module).__name__,
        shape=tuple(module.weight.shape),
        rank=None,
        params_before=params_before,
        params_after=params_before,
        flops_before=flops_before,
        flops_after=flops_before,
        weight_error=None,
    )
    if isinstance(spec, _Skip):
        row.skipped = spec.reason
        return row
    try:
        shell = layer_cls.from_dense(_meta_twin(module), spec, **options)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{fqn} ({type(module).__name__}): {exc}") from exc
    if not allow_larger:
        row.skipped = _no_saving_reason(shell, module, row)
    return row


def _no_saving_reason(layer: nn.Module, module: nn.Module, row: LayerReport) -> str | None:
    params, flops = _params(layer), layer.flops_per_position()
    if params >= row.params_before or flops >= row.flops_before:
        return (
            f"rank {layer.rank} would not save parameters or FLOPs "
            f"({params:,} >= {row.params_before:,} or {flops:,} >= {row.flops_before:,})"
        )
    return None


def _fill_converted_row(
    row: LayerReport, module: nn.Module, layer: nn.Module, stats: InputStats | None
) -> None:
    reference = module.weight.detach()
    if reference.device.type != "meta":  # meta weights have no values to compare
        with torch.no_grad():
            approximation = layer.dense_weight().detach()
            difference = approximation - reference
            row.weight_error = float(difference.norm() / reference.norm().clamp_min(1e-30))
            if stats is not None and reference.dim() == 2:
                row.output_error = relative_output_error(reference, approximation, stats.gram)
    row.target_type = type(layer).__name__
    row.rank = layer.rank
    row.params_after = _params(layer)
    row.flops_after = layer.flops_per_position()


def unfactorize_(model: nn.Module) -> nn.Module:
    """Replace every factorized layer of ``model`` by its ``to_dense()`` module, in place.

    Hooks, device, dtype, ``training`` and sharing are kept as in :func:`factorize_`.

    Returns:
        ``model``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> _ = factorize_(model, rank=4, allow_larger=True)
        >>> type(unfactorize_(model)[0]).__name__
        'Linear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfactorize_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, tuple(_SOURCES)):
        raise TypeError(
            f"unfactorize_ converts the layers inside a model; call {type(model).__name__}"
            ".to_dense() on a single layer"
        )
    parents = _parents(model)
    factorized = [m for m in model.modules() if isinstance(m, tuple(_SOURCES))]
    for module in factorized:
        _swap(module, module.to_dense(), parents.get(id(module), []))
    return model


def truncate_(
    model: nn.Module,
    rank: Any,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    **options: Any,
) -> FactorizationReport:
    """Lower the rank of ``model``'s factorized layers, in place, from their factors.

    Every new layer is computed before any is swapped in (an error leaves the model
    unchanged). Each targeted layer is replaced by ``layer.truncated(rank, **options)``, which
    re-decomposes the layer's own factors -- never the original dense weight -- so a
    fine-tuned model can be compressed further: the SVD layer's error is the
    Eckart--Young optimum for its current weight, Tucker runs HOOI on its core, CP
    runs ALS on its factors. Layers already at or below the rank are left as they
    are (a skipped row in the report). Hooks, sharing, device, dtype, ``training``
    and ``requires_grad`` flags are kept, as in :func:`factorize_`. Optimizers hold
    the old parameters: create a new one afterwards.

    Args:
        model: A model with factorized layers.
        rank: The new rank spec of every targeted layer, in the layer constructor's
            terms (``int``; ``float`` fraction of the *dense* weight's parameters;
            a tuple for ``TuckerLinear``), or ``{name: spec}`` for chosen layers
            (exact names; the others are left unchanged).
        filter_fn: ``filter_fn(module, fqn) -> bool``; only layers it accepts change.
        include: Names to truncate (syntax of :func:`factorize_`).
        exclude: Names to leave unchanged.
        **options: Passed to the ``truncated`` of every class that takes them (e.g.
            ``n_iter=`` reaches Tucker and CP layers); an option no targeted class
            takes is a ``TypeError``.

    Returns:
        A :class:`FactorizationReport`; ``weight_error`` is each layer's relative
        change ``||W_old - W_new|| / ||W_old||``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, is itself a factorized layer, or
            ``rank`` is a policy.
        ValueError: Bad ranks, or names/patterns that match no factorized layer.

    Examples:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        >>> _ = factorize_(model, rank=16)
        >>> report = truncate_(model, rank=4)
        >>> model[0].rank, report.replaced[0].params_after
        (4, 576)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"truncate_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, tuple(_SOURCES)):
        raise TypeError(
            f"truncate_ works on the layers inside a model; call {type(model).__name__}"
            ".truncated(rank) on a single layer"
        )
    if isinstance(rank, POLICY_TYPES):
        raise TypeError(
            f"truncate_ takes a rank spec (int, float, tuple) or {{name: spec}}, not the "
            f"policy {rank!r}"
        )
    layers = {cls: cls for cls in _SOURCES}
    targets = _collect_targets(
        model,
        layers,
        filter_fn,
        _check_patterns("include", include),
        _check_patterns("exclude", exclude),
    )
    if isinstance(rank, Mapping):
        names = {fqn for fqn, _, _ in targets}
        unknown = sorted(set(rank) - names)
        if unknown:
            raise ValueError(
                f"rank names {unknown} are not targeted factorized layers; "
                f"candidates are {sorted(names)[:20]}"
            )
        targets = [t for t in targets if t[0] in rank]
    accepted = {
        cls: set(inspect.signature(cls.truncated).parameters) - {"self", "rank"}
        for cls in {layer_cls for _, _, layer_cls in targets}
    }
    unused = sorted(set(options) - set().union(*accepted.values()))
    if unused:
        raise TypeError(
            f"truncate_ option(s) {unused} are taken by no targeted layer's truncated(); "
            f"accepted: { {cls.__name__: sorted(names) for cls, names in accepted.items()} }"
        )
    # Build every new layer first, so that an error leaves the model unchanged.
    planned = []
    for fqn, layer, layer_cls in targets:
        spec = rank[fqn] if isinstance(rank, Mapping) else rank
        own = {k: v for k, v in options.items() if k in accepted[layer_cls]}
        try:
            new = layer.truncated(spec, **own)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{fqn} ({layer_cls.__name__}): {exc}") from exc
        planned.append((fqn, layer, layer_cls, spec, new))
    parents = _parents(model)
    rows = []
    for fqn, layer, layer_cls, spec, new in planned:
        with torch.no_grad():
            before = layer.dense_weight()
        row = LayerReport(
            name=fqn,
            source_type=layer_cls.__name__,
            target_type=layer_cls.__name__,
            shape=tuple(before.shape),
            rank=new.rank,
            params_before=_params(layer),
            params_after=_params(new),
            flops_before=layer.flops_per_position(),
            flops_after=new.flops_per_position(),
            weight_error=None,
        )
        if new.rank == layer.rank:
            row.params_after, row.flops_after = row.params_before, row.flops_before
            row.skipped = f"already at or below rank {spec!r}"
        else:
            row.weight_error = _relative_change(before, new)
            _swap(layer, new, parents.get(id(layer), []))
        rows.append(row)
    return FactorizationReport(rows)


def _relative_change(before: torch.Tensor, new: nn.Module) -> float | None:
    """``||W_old - W_new|| / ||W_old||`` in float32/64 (``None`` on meta)."""
    with torch.no_grad():
        if before.device.type == "meta":
            return None
        compute = torch.float64 if before.dtype == torch.float64 else torch.float32
        before = before.to(compute)
        norm = float(before.norm())
        return float((before - new.dense_weight().to(compute)).norm()) / norm if norm else 0.0
