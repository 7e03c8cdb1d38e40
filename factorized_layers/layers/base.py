"""The layer contract: :class:`FactorizedLayer` owns what every family shares.

A family (``SVDLinear``, ``TuckerLinear``, ``CPConv1d/2d/3d`` ...) writes only

- its constructor (parameters named by role, ``reset_parameters``) and ``forward``
  (decorated with :func:`names_bad_input`, so input errors name the layer),
- ``fit_factors`` (classmethod: dense weight -> :class:`Fit`), ``dense_weight``,
  ``flops_per_position``, ``get_config``, ``plain_rank`` (a rank spec from shapes),
- optionally ``rank_profile`` and ``truncate_factors``, declared in ``capabilities``,

and sets ``source`` (the :mod:`~factorized_layers.sources` adapter of the dense type it
replaces). The base class runs the shared skeleton around them: ``from_dense`` (check
the source, resolve a rank policy on the profile, fit under ``no_grad``, build the shell
on meta, wrap the factors as parameters with the source's ``requires_grad``, copy the
bias, keep the mode), ``truncated``, ``to_dense`` and ``from_config``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
from typing import Any, Callable, ClassVar, Dict, Mapping, Union

import torch
import torch.nn as nn

from ..calibrate import InputStats
from ..ranks import POLICY_TYPES, RankProfile, select_rank
from ..registry import Capabilities
from ..sources import SourceAdapter, attach_prelude, copied_parameter

__all__ = [
    "FactorizedLayer",
    "Fit",
    "Calibration",
    "gram_of",
    "fast_parameter",
    "names_bad_input",
    "input_problem",
]

_MISSING = object()

Calibration = Union[InputStats, torch.Tensor, None]
"""What ``calibration=`` accepts: input statistics, their Gram matrix, or nothing."""


@dataclasses.dataclass
class Fit:
    """What a family's fit computed: the layer's structure and its parameter values.

    Attributes:
        config: Constructor arguments of the layer (``get_config()`` form).
        factors: Parameter name -> value (in the compute dtype; cast by the base). A
            name absent here keeps the shell's ``None`` (e.g. a folded mode).
        attributes: Plain attributes to set on the built layer (fit reports).
    """

    config: Dict[str, Any]
    factors: Dict[str, torch.Tensor]
    attributes: Dict[str, Any] = dataclasses.field(default_factory=dict)


def fast_parameter(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)`` without ``nn.Module.__getattr__`` for plain parameters.

    ``__getattr__`` costs about a microsecond per name, which shows at batch 1. A name
    that is not in ``_parameters`` (a parametrization, or FSDP's plain-tensor swap)
    falls back to ``getattr``.
    """
    value = module._parameters.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def names_bad_input(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a layer's ``forward``: an input that does not fit raises an error naming
    the layer and what it expects.

    Costs nothing on a good input: the input is examined only once the kernel has
    failed. If the input's shape, dtype and device are right the kernel's own error
    propagates unchanged. Wrong shape or device -> ``ValueError``; wrong dtype (outside
    autocast) -> ``TypeError``; like ``nn.Linear``, the message gives both shapes.
    """

    @functools.wraps(forward)
    def checked(self: nn.Module, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        try:
            return forward(self, input, *args, **kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as error:
            problem = input_problem(self, input)
            if problem is None:
                raise
            raise problem from error

    return checked


def input_problem(layer: nn.Module, input: Any) -> Exception | None:
    """The error to raise for ``input`` to ``layer``, or ``None`` if it fits."""
    name = f"{type(layer).__name__}({layer.extra_repr()})"
    if not isinstance(input, torch.Tensor):
        return TypeError(f"{name}: expected a torch.Tensor input, got {type(input).__name__}")
    adapter: SourceAdapter = type(layer).source
    tensors = list(layer.parameters()) + list(layer.buffers())
    got = f"got shape {tuple(input.shape)}, dtype {input.dtype} on {input.device}"
    if tensors and input.device != tensors[0].device:
        return ValueError(f"{name}: expected an input on {tensors[0].device}, {got}")
    # A layer whose weights are all buffers (int8 inference) takes any float dtype.
    weight = next((p for p in layer.parameters() if p.is_floating_point()), None)
    if not adapter.float_input and input.dtype not in (torch.long, torch.int):
        return TypeError(f"{name}: expected torch.long or torch.int indices, got {input.dtype}")
    if adapter.float_input and not input.is_floating_point():
        return TypeError(f"{name}: expected a floating-point input, {got}")
    if adapter.float_input and weight is not None and input.dtype != weight.dtype:
        if not torch.is_autocast_enabled(input.device.type):
            return TypeError(f"{name}: expected input of dtype {weight.dtype}, {got}")
    if not adapter.input_fits(layer, input):
        return ValueError(f"{name}: expected input of shape {adapter.expected_input(layer)}, {got}")
    return None


def gram_of(calibration: Calibration) -> torch.Tensor | None:
    """The input Gram matrix of a ``calibration=`` argument (``None`` stays ``None``)."""
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    if isinstance(calibration, InputStats):
        return calibration.gram
    raise TypeError(
        "calibration must be InputStats (from factorized_layers.calibrate.calibrate) or a "
        f"Gram matrix tensor, got {type(calibration).__name__}"
    )


def _parameter_like(value: torch.Tensor, dtype: torch.dtype, source: torch.Tensor) -> nn.Parameter:
    """``value`` cast to ``dtype`` as a contiguous parameter, trainable when ``source`` is."""
    return nn.Parameter(value.to(dtype).contiguous(), requires_grad=source.requires_grad)


class FactorizedLayer(nn.Module, abc.ABC):
    """Base class of every factorized layer; see the module docstring for the contract.

    Class attributes a family sets:
        source: The :class:`~factorized_layers.sources.SourceAdapter` of the dense type.
        capabilities: The :class:`~factorized_layers.registry.Capabilities` it declares.
    """

    source: ClassVar[SourceAdapter]
    capabilities: ClassVar[Capabilities] = Capabilities()
    bias: torch.Tensor | None

    # -- what a family writes -------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def fit_factors(cls, module: nn.Module, rank: Any, **options: Any) -> Fit:
        """The factors of ``module``'s weight at the concrete ``rank`` (under ``no_grad``)."""

    @classmethod
    def plain_rank(cls, module: nn.Module, spec: Any) -> Any:
        """A plain (``int``/``float``/tuple) rank spec made concrete from shapes alone."""
        return spec

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be converted (``None`` when it can)."""
        return None

    def dynamic_int8(self) -> nn.Module | None:
        """An inference module computing this layer with int8 activations and factors.

        ``None`` (the default) when the family has no int8 GEMM schedule; then
        :func:`~factorized_layers.quantize.quantize_` stores the factors as int8 and
        computes in floating point instead.
        """
        return None

    @abc.abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The weight the factors represent (differentiable)."""

    @abc.abstractmethod
    def flops_per_position(self) -> int:
        """Multiply-accumulates per output position (token or pixel), bias excluded."""

    @abc.abstractmethod
    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this layer's structure (JSON-serialisable)."""

    # -- the shared skeleton --------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        rank: Any,
        *,
        calibration: Calibration = None,
        **options: Any,
    ) -> FactorizedLayer:
        """A factorized layer fitted to a trained dense ``module`` (left unchanged).

        The decomposition runs under ``no_grad`` on the weight's device in float32
        (float64 for float64 weights or with ``compute_dtype=torch.float64`` where the
        family takes it), the factors are cast back to the weight's dtype and are
        trainable exactly when the weight is, the bias is copied (a bias-free source
        gives a bias-free layer) and the ``training`` flag is kept. A meta-device
        source gives a meta-device layer without computing anything.

        Args:
            module: The trained dense module (a subclass of the family's source type).
            rank: A rank spec (``int``, ``float`` fraction of the parameters, or the
                family's own form) or a rank policy (``Energy``, ``ErrorBound``,
                ``EVBMF``, ``Budget``) evaluated on ``rank_profile``.
            calibration: ``InputStats`` of the module's inputs (from
                :func:`~factorized_layers.calibrate.calibrate`) or their Gram matrix:
                the factors then minimise the output error on that data. Only for
                families whose ``capabilities.calibration`` is set.
            **options: The keyword options of the family's :meth:`fit_factors`.

        Raises:
            TypeError: A source of the wrong type, an option the family does not take,
                or calibration for a family without it.
            ValueError: A source the family cannot convert, a bad rank, a rank policy
                on a meta-device source.
        """
        cls.source.check(module, cls.__name__)
        reason = cls.source.unsupported_reason(module) or cls.unsupported_reason(module)
        if reason is not None:
            raise ValueError(
                f"{cls.__name__} cannot convert this {type(module).__name__}: {reason}"
            )
        gram = gram_of(calibration)
        fit_options = cls._fit_options(options, gram)
        concrete = cls._resolve_rank(module, rank, gram, options)
        with torch.no_grad():
            fit = cls.fit_factors(module, concrete, **fit_options)
        weight = module.weight
        layer = cls._assemble(fit, weight.dtype, lambda name: weight)
        layer = cls._finish(layer, getattr(module, "bias", None), fit, module.training)
        return attach_prelude(layer, cls.source.prelude(module))

    def truncated(self, rank: Any, **options: Any) -> FactorizedLayer:
        """A lower-rank copy computed from this layer's own factors (never a dense weight).

        Device, dtype, bias, ``requires_grad`` flags and ``training`` are kept.

        Args:
            rank: As the constructor's ``rank``; a rank above the current one keeps it.
            **options: The options of the family's ``truncate_factors``
                (``capabilities.truncation_options``).
        """
        capabilities = type(self).capabilities
        if not capabilities.truncation:
            raise TypeError(f"{type(self).__name__} does not support truncated()")
        unknown = sorted(set(options) - set(capabilities.truncation_options))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.truncated got unknown option(s) {unknown}; "
                f"valid: {sorted(capabilities.truncation_options)}"
            )
        with torch.no_grad():
            fit = self.truncate_factors(rank, **options)
        parameters = dict(self.named_parameters(recurse=False))
        reference = next(iter(parameters.values()))
        layer = type(self)._assemble(
            fit, reference.dtype, lambda name: parameters.get(name, reference)
        )
        layer = type(self)._finish(layer, self.bias, fit, self.training)
        return attach_prelude(layer, self._modules.get("input_prelude"))

    def to_dense(self) -> nn.Module:
        """The dense module computing the same function, on the same device and dtype."""
        return type(self).source.rebuild(self, self.dense_weight().detach())

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> FactorizedLayer:
        """A freshly initialised layer with the structure ``config`` (from ``get_config()``).

        ``config`` may come through a file, so a non-mapping, non-string keys or
        arguments the constructor does not take raise ``TypeError``; bad values raise
        the constructor's own ``ValueError``.

        Args:
            config: The layer's ``get_config()`` (possibly through JSON).
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
            raise TypeError(
                f"{cls.__name__}.from_config expects a dict with str keys, got {config!r}"
            )
        options = dict(config)
        settings = {name: options.pop(name) for name in cls._settings() if name in options}
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "device", "dtype"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_config got unknown argument(s) {unknown}; "
                f"valid: {sorted(accepted | set(cls._settings()))}"
            )
        layer = cls(**options, device=device, dtype=dtype)
        for name, value in settings.items():
            layer._apply_setting(name, value)
        return layer

    # -- hooks of the skeleton ------------------------------------------------------

    @classmethod
    def _settings(cls) -> tuple:
        """``get_config`` entries that are attributes set after construction."""
        return ()

    def _apply_setting(self, name: str, value: Any) -> None:
        """Validate and set one of :meth:`_settings` (from a config)."""
        raise TypeError(f"{type(self).__name__} has no setting {name!r}")

    @classmethod
    def _fit_options(cls, options: Dict[str, Any], gram: torch.Tensor | None) -> Dict[str, Any]:
        """The keyword arguments of :meth:`fit_factors`, checked against its signature."""
        parameters = inspect.signature(cls.fit_factors).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        accepted = set(parameters) - {"cls", "module", "rank", "gram"}
        unknown = sorted(set(options) - accepted)
        if unknown and not takes_any:
            raise TypeError(
                f"{cls.__name__}.from_dense got unknown option(s) {unknown}; "
                f"valid: {sorted(accepted)}"
            )
        if gram is None:
            return dict(options)
        if not cls.capabilities.calibration:
            raise TypeError(f"{cls.__name__}.from_dense takes no calibration")
        return dict(options, gram=gram)

    @classmethod
    def _resolve_rank(
        cls, module: nn.Module, spec: Any, gram: torch.Tensor | None, options: Dict[str, Any]
    ) -> Any:
        """A concrete rank: a policy is evaluated on the profile, a plain spec on shapes."""
        if not isinstance(spec, POLICY_TYPES):
            return cls.plain_rank(module, spec)
        if not cls.capabilities.rank_profile:
            raise TypeError(f"{cls.__name__} has no rank profile; rank {spec!r} needs one")
        if module.weight.device.type == "meta":
            raise ValueError(
                f"rank policy {spec!r} needs the weight's values; a meta-device "
                f"{type(module).__name__} accepts only an int or float rank"
            )
        profile_options = {
            name: options[name] for name in cls.capabilities.profile_options if name in options
        }
        profile: RankProfile = cls.rank_profile(module, calibration=gram, **profile_options)
        return select_rank(spec, profile)

    @classmethod
    def _assemble(cls, fit: Fit, dtype: torch.dtype, trainable_source) -> FactorizedLayer:
        """The shell built on meta from ``fit.config`` with ``fit.factors`` as parameters."""
        layer = cls.from_config(fit.config, device="meta", dtype=dtype)
        for name, value in fit.factors.items():
            setattr(layer, name, _parameter_like(value, dtype, trainable_source(name)))
        return layer

    @classmethod
    def _finish(
        cls, layer: FactorizedLayer, bias: torch.Tensor | None, fit: Fit, training: bool
    ) -> FactorizedLayer:
        """Copy the bias, set the fit's attributes and the ``training`` mode."""
        if bias is not None:
            layer.bias = copied_parameter(bias)
        for name, value in fit.attributes.items():
            setattr(layer, name, value)
        return layer.train(training)
