"""The registry of factorized layer classes: what each replaces and what it can do.

A family registers its layer class where the class is defined::

    @register_layer
    class SVDLinear(FactorizedLayer):
        source = LinearSource()
        capabilities = Capabilities(calibration=True, rank_profile=True, ...)

:func:`~factorized_layers.convert.factorize_`, :func:`~factorized_layers.convert.truncate_`
and :func:`~factorized_layers.checkpoint.load_factorized` know layer classes only
through this registry and the declared :class:`Capabilities`; nothing is guessed from
signatures at conversion time. Registration refuses a class that misses a piece of the
contract it declares, and a second class under an already registered name (plans name
classes by name), with an error that says what is wrong.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, List, Tuple

__all__ = ["Capabilities", "register_layer", "registered_layers", "capabilities_of"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a factorized layer class supports beyond the core contract.

    Attributes:
        calibration: ``from_dense`` takes ``calibration=`` (input statistics) and fits
            the output error on that data.
        rank_profile: ``rank_profile(module, ...)`` exists, so rank policies
            (``Energy``, ``ErrorBound``, ``EVBMF``, ``Budget``) and ``multiple_of`` work.
        truncation: ``truncated(rank, ...)`` re-decomposes the layer's own factors.
        ridge_option: Name of the ``from_dense`` option holding the whitening ridge
            (sequential calibration tunes it), or ``None``.
        profile_options: ``from_dense`` options that ``rank_profile`` also takes (they
            shape the spectrum the policy sees).
        truncation_options: Options ``truncated`` takes besides the rank.
        profile_errors: ``"achieved"`` when ``from_dense`` at a profile's candidate
            reaches or beats the error the profile gives (exact optima, upper bounds),
            ``"lower_bound"`` when the profile only bounds it from below (an
            estimate). ``factorize_(..., layers="auto")`` sizes layers on achieved
            errors only.
    """

    calibration: bool = False
    rank_profile: bool = False
    truncation: bool = False
    ridge_option: str | None = None
    profile_options: Tuple[str, ...] = ()
    truncation_options: Tuple[str, ...] = ()
    profile_errors: str = "achieved"

    def __post_init__(self) -> None:
        if self.profile_errors not in ("achieved", "lower_bound"):
            raise ValueError(
                "Capabilities profile_errors must be 'achieved' or 'lower_bound', got "
                f"{self.profile_errors!r}"
            )


_REQUIRED = (
    "from_dense",
    "to_dense",
    "dense_weight",
    "flops_per_position",
    "get_config",
    "from_config",
)

_SOURCES: Dict[type, Tuple[type, ...]] = {}
"""Factorized layer class -> dense module types it can be built from."""


def _parameters(function) -> List[str]:
    return list(inspect.signature(function).parameters)


def _contract_errors(layer_cls: type, capabilities: Capabilities) -> List[str]:
    """What ``layer_cls`` misses of the contract it declares (empty when complete)."""
    errors = [f"no {name}()" for name in _REQUIRED if not callable(getattr(layer_cls, name, None))]
    errors += [
        f"{name}() not implemented"
        for name in sorted(getattr(layer_cls, "__abstractmethods__", ()))
    ]
    fit = getattr(layer_cls, "fit_factors", None)
    accepted = set(_parameters(fit)) if callable(fit) else set()
    if capabilities.calibration and "gram" not in accepted:
        errors.append("declares calibration but its fit_factors takes no gram=")
    if capabilities.ridge_option and capabilities.ridge_option not in accepted:
        errors.append(
            f"declares ridge_option {capabilities.ridge_option!r}, not an option of fit_factors"
        )
    profile = getattr(layer_cls, "rank_profile", None)
    if capabilities.rank_profile:
        if not callable(profile):
            errors.append("declares rank_profile but has no rank_profile()")
        else:
            missing = set(capabilities.profile_options) - set(_parameters(profile))
            if missing:
                errors.append(f"rank_profile() does not take {sorted(missing)}")
    if capabilities.truncation:
        truncate = getattr(layer_cls, "truncate_factors", None)
        if not callable(truncate):
            errors.append("declares truncation but has no truncate_factors()")
        else:
            missing = set(capabilities.truncation_options) - set(_parameters(truncate))
            if missing:
                errors.append(f"truncate_factors() does not take {sorted(missing)}")
    return errors


def capabilities_of(layer_cls: type) -> Capabilities:
    """The declared :class:`Capabilities` of a class (none declared: all off)."""
    declared = getattr(layer_cls, "capabilities", None)
    return declared if isinstance(declared, Capabilities) else Capabilities()


def register_layer(layer_cls: type, *source_types: type) -> type:
    """Register ``layer_cls`` as a factorized layer built from ``source_types``.

    Use it as a class decorator (the source type then comes from the class's
    ``source`` adapter) or call it with explicit source types. Registering the same
    class again with the same sources changes nothing.

    Args:
        layer_cls: The factorized layer class: ``from_dense``, ``to_dense``,
            ``dense_weight``, ``flops_per_position``, ``get_config``, ``from_config``,
            plus what its ``capabilities`` (:class:`Capabilities`) declare.
        *source_types: Dense module types ``from_dense`` accepts (default: the type of
            ``layer_cls.source``).

    Returns:
        ``layer_cls`` (so it works as a decorator).

    Raises:
        TypeError: ``layer_cls`` is not a class, no source type is known, or the class
            misses a piece of the contract.
        ValueError: Another class is registered under the same name, or this class
            with other source types.

    Examples:
        >>> import torch.nn as nn
        >>> from factorized_layers import SVDLinear
        >>> register_layer(SVDLinear, nn.Linear) is SVDLinear
        True
    """
    if not isinstance(layer_cls, type):
        raise TypeError(f"register_layer expects a class, got {layer_cls!r}")
    if not source_types:
        source = getattr(layer_cls, "source", None)
        if source is None:
            raise TypeError(
                f"register_layer({layer_cls.__name__}) needs source types: pass them, or give "
                "the class a `source` adapter (factorized_layers.sources)"
            )
        source_types = (source.module_type,)
    for source_type in source_types:
        if not isinstance(source_type, type):
            raise TypeError(f"register_layer source types must be classes, got {source_type!r}")
    errors = _contract_errors(layer_cls, capabilities_of(layer_cls))
    if errors:
        raise TypeError(
            f"{layer_cls.__name__} does not fulfil the layer contract: {'; '.join(errors)}"
        )
    registered = _SOURCES.get(layer_cls)
    if registered is not None and registered != tuple(source_types):
        raise ValueError(
            f"{layer_cls.__name__} is already registered for "
            f"{[t.__name__ for t in registered]}, not {[t.__name__ for t in source_types]}"
        )
    for other in _SOURCES:
        if other is not layer_cls and other.__name__ == layer_cls.__name__:
            raise ValueError(
                f"a class named {layer_cls.__name__!r} is already registered "
                f"({other.__module__}); checkpoint plans name classes by name, so give "
                "the new class another name"
            )
    _SOURCES[layer_cls] = tuple(source_types)
    return layer_cls


def registered_layers() -> Dict[type, Tuple[type, ...]]:
    """A copy of the registry: factorized layer class -> dense types it replaces.

    Examples:
        >>> from factorized_layers import SVDLinear
        >>> registered_layers()[SVDLinear]
        (<class 'torch.nn.modules.linear.Linear'>,)
    """
    return dict(_SOURCES)
