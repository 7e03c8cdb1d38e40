"""Stateless forward kernels of the factorized layers.

Each kernel takes the input and the layer's factors and returns what the dense
layer would, without ever materialising the dense weight unless the planned
contraction order says that is cheaper. One module per family:

- :mod:`~factorized_layers.functional.svd`: :func:`svd_linear` and its schedule
  choice :func:`svd_linear_input_first`.
- :mod:`~factorized_layers.functional.tucker`: :class:`TuckerPlan` /
  :func:`tucker_plan`, :func:`tucker_linear`, :func:`tucker_dense_weight` and the
  schedule model (:func:`tucker_schedule_costs`, :func:`tucker_linear_input_first`,
  :func:`tucker_linear_equation`).
- :mod:`~factorized_layers.functional.cp`: :func:`cp_convnd` / :func:`cp_conv2d`,
  :func:`cp_conv_separable`, :func:`cp_merged_kernel`.
- :mod:`~factorized_layers.functional.tucker_conv`: :func:`tucker_convnd` /
  :func:`tucker_conv2d` (Tucker-2 convolutions), :func:`tucker_conv_weight`.
- :mod:`~factorized_layers.functional.svd_conv`: :func:`svd_conv2d` (channel or spatial
  low-rank convolution as two convolutions) and its option split :func:`svd_conv2d_plan`.
- :mod:`~factorized_layers.functional.tt`: :func:`tt_linear` (TT-matrix layers, core by
  core), :func:`tt_dense_weight`, :func:`tt_plan` / :func:`tt_schedule`.
- :mod:`~factorized_layers.functional._conv`: convolution argument handling shared by
  every convolution family (:func:`conv_tuple`, :func:`conv_padding_pairs`,
  ``PADDING_MODES``, output sizes, padding in ``padding_mode``).
"""

from . import _conv
from . import svd as _svd
from ._conv import conv_padding_pairs, conv_tuple
from .cp import cp_conv2d, cp_conv_separable, cp_convnd, cp_merged_kernel
from .svd import svd_linear, svd_linear_input_first
from .svd_conv import svd_conv2d, svd_conv2d_plan
from .tt import TTPlan, tt_dense_weight, tt_linear, tt_plan, tt_schedule
from .tucker import (
    TuckerPlan,
    tucker_dense_weight,
    tucker_linear,
    tucker_linear_equation,
    tucker_linear_input_first,
    tucker_plan,
    tucker_schedule_costs,
)
from .tucker_conv import tucker_conv2d, tucker_conv_weight, tucker_convnd

__all__ = [
    "svd_linear",
    "svd_linear_input_first",
    "svd_conv2d",
    "svd_conv2d_plan",
    "TuckerPlan",
    "tucker_plan",
    "tucker_schedule_costs",
    "tucker_linear",
    "tucker_dense_weight",
    "tucker_linear_equation",
    "tucker_linear_input_first",
    "conv_padding_pairs",
    "conv_tuple",
    "cp_conv2d",
    "cp_conv_separable",
    "cp_convnd",
    "cp_merged_kernel",
    "tucker_conv2d",
    "tucker_conv_weight",
    "tucker_convnd",
    "TTPlan",
    "tt_dense_weight",
    "tt_linear",
    "tt_plan",
    "tt_schedule",
]

# Public names of the old module outside ``__all__`` (the layers import the first two
# from here), still importable from the package.
PADDING_MODES = _conv.PADDING_MODES
check_linear_input = _svd.check_linear_input
SVD_LINEAR_EQUATION = _svd.SVD_LINEAR_EQUATION
