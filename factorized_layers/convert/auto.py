"""``factorize_(..., layers="auto")``: the family and rank of each layer chosen by error.

Two stages, both decided before the model changes:

1. **Shares.** Each layer's candidate families (every registered class that converts
   its type) offer rank profiles. The profiles whose errors ``from_dense`` achieves or
   beats (``Capabilities.profile_errors == "achieved"``: truncated-SVD optima, TT-SVD
   and HOSVD bounds) are merged into one Pareto front per layer, and the rank spec or
   :class:`~factorized_layers.ranks.Budget` is resolved on those fronts as usual: it
   fixes how many parameters each layer may keep (or that it stays dense). Profiles
   that only bound the error from below (CP's unfolding estimate) would make their
   family look better than it is, so they do not steer the shares.
2. **Families.** At its share, every candidate family of a layer is fitted at its
   largest rank within the share, and the fit with the lowest error wins: with
   calibration the root mean square of the output error on that data (exact for a
   linear layer; for a convolution the input-channel-whitened kernel error) and the
   weight error, as ``Budget`` hedges; else the weight error. Every candidate must
   save parameters and FLOPs.

Before both, the speed guard (when example inputs give a layer's input shape, unless
``allow_slower``) drops each family whose forward at that shape, at the rank the spec
gives it, runs below ``min_speedup`` times the dense layer's speed; a layer left without
families stays dense.

The report's note says what was chosen and why.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

from ..calibrate import InputStats, check_batch, run_batch
from ..decompose import relative_output_error, whitening_cache
from ..ranks import Budget, RankProfile, allocate_budget, select_rank
from ..registry import capabilities_of, registered_layers
from ..schedule import interleaved_medians
from ..sources import source_for
from .plan import _hedged, _params, _Skip

__all__ = [
    "AUTO",
    "Choice",
    "auto_mapping",
    "calibrated_targets",
    "choose_families",
    "input_shapes",
    "no_candidate_reason",
    "timing_layer",
]

AUTO = "auto"


def auto_mapping() -> Dict[type, type]:
    """``{dense type: a registered class}`` covering every dense type some class converts.

    Used only to find the targets; the class of each is chosen later.
    """
    mapping: Dict[type, type] = {}
    for layer_cls, sources in registered_layers().items():
        for source in sources:
            mapping.setdefault(source, layer_cls)
    return mapping


def _candidates(module: nn.Module) -> List[Tuple[type, Dict[str, Any]]]:
    """Every ``(class, variant options)`` that can convert ``module`` and offers a profile."""
    found = []
    for layer_cls, sources in registered_layers().items():
        if not isinstance(module, sources) or not capabilities_of(layer_cls).rank_profile:
            continue
        if layer_cls.unsupported_reason(module) is not None:
            continue
        variants = getattr(layer_cls, "auto_variants", None)
        for variant in variants(module) if callable(variants) else ({},):
            found.append((layer_cls, dict(variant)))
    return found


def no_candidate_reason(module: nn.Module) -> str | None:
    """Why no registered class can convert ``module`` (``None`` when one can)."""
    if _candidates(module):
        return None
    return f"auto: no registered family with a rank profile converts this {type(module).__name__}"


def calibrated_targets(
    targets: List[Tuple[str, nn.Module, type]],
) -> List[Tuple[str, nn.Module, type]]:
    """``targets`` with, for each, a candidate class that takes calibration if there is one.

    Calibration statistics are collected for targets whose class takes them; under
    ``"auto"`` that is any of the candidates.
    """
    chosen = []
    for fqn, module, layer_cls in targets:
        calibrating = [c for c, _ in _candidates(module) if capabilities_of(c).calibration]
        chosen.append((fqn, module, calibrating[0] if calibrating else layer_cls))
    return chosen


def _label(layer_cls: type, variant: Mapping[str, Any]) -> str:
    if not variant:
        return layer_cls.__name__
    return f"{layer_cls.__name__}({', '.join(f'{k}={v!r}' for k, v in variant.items())})"


@dataclasses.dataclass
class Choice:
    """The outcome of the family choice for one layer.

    Attributes:
        layer_cls: The chosen class (``None``: the layer stays dense, see ``skip``).
        layer: The fitted layer.
        note: What was chosen and why (for the report).
        skip: Why the layer stays dense.
    """

    layer_cls: type | None
    layer: nn.Module | None
    note: str
    skip: _Skip | None = None


def _options_for(
    layer_cls: type,
    variant: Mapping[str, Any],
    options: Mapping[str, Any],
    layer_options: Mapping[type, Mapping[str, Any]] | None,
    stats: InputStats | None,
) -> Dict[str, Any]:
    """The ``from_dense`` options of one candidate: what its fit accepts of the shared ones."""
    accepted = set(inspect.signature(layer_cls.fit_factors).parameters)
    takes_any = any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(layer_cls.fit_factors).parameters.values()
    )
    chosen = {k: v for k, v in options.items() if takes_any or k in accepted}
    chosen.update((layer_options or {}).get(layer_cls, {}))
    chosen.update(variant)
    if stats is not None and capabilities_of(layer_cls).calibration:
        chosen["calibration"] = stats
    return chosen


def _profile(
    layer_cls: type, module: nn.Module, options: Mapping[str, Any], hedge: bool
) -> RankProfile:
    # Every option that shapes the spectrum: calibration, ridges, variant options.
    accepted = ("calibration",) + capabilities_of(layer_cls).profile_options
    profile_options = {k: v for k, v in options.items() if k in accepted}
    profile = layer_cls.rank_profile(module, **profile_options)
    if hedge and "calibration" in profile_options:
        plain = {k: v for k, v in profile_options.items() if k != "calibration"}
        profile = _hedged(profile, layer_cls.rank_profile(module, **plain))
    return profile


def _pareto(profiles: Sequence[RankProfile]) -> RankProfile:
    """One profile whose candidates are the cheapest-per-error ones of all ``profiles``.

    Candidate ``i`` of the result stands for its parameter count (its ``ranks`` entry);
    ``select_rank`` and ``allocate_budget`` only compare costs and errors.
    """
    pooled = sorted(
        (params, flops, error)
        for profile in profiles
        for params, flops, error in zip(profile.params, profile.flops, profile.errors)
    )
    front: List[Tuple[int, int, float]] = []
    for params, flops, error in pooled:
        if not front or error < front[-1][2] - 1e-12:
            front.append((params, flops, error))
    first = profiles[0]
    return RankProfile(
        ranks=tuple(params for params, _, _ in front),
        params=tuple(params for params, _, _ in front),
        flops=tuple(flops for _, flops, _ in front),
        errors=tuple(error for _, _, error in front),
        dense_params=first.dense_params,
        dense_flops=first.dense_flops,
    )


def _fit_error(module: nn.Module, layer: nn.Module, stats: InputStats | None) -> float:
    """The error families are compared on: weight error, hedged with output error.

    Without statistics: the relative weight error. With an input(-channel) Gram ``G``
    the weight is viewed as ``(out, in, rest)``, the output error is
    ``sqrt(sum_k dW_k G dW_k^T / sum_k W_k G W_k^T)`` (exact for a linear layer, the
    input-channel-whitened kernel error for a convolution), and the comparison uses
    the root mean square of output and weight error, as ``Budget`` does: a Gram of a
    few calibration samples (rank-deficient for wide layers) rewards fits that only
    suit those samples; on EfficientNet-Lite0's classifier, pure output error picked a
    family that agreed less with the dense model on held-out photos.
    """
    with torch.no_grad():
        reference = module.weight.detach().to(torch.float64)
        approximation = layer.dense_weight().detach().to(torch.float64)
        weight_error = float(
            (approximation - reference).norm() / reference.norm().clamp_min(1e-300)
        )
        if stats is None:
            return weight_error
        output_error = relative_output_error(reference, approximation, stats.gram)
        return math.sqrt((output_error**2 + weight_error**2) / 2)


def input_shapes(
    model: nn.Module, fqns: Iterable[str], batches: Iterable[Any] | None
) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """``{fqn: (input shape, dtype)}`` of the named layers on the first batch (no grad)."""
    if batches is None:
        return {}
    batch = next(iter(batches), None)
    if batch is None:
        return {}
    check_batch(batch, 0)
    modules = dict(model.named_modules())
    shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
    handles = []
    for fqn in fqns:

        def hook(module: nn.Module, args: tuple, fqn: str = fqn) -> None:
            if args and isinstance(args[0], torch.Tensor) and fqn not in shapes:
                shapes[fqn] = (tuple(args[0].shape), args[0].dtype)

        handles.append(modules[fqn].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_batch(model, batch, 0)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _speedup(
    module: nn.Module, layer: nn.Module, shape: Tuple[Tuple[int, ...], torch.dtype]
) -> float:
    """Dense time / factorized time at the layer's input shape.

    Medians over 7 interleaved rounds of about 3 ms each, so that load on a shared
    machine hits both sides alike.
    """
    size, dtype = shape
    device = module.weight.device
    x = torch.randn(size, device=device, dtype=dtype)
    medians = interleaved_medians(
        {"dense": lambda: module(x), "factorized": lambda: layer(x)},
        device,
        rounds=7,
        min_round_seconds=0.003,
    )
    return medians["dense"] / medians["factorized"]


# Every family's profile and fit of a layer whiten with the same Gram: one eigh each.
@whitening_cache()
def choose_families(
    targets: List[Tuple[str, nn.Module, type]],
    rank: Any,
    options: Mapping[str, Any],
    layer_options: Mapping[type, Mapping[str, Any]] | None,
    stats: Mapping[str, InputStats],
    sensitivities: List[float] | None,
    shapes: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]],
    min_speedup: float | None,
) -> Dict[str, Choice]:
    """Pick the family and rank of every target (see the module docstring).

    The speed guard runs first: at a target's input shape, each family is timed at the
    rank ``rank`` gives it on its own profile (a freshly initialised layer of that
    structure: timing does not depend on the values); a family slower than the dense
    layer is dropped, and a target left without families stays dense and out of the
    budget.

    Args:
        targets: ``(fqn, module, _)`` of every layer to convert (ties and skips removed).
        rank: A float, :class:`Budget`, ``Energy`` or ``ErrorBound``.
        options: Shared ``from_dense`` options (each candidate gets those it takes).
        layer_options: Per-class options.
        stats: Calibration statistics by name.
        sensitivities: Per-target weights of the budget (``None``: unweighted).
        shapes: Input shapes for the speed guard (a target without one is judged by FLOPs).
        min_speedup: Least speed relative to the dense layer a family must reach at
            the target's input shape (``None``: no speed guard).

    Returns:
        ``{fqn: Choice}``.
    """
    weighted = sensitivities is not None
    hedge = isinstance(rank, Budget) and not weighted
    choices: Dict[str, Choice] = {}
    kept, families, fronts, weights = [], [], [], []
    for index, (fqn, module, _) in enumerate(targets):
        entries, excluded = [], []
        for layer_cls, variant in _candidates(module):
            layer_opts = _options_for(layer_cls, variant, options, layer_options, stats.get(fqn))
            profile = _profile(layer_cls, module, layer_opts, hedge)
            label = _label(layer_cls, variant)
            guarded = fqn in shapes and source_for(module).dense_flops(module) > 0
            if guarded and min_speedup is not None:
                speedup = _speedup(
                    module, _shell(layer_cls, module, rank, profile, layer_opts), shapes[fqn]
                )
                if speedup < min_speedup:
                    excluded.append(f"{label}: {speedup:.2f}x dense speed")
                    continue
            entries.append((label, layer_cls, layer_opts, profile))
        if not entries:
            why = "; ".join(excluded) or "no candidate"
            choices[fqn] = Choice(None, None, "", _Skip(f"auto: every family is slower ({why})"))
            continue
        achieved = [p for _, c, _, p in entries if capabilities_of(c).profile_errors == "achieved"]
        kept.append((fqn, module, excluded))
        families.append(entries)
        fronts.append(_pareto(achieved or [profile for *_, profile in entries]))
        weights.append(None if sensitivities is None else sensitivities[index])
    if isinstance(rank, Budget):
        fronts = [front.saving() for front in fronts]
        if not all(front.ranks for front in fronts):
            fronts = [front if front.ranks else _never(front) for front in fronts]
        picks = allocate_budget(fronts, rank, None if sensitivities is None else weights)
        shares = [None if i is None else front.params[i] for front, i in zip(fronts, picks)]
    elif isinstance(rank, float):
        # The same share for every family: what the float gives a single-family conversion.
        shares = [rank * front.dense_params * (1 + 1e-12) for front in fronts]
    else:
        shares = [front.params[front.ranks.index(select_rank(rank, front))] for front in fronts]
    for (fqn, module, excluded), entries, share in zip(kept, families, shares):
        if share is None:
            choices[fqn] = Choice(None, None, "", _Skip("kept dense by the budget"))
            continue
        choices[fqn] = _best_at_share(fqn, module, entries, share, stats.get(fqn), excluded)
    return choices


def _never(front: RankProfile) -> RankProfile:
    """A one-candidate profile no budget picks (a layer where no candidate saves)."""
    return dataclasses.replace(
        front,
        ranks=(front.dense_params,),
        params=(front.dense_params,),
        flops=(front.dense_flops,),
        errors=(0.0,),
    )


def _shell(
    layer_cls: type, module: nn.Module, rank: Any, profile: RankProfile, options: Mapping[str, Any]
) -> nn.Module:
    """A freshly initialised ``layer_cls`` of the structure ``rank`` gives it (for timing)."""
    return timing_layer(layer_cls, module, select_rank(rank, profile), options)


def timing_layer(
    layer_cls: type, module: nn.Module, spec: Any, options: Mapping[str, Any]
) -> nn.Module:
    """A freshly initialised ``layer_cls`` of the structure ``spec`` gives it for
    ``module``, on its device and dtype: speed does not depend on the values, so no
    decomposition is computed."""
    from .walk import _meta_twin

    structural = {k: v for k, v in options.items() if k != "calibration"}
    shell = layer_cls.from_dense(_meta_twin(module), spec, **structural)
    weight = module.weight
    return layer_cls.from_config(shell.get_config(), device=weight.device, dtype=weight.dtype)


def _best_at_share(
    fqn: str,
    module: nn.Module,
    entries: List[Tuple[str, type, Dict[str, Any], RankProfile]],
    share: float,
    stats: InputStats | None,
    excluded: List[str],
) -> Choice:
    """Fit every family at its largest rank within ``share`` parameters; keep the best."""
    dense_params = _params(module) - (module.bias.numel() if _has_bias(module) else 0)
    dense_flops = source_for(module).dense_flops(module)
    fitted, excluded = [], list(excluded)
    for label, layer_cls, layer_opts, profile in entries:
        within = [i for i, p in enumerate(profile.params) if p <= share]
        if not within:
            excluded.append(f"{label}: no rank within {int(share):,} parameters")
            continue
        spec = profile.ranks[within[-1]]
        try:
            layer = layer_cls.from_dense(module, spec, **layer_opts)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{fqn} ({type(module).__name__}) as {label}: {exc}") from exc
        weights = _params(layer) - (layer.bias.numel() if _has_bias(layer) else 0)
        flops = layer.flops_per_position()
        if weights >= dense_params or (dense_flops > 0 and flops >= dense_flops):
            excluded.append(f"{label}: saves nothing at rank {layer.rank}")
            continue
        fitted.append((_fit_error(module, layer, stats), weights, flops, label, layer_cls, layer))
    if not fitted:
        why = "; ".join(excluded)
        return Choice(None, None, "", _Skip(f"auto: no family saves at this share ({why})"))
    # Equal errors (e.g. a two-core train that is a low-rank matrix): the cheaper wins.
    fitted.sort(key=lambda entry: (round(entry[0], 6), entry[1], entry[2]))
    error, _, _, label, layer_cls, layer = fitted[0]
    kind = "RMS of output and weight" if stats is not None else "weight"
    others = ", ".join(f"{name} {value:.3f}" for value, _, _, name, _, _ in fitted[1:])
    note = f"auto: {label}, {kind} error {error:.3f}" + (f" (vs {others})" if others else "")
    if excluded:
        note += "; excluded " + "; ".join(excluded)
    return Choice(layer_cls, layer, note)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)
