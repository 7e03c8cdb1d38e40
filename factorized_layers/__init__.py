"""factorized_layers: tensor-decomposed drop-in layers for PyTorch.

Layers store only cores and factor matrices, run their forward passes as planned
contractions, and are built from trained dense layers with ``from_dense``.
Importing this package does not initialise CUDA and changes no global state.
"""

from . import contract, decompose, functional, ranks, schedule
from .calibrate import InputStats, calibrate
from .checkpoint import factorization_plan, load_factorized, save_factorized
from .convert import FactorizationReport, LayerReport, factorize_, truncate_, unfactorize_
from .decompose import TruncatedSVD, low_rank_factors, truncated_svd
from .distill import DistillReport, distill_
from .export import OnnxExport, export_onnx, export_program
from .layers import (
    CPConv1d,
    CPConv2d,
    CPConv3d,
    DynamicInt8SVDLinear,
    FactorizedLayer,
    SVDConv2d,
    SVDEmbedding,
    SVDLinear,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)
from .quantize import QuantizationReport, quantize_
from .ranks import EVBMF, Budget, Energy, ErrorBound, RankProfile, RankSpec, resolve_matrix_rank
from .registry import Capabilities, register_layer, registered_layers
from .schedule import measured_schedules, set_measured_schedules
from .sequential import Sequential

__version__ = "0.1.0"

__all__ = [
    "CPConv1d",
    "CPConv2d",
    "CPConv3d",
    "DynamicInt8SVDLinear",
    "FactorizedLayer",
    "Capabilities",
    "registered_layers",
    "SVDEmbedding",
    "SVDConv2d",
    "SVDLinear",
    "TTLinear",
    "TuckerConv2d",
    "TuckerLinear",
    "factorize_",
    "calibrate",
    "Sequential",
    "distill_",
    "DistillReport",
    "export_onnx",
    "export_program",
    "OnnxExport",
    "quantize_",
    "QuantizationReport",
    "InputStats",
    "unfactorize_",
    "truncate_",
    "save_factorized",
    "load_factorized",
    "factorization_plan",
    "register_layer",
    "FactorizationReport",
    "LayerReport",
    "Energy",
    "ErrorBound",
    "EVBMF",
    "Budget",
    "RankProfile",
    "RankSpec",
    "TruncatedSVD",
    "contract",
    "decompose",
    "functional",
    "low_rank_factors",
    "ranks",
    "resolve_matrix_rank",
    "schedule",
    "measured_schedules",
    "set_measured_schedules",
    "truncated_svd",
]
