"""The public conversion functions: ``factorize_``, ``unfactorize_`` and ``truncate_``."""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

from ..calibrate import InputStats
from ..ranks import EVBMF, POLICY_TYPES, Budget, check_positive
from ..registry import capabilities_of, registered_layers
from ..sequential import CacheLimitError, Sequential, Target, sequential_convert
from ..sources import source_for
from .auto import (
    AUTO,
    _speedup,
    auto_mapping,
    calibrated_targets,
    choose_families,
    input_shapes,
    no_candidate_reason,
    timing_layer,
)
from .plan import (
    _build,
    _calibration_stats,
    _check_layers,
    _dense_row,
    _fill_converted_row,
    _floored,
    _params,
    _per_layer_options,
    _plan_one,
    _rank_specs,
    _Skip,
    _unsupported_reason,
)
from .report import FactorizationReport, LayerReport
from .ties import factor_ties, tied_groups
from .walk import (
    _check_patterns,
    _collect_targets,
    _parents,
    _progress,
    _read_by_parent,
    _swap,
    _swap_all,
    _swapping,
    _target_class,
)

__all__ = ["factorize_", "unfactorize_", "truncate_"]


def factorize_(
    model: nn.Module,
    rank: Any = 0.5,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    layers: Mapping[type, type] | str | None = None,
    multiple_of: int = 1,
    allow_larger: bool = False,
    progress: bool | None = None,
    calibration: Iterable[Any] | Mapping[str, InputStats] | None = None,
    sequential: bool | Sequential | None = None,
    layer_options: Mapping[type, Mapping[str, Any]] | None = None,
    example_inputs: Iterable[Any] | None = None,
    allow_slower: bool = False,
    min_speedup: float = 1.0,
    streaming: bool = False,
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
            ``"auto"``: every registered class that converts a layer's type is a
            candidate, and each layer gets the family with the lowest error at its
            share of ``rank`` (a float, ``Budget``, ``Energy`` or ``ErrorBound``), fitted
            and compared on the calibration data when given
            (:mod:`factorized_layers.convert.auto`); the report's note says what was
            chosen over what. Not with ``sequential=True`` or ``multiple_of``.
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
        example_inputs: Batches (as for ``calibration``) whose first one gives each
            layer's input shape for the speed guard: each planned layer (with
            ``layers="auto"``: each candidate family) is timed against the dense layer
            at that shape, on the layer's device, and one that would run below
            ``min_speedup`` times the dense speed stays dense, with the measured
            ratio as the reason in the report (whose ``speedup`` column shows every
            converted layer's). With ``layers="auto"`` the calibration batches serve
            when this is ``None``; otherwise no speed is measured. A ``Budget`` is
            allocated first: a layer the guard keeps dense keeps its parameters
            (``layers="auto"`` guards before allocating).
        allow_slower: Turn the speed guard off.
        min_speedup: Least dense-time / factorized-time ratio a converted layer must
            reach at its example input (default 1.0: never slower than dense).
        streaming: Swap each layer in as soon as its decomposition is done and release
            the replaced dense module's parameters (set to ``None``; their memory is
            freed unless held elsewhere), so peak extra memory is about one layer's
            rather than every new layer's. The conversion is then no longer all or
            nothing: an exception or interrupt part-way leaves the layers converted so
            far converted (each swap is whole: every layer is either its dense
            original, untouched, or its factorized replacement) and the rest dense,
            and no report is returned. Not with ``layers="auto"`` or sequential
            calibration. Weight-tied layers are swapped last, together.
        **options: Passed to every ``from_dense`` (e.g. ``seed=``; with
            ``layers="auto"``, to each candidate that takes them).

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
    auto = isinstance(layers, str)
    if auto and layers != AUTO:
        raise ValueError(f"layers must be a mapping, None or 'auto', got {layers!r}")
    mapping = auto_mapping() if auto else _check_layers(layers)
    root_target = _target_class(model, mapping)
    if root_target is not None:
        raise TypeError(
            f"factorize_ converts the layers inside a model, but the model itself is a "
            f"{type(model).__name__}: use {root_target.__name__}.from_dense(layer, rank)"
        )
    multiple_of = check_positive("multiple_of", multiple_of)
    if (
        isinstance(min_speedup, bool)
        or not isinstance(min_speedup, numbers.Real)
        or not 0 < min_speedup < float("inf")
    ):
        raise ValueError(f"min_speedup must be a positive finite number, got {min_speedup!r}")
    if not (isinstance(rank, numbers.Real) and not isinstance(rank, bool)) and not isinstance(
        rank, POLICY_TYPES
    ):
        raise TypeError(
            "rank must be an int, a float in (0, 1], or one of Energy, ErrorBound, EVBMF, "
            f"Budget; got {type(rank).__name__} {rank!r}"
        )
    if auto and (isinstance(rank, numbers.Integral) or isinstance(rank, EVBMF)):
        raise TypeError(
            f"layers='auto' compares families at a share of parameters: give a float, "
            f"Budget, Energy or ErrorBound rank, not {rank!r}"
        )
    if auto and multiple_of != 1:
        raise ValueError("layers='auto' does not take multiple_of (ranks differ per family)")
    targets = _collect_targets(
        model,
        mapping,
        filter_fn,
        _check_patterns("include", include),
        _check_patterns("exclude", exclude),
    )
    read_by_parent = _read_by_parent(model)
    followers, untied = tied_groups(model, targets)
    skips = {fqn: _Skip(reason) for fqn, reason in untied.items()}
    skips.update(
        {
            fqn: _Skip(reason)
            for fqn, module, layer_cls in targets
            if (reason := _unsupported_reason(layer_cls, module, read_by_parent)) is not None
        }
    )
    for follower, owner in list(followers.items()):
        # A tie converts whole or not at all.
        if follower in skips or owner in skips:
            skips.setdefault(follower, _Skip(f"weight tied to {owner}, which stays dense"))
            skips.setdefault(owner, _Skip(f"weight tied to {follower}, which stays dense"))
            del followers[follower]
    targets_to_rank = [t for t in targets if t[0] not in skips and t[0] not in followers]
    automatic = sequential is None
    if automatic:
        sequential = (
            calibration is not None
            and not isinstance(calibration, Mapping)
            and bool(targets)
            and not followers
            and not auto
            and all(capabilities_of(layer_cls).calibration for _, _, layer_cls in targets)
        )
    config = _check_sequential(sequential, calibration)
    if not isinstance(streaming, bool):
        raise TypeError(f"streaming must be a bool, got {type(streaming).__name__}")
    if streaming and (auto or config is not None):
        raise ValueError(
            "streaming=True converts in one pass layer by layer: not with layers='auto' "
            "or sequential calibration (pass sequential=False)"
        )
    if config is not None and auto:
        raise ValueError("layers='auto' converts in one pass: pass sequential=False")
    if config is not None and followers:
        raise ValueError(
            f"sequential calibration cannot convert weight-tied layers {sorted(followers)}; "
            "pass sequential=False"
        )
    if config is not None:
        calibration = list(calibration)  # iterated once per pass
    needs_profiles = isinstance(rank, POLICY_TYPES) or multiple_of > 1
    with_sensitivity = isinstance(rank, Budget) and rank.sensitivity
    stats = (
        {}
        if config is not None and not needs_profiles
        else _calibration_stats(
            model, calibrated_targets(targets) if auto else targets, calibration, with_sensitivity
        )
    )
    speed_floor = None if allow_slower else min_speedup
    if auto:
        return _convert_auto(
            model, targets, targets_to_rank, skips, followers, rank, stats, options,
            layer_options, example_inputs if example_inputs is not None else calibration,
            speed_floor, allow_larger, show=len(targets) >= 20 if progress is None else progress,
        )  # fmt: skip
    per_layer_options = _per_layer_options(targets, options, layer_options, stats)
    ranked = dict(
        zip(
            (fqn for fqn, _, _ in targets_to_rank),
            _rank_specs(
                targets_to_rank,
                rank,
                multiple_of,
                [
                    o
                    for (fqn, _, _), o in zip(targets, per_layer_options)
                    if fqn not in skips and fqn not in followers
                ],
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
            _tied_row(fqn, module, followers[fqn])
            if fqn in followers
            else _plan_one(fqn, module, layer_cls, spec, layer_options, allow_larger),
        )
        for (fqn, module, layer_cls), spec, layer_options in zip(targets, specs, per_layer_options)
    ]
    if example_inputs is not None and speed_floor is not None:
        _guard_speed(model, plans, followers, example_inputs, speed_floor)
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
                layer_options=layer_options, example_inputs=example_inputs,
                allow_slower=allow_slower, min_speedup=min_speedup, **options,
            )  # fmt: skip
    return _convert_in_one_pass(
        model, plans, stats, calibration is not None, allow_larger, show, followers,
        streaming=streaming,
    )  # fmt: skip


