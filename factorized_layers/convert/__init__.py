"""Whole-model conversion: ``factorize_``, ``unfactorize_`` and ``truncate_``, with a report.

``factorize_`` walks a model, picks the layers to convert (types, filters, name
patterns), chooses their ranks (a spec or policy per layer, or a global
:class:`~factorized_layers.ranks.Budget`), replaces them in place with
``layer_cls.from_dense`` and returns a :class:`FactorizationReport`. It knows the layer
classes only through the registry (:mod:`factorized_layers.registry`) and the source
adapters (:mod:`factorized_layers.sources`).

Modules: :mod:`.api` (the public functions), :mod:`.walk` (selecting and swapping
modules), :mod:`.plan` (ranks, calibration statistics and report rows, decided
before the model changes), :mod:`.report` (the report).
"""

from ..layers import default_layers
from ..registry import register_layer, registered_layers
from .api import factorize_, truncate_, unfactorize_
from .report import FactorizationReport, LayerReport

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
