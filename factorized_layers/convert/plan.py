"""Planning a conversion: target classes, calibration statistics, ranks, report rows.

Everything here is decided before any model is changed: ranks from a spec, a
policy or a global budget (:func:`_rank_specs`), each row checked on a meta twin
(:func:`_plan_one`); :func:`_build` then runs a class's ``from_dense``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import torch
import torch.nn as nn

from ..calibrate import InputStats, calibrate
from ..decompose import relative_output_error, whitening_cache
from ..layers import default_layers
from ..ranks import POLICY_TYPES, Budget, RankProfile, allocate_budget, select_rank
from ..registry import capabilities_of, registered_layers
from ..sources import source_for
from .report import LayerReport
from .walk import _meta_twin


def _check_layers(layers: Mapping[type, type] | None) -> Dict[type, type]:
    mapping = default_layers() if layers is None else dict(layers)
    if not mapping:
        raise ValueError("layers must map at least one dense module type to a layer class")
    for source, target in mapping.items():
        supported = registered_layers().get(target)
        if supported is None:
            known = ", ".join(sorted(cls.__name__ for cls in registered_layers()))
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


@dataclasses.dataclass(frozen=True)
class _Skip:
    """A rank decision that leaves the layer dense, with the reason for the report."""

    reason: str


def _params(module: nn.Module, shared_with: nn.Module | None = None) -> int:
    """Parameters of ``module``, less those it shares with ``shared_with`` (a tie's owner)."""
    shared = set() if shared_with is None else {id(p) for p in shared_with.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in shared)


def _dense_flops_per_position(module: nn.Module) -> int:
    return source_for(module).dense_flops(module)


def _unsupported_reason(
    layer_cls: type, module: nn.Module, read_by_parent: Dict[int, str]
) -> str | None:
    if id(module) in read_by_parent:
        return read_by_parent[id(module)]
    adapter = source_for(module)
    reason = None if adapter is None else adapter.unsupported_reason(module)
    if reason is not None:
        return reason
    check = getattr(layer_cls, "unsupported_reason", None)
    return None if check is None else check(module)


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
    names = {fqn for fqn, _, layer_cls in targets if capabilities_of(layer_cls).calibration}
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


def _per_layer_options(
    targets: List[Tuple[str, nn.Module, type]],
    options: Mapping[str, Any],
    layer_options: Mapping[type, Mapping[str, Any]] | None,
    stats: Mapping[str, InputStats],
) -> List[Dict[str, Any]]:
    """Each target's ``from_dense`` options: shared, then its class's, then its calibration."""
    per_class = dict(layer_options or {})
    unknown = [cls for cls in per_class if cls not in registered_layers()]
    if unknown:
        raise ValueError(
            f"layer_options keys must be registered layer classes, got {unknown}; "
            f"registered: {sorted(c.__name__ for c in registered_layers())}"
        )
    return [
        dict(options, **per_class.get(layer_cls, {}), calibration=stats[fqn])
        if fqn in stats and capabilities_of(layer_cls).calibration
        else dict(options, **per_class.get(layer_cls, {}))
        for fqn, _, layer_cls in targets
    ]


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
    without_profile = sorted(
        {c.__name__ for _, _, c in targets if not capabilities_of(c).rank_profile}
    )
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
        # The options that shape the spectrum (a whitening ridge, a mode) reach the
        # profile with or without calibration.
        accepted = ("calibration",) + capabilities_of(layer_cls).profile_options
        profile_options = {name: value for name, value in layer_options.items() if name in accepted}
        profile = layer_cls.rank_profile(module, **profile_options)
        if isinstance(rank, Budget) and "calibration" in profile_options and not weighted:
            plain = {k: v for k, v in profile_options.items() if k != "calibration"}
            profile = _hedged(profile, layer_cls.rank_profile(module, **plain))
        profiles.append(profile.restrict_to_multiples(multiple_of))
    return profiles


def _dense_row(fqn: str, module: nn.Module, skipped: str | None = None) -> LayerReport:
    """The report row of a target as it is (dense), optionally skipped with a reason."""
    params, flops = _params(module), _dense_flops_per_position(module)
    return LayerReport(
        name=fqn,
        source_type=type(module).__name__,
        target_type=type(module).__name__,
        shape=tuple(module.weight.shape),
        rank=None,
        params_before=params,
        params_after=params,
        flops_before=flops,
        flops_after=flops,
        weight_error=None,
        skipped=skipped,
    )


def _plan_one(
    fqn: str,
    module: nn.Module,
    layer_cls: type,
    spec: Any,
    options: Dict[str, Any],
    allow_larger: bool,
) -> LayerReport:
    """The report row of one target, decided on a meta twin (no decomposition yet)."""
    row = _dense_row(fqn, module)
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
    # A lookup (0 dense FLOPs) is judged by its parameters alone.
    if params >= row.params_before or (row.flops_before > 0 and flops >= row.flops_before):
        return (
            f"rank {layer.rank} would not save parameters or FLOPs "
            f"({params:,} >= {row.params_before:,} or {flops:,} >= {row.flops_before:,})"
        )
    return None


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


def _fill_converted_row(
    row: LayerReport, module: nn.Module, layer: nn.Module, stats: InputStats | None
) -> None:
    reference = module.weight.detach()
    if reference.device.type != "meta":  # meta weights have no values to compare
        with torch.no_grad():
            approximation = layer.dense_weight().detach()
            if stats is not None and source_for(module).exact_output_error:
                row.output_error = relative_output_error(reference, approximation, stats.gram)
            # In place (one weight-sized temporary, which bounds a streaming conversion)
            # unless dense_weight() is a view of a parameter (a fully folded Tucker core).
            owned = {t.untyped_storage().data_ptr() for t in layer.parameters()}
            if approximation.untyped_storage().data_ptr() in owned:
                difference = approximation - reference
            else:
                difference = approximation.sub_(reference)
            row.weight_error = float(difference.norm() / reference.norm().clamp_min(1e-30))
    row.target_type = type(layer).__name__
    row.rank = layer.rank
    row.params_after = _params(layer)
    row.flops_after = layer.flops_per_position()