def _convert_auto(
    model: nn.Module,
    targets: List[Tuple[str, nn.Module, type]],
    targets_to_rank: List[Tuple[str, nn.Module, type]],
    skips: Dict[str, _Skip],
    followers: Dict[str, str],
    rank: Any,
    stats: Dict[str, InputStats],
    options: Mapping[str, Any],
    layer_options: Mapping[type, Mapping[str, Any]] | None,
    example_inputs: Iterable[Any] | Mapping[str, InputStats] | None,
    min_speedup: float | None,
    allow_larger: bool,
    show: bool,
) -> FactorizationReport:
    """``layers="auto"``: choose each layer's family (:mod:`.auto`), then swap."""
    for fqn, module, _ in targets_to_rank:
        reason = no_candidate_reason(module)
        if reason is not None:
            skips[fqn] = _Skip(reason)
    ranked = [t for t in targets_to_rank if t[0] not in skips]
    sensitivities = None
    if isinstance(rank, Budget) and rank.sensitivity:
        sensitivities = _floored(
            [None if fqn not in stats else stats[fqn].sensitivity for fqn, _, _ in ranked]
        )
    batches = None if isinstance(example_inputs, Mapping) else example_inputs
    shapes = input_shapes(model, [fqn for fqn, _, _ in ranked], batches)
    choices = choose_families(
        ranked, rank, options, layer_options, stats, sensitivities, shapes, min_speedup
    )
    plans, prebuilt = [], {}
    for fqn, module, _ in targets:
        choice = choices.get(fqn)
        if fqn in followers:
            row, layer_cls = _tied_row(fqn, module, followers[fqn]), type(module)
        elif choice is None or choice.skip is not None:
            reason = (skips.get(fqn) or choice.skip).reason
            row, layer_cls = _dense_row(fqn, module, reason), type(module)
        else:
            row, layer_cls = _dense_row(fqn, module), choice.layer_cls
            row.note = choice.note
            prebuilt[fqn] = choice.layer
        plans.append((fqn, module, layer_cls, None, {}, row))
    return _convert_in_one_pass(model, plans, stats, False, allow_larger, show, followers, prebuilt)


def _guard_speed(
    model: nn.Module,
    plans: List[tuple],
    followers: Mapping[str, str],
    example_inputs: Iterable[Any],
    min_speedup: float,
) -> None:
    """Time every planned layer at its example input; keep dense those below ``min_speedup``."""
    planned = [p for p in plans if p[5].skipped is None and p[0] not in followers]
    shapes = input_shapes(model, [p[0] for p in planned], example_inputs)
    for fqn, module, layer_cls, spec, layer_options, row in planned:
        if fqn not in shapes or source_for(module).dense_flops(module) == 0:
            continue
        layer = timing_layer(layer_cls, module, spec, layer_options)
        row.speedup = _speedup(module, layer, shapes[fqn])
        if row.speedup < min_speedup:
            row.skipped = (
                f"kept dense: {row.speedup:.2f}x dense speed at input {shapes[fqn][0]} "
                f"(min_speedup={min_speedup})"
            )


def _tied_row(fqn: str, module: nn.Module, owner: str) -> LayerReport:
    """The report row of a follower: its shared weight is counted at the owner."""
    row = _dense_row(fqn, module)
    row.params_before = row.params_after = row.params_before - module.weight.numel()
    row.note = f"weight tied to {owner}: shares its factors"
    return row


def _convert_in_one_pass(
    model: nn.Module,
    plans: List[Tuple[str, nn.Module, type, Any, Dict[str, Any], LayerReport]],
    stats: Dict[str, InputStats],
    calibrated: bool,
    allow_larger: bool,
    show: bool,
    followers: Mapping[str, str],
    prebuilt: Mapping[str, nn.Module] | None = None,
    streaming: bool = False,
) -> FactorizationReport:
    """Build every planned layer from the dense model, then swap them all in.

    ``prebuilt`` layers (chosen by ``layers="auto"``) are used as they are. Followers
    of a weight tie are built last, from their owner's new layer. With ``streaming``
    each layer (but weight-tied ones, which go last) is swapped in as soon as it is
    built and its dense module's parameters are released.
    """
    swaps, built = [], {}
    parents = _parents(model)
    tied = set(followers) | set(followers.values())
    for fqn, module, layer_cls, spec, layer_options, row in _progress(plans, show):
        if row.skipped is None and fqn not in followers:
            if prebuilt and fqn in prebuilt:
                layer = prebuilt[fqn]
            else:
                layer = _build(
                    fqn, module, module, layer_cls, spec, layer_options, row, allow_larger
                )
            if layer is not None:
                note = row.note
                _fill_converted_row(row, module, layer, stats.get(fqn))
                row.note = note
                if calibrated and "calibration" not in layer_options:
                    row.note = (
                        f"{layer_cls.__name__} has no calibrated from_dense"
                        if not capabilities_of(layer_cls).calibration
                        else "not reached by the calibration data"
                    )
                built[fqn] = layer
                if streaming and fqn not in tied:
                    _swap(module, layer, parents.get(id(module), []))
                    _release(module)
                else:
                    swaps.append((module, layer))
    for fqn, module, _, _, _, row in plans:
        owner = followers.get(fqn)
        if owner is None:
            continue
        if owner not in built:
            row.skipped, row.note = f"weight tied to {owner}, which stays dense", None
            continue
        layer = built[owner].tie(module)
        params = row.params_after
        _fill_converted_row(row, module, layer, None)
        row.params_after = params
        swaps.append((module, layer))
    rows = [row for *_, row in plans]
    _swap_all(swaps, parents)
    if streaming:
        for module, _ in swaps:
            _release(module)
    return FactorizationReport(rows)


def _release(module: nn.Module) -> None:
    """Drop a replaced dense module's parameters (``streaming=True``): their memory is
    freed unless something else still holds them."""
    for name in list(module._parameters):
        module._parameters[name] = None


def _check_sequential(sequential: bool | Sequential, calibration: Any) -> Sequential | None:
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

    def builder(fqn, module, layer_cls, spec, layer_options, row):
        options = {k: v for k, v in layer_options.items() if k != "calibration"}
        ridge_name = capabilities_of(layer_cls).ridge_option

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
        if not capabilities_of(layer_cls).calibration:
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
        with _swapping(_parents(model)) as swap:
            final_error = sequential_convert(model, batches, targets, config, swap)
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
    classes = tuple(registered_layers())
    if isinstance(model, classes):
        raise TypeError(
            f"unfactorize_ converts the layers inside a model; call {type(model).__name__}"
            ".to_dense() on a single layer"
        )
    parents = _parents(model)
    factorized = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, classes)]
    followers = factor_ties(factorized)
    dense = {fqn: module.to_dense() for fqn, module in factorized}
    for follower, owner in followers.items():
        # Weight-tied layers stay tied: the follower reads the owner's dense weight.
        if dense[follower].weight.shape == dense[owner].weight.shape:
            dense[follower].weight = dense[owner].weight
    _swap_all([(module, dense[fqn]) for fqn, module in factorized], parents)
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
    if isinstance(model, tuple(registered_layers())):
        raise TypeError(
            f"truncate_ works on the layers inside a model; call {type(model).__name__}"
            ".truncated(rank) on a single layer"
        )
    if isinstance(rank, POLICY_TYPES):
        raise TypeError(
            f"truncate_ takes a rank spec (int, float, tuple) or {{name: spec}}, not the "
            f"policy {rank!r}"
        )
    layers = {cls: cls for cls in registered_layers()}
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
    classes = {layer_cls for _, _, layer_cls in targets}
    unsupported = sorted(c.__name__ for c in classes if not capabilities_of(c).truncation)
    if unsupported:
        raise TypeError(f"truncate_: {', '.join(unsupported)} do(es) not support truncation")
    accepted = {cls: set(capabilities_of(cls).truncation_options) for cls in classes}
    unused = sorted(set(options) - set().union(*accepted.values()))
    if unused:
        raise TypeError(
            f"truncate_ option(s) {unused} are taken by no targeted layer's truncated(); "
            f"accepted: { {cls.__name__: sorted(names) for cls, names in accepted.items()} }"
        )
    # A weight-tied follower is truncated with its owner (it shares the owner's factors).
    followers = factor_ties(
        [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, tuple(layers))]
    )
    targeted = {fqn for fqn, _, _ in targets}
    tied_rows = [
        _tied_truncation_row(fqn, layer, followers[fqn], followers[fqn] in targeted)
        for fqn, layer, _ in targets
        if fqn in followers
    ]
    targets = [t for t in targets if t[0] not in followers]
    modules = dict(model.named_modules())
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
        planned.extend(
            (follower, modules[follower], type(modules[follower]), spec, new.tie(modules[follower]))
            for follower, owner in followers.items()
            if owner == fqn
        )
    parents = _parents(model)
    new_of = {fqn: new for fqn, _, _, _, new in planned}
    rows = []
    swaps: List[Tuple[nn.Module, nn.Module]] = []
    for fqn, layer, layer_cls, spec, new in planned:
        with torch.no_grad():
            before = layer.dense_weight()
        owner = followers.get(fqn)
        row = LayerReport(
            name=fqn,
            source_type=layer_cls.__name__,
            target_type=layer_cls.__name__,
            shape=tuple(before.shape),
            rank=new.rank,
            params_before=_params(layer, modules.get(owner)),
            params_after=_params(new, new_of.get(owner)),
            flops_before=layer.flops_per_position(),
            flops_after=new.flops_per_position(),
            weight_error=None,
        )
        if new.rank == layer.rank:
            row.params_after, row.flops_after = row.params_before, row.flops_before
            row.skipped = f"already at or below rank {spec!r}"
        else:
            row.weight_error = _relative_change(before, new)
            swaps.append((layer, new))
        rows.append(row)
    _swap_all(swaps, parents)
    return FactorizationReport(rows + [row for row in tied_rows if row is not None])


def _tied_truncation_row(
    fqn: str, layer: nn.Module, owner: str, owner_targeted: bool
) -> LayerReport | None:
    """A follower's report row: ``None`` when its owner's truncation reports it."""
    if owner_targeted:
        return None
    params, flops = _params(layer), layer.flops_per_position()
    return LayerReport(
        name=fqn,
        source_type=type(layer).__name__,
        target_type=type(layer).__name__,
        shape=tuple(layer.dense_weight().shape),
        rank=layer.rank,
        params_before=params,
        params_after=params,
        flops_before=flops,
        flops_after=flops,
        weight_error=None,
        skipped=f"shares its factors with {owner}: truncate that layer",
    )


def _relative_change(before: torch.Tensor, new: nn.Module) -> float | None:
    """``||W_old - W_new|| / ||W_old||`` in float32/64 (``None`` on meta)."""
    with torch.no_grad():
        if before.device.type == "meta":
            return None
        compute = torch.float64 if before.dtype == torch.float64 else torch.float32
        before = before.to(compute)
        norm = float(before.norm())
        return float((before - new.dense_weight().to(compute)).norm()) / norm if norm else 0.0
