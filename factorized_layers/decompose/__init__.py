"""Pure tensor decompositions (no ``nn``): the numerical core behind every ``from_dense``.

One module per family or algorithm:

* :mod:`~factorized_layers.decompose.svd` -- truncated SVD of matrices (full or
  randomized), balanced low-rank factors, the Eckart--Young tail error, the output
  error on calibration data, and rank reduction of factored matrices;
* :mod:`~factorized_layers.decompose.whiten` -- whitening by calibration Grams (roots,
  their cache, one tensor mode) and the whitened (SVD-LLM) truncation of matrices;
* :mod:`~factorized_layers.decompose.tucker` -- mode products, HOSVD, HOOI, the
  output-error-aware Tucker fit with its per-mode whitening, and Tucker rank reduction;
* :mod:`~factorized_layers.decompose.tt` -- TT-SVD of tensorized matrices, TT-rounding,
  bond spectra and the per-input-mode whitened TT-SVD;
* :mod:`~factorized_layers.decompose.cp_format` -- the CP format (container,
  Khatri--Rao product, reconstruction) and the MTTKRP contractions;
* :mod:`~factorized_layers.decompose.cp` -- CP-ALS, its data-aware variant and CP
  rank reduction;
* :mod:`~factorized_layers.decompose.als` -- the units an ALS fit is made of:
  regularised normal-equation update, stop rule, momentum step, degeneracy guard,
  ridge raising, option checks;
* :mod:`~factorized_layers.decompose._common` -- input checks, compute dtype,
  seeding, Gram normalisation and eigen-roots.

Imports run one way: ``_common`` <- ``svd`` <- ``tucker`` <- ``whiten`` <- ``cp``
(which also uses ``als`` and ``cp_format``).

Conventions shared by every function here:

* computation happens on the input's device, in float32 -- or float64 when the
  input is float64 or ``compute_dtype=torch.float64`` is asked for -- and results
  are cast back to the input's dtype;
* NaN/Inf input raises ``ValueError`` instead of producing garbage factors;
* meta-device input returns meta tensors of the right shapes without computing;
* randomized algorithms are reproducible from ``seed`` (or a ``torch.Generator``)
  and leave the global random state untouched.
"""

from . import whiten
from .cp import cp_als, cp_factors, reduce_cp, whitened_cp_factors
from .cp_format import CPDecomposition, cp_to_tensor, khatri_rao
from .svd import (
    TruncatedSVD,
    choose_svd_method,
    low_rank_factors,
    reduce_low_rank,
    relative_output_error,
    svd_tail_error,
    truncated_svd,
)
from .tt import (
    TTDecomposition,
    allocate_tt_svd_ranks,
    tt_core_spectra,
    tt_round,
    tt_spectra,
    tt_svd,
    tt_tensor,
    tt_to_matrix,
    whiten_tt_inputs,
    whitened_tt_svd,
)
from .tucker import (
    TuckerDecomposition,
    hooi,
    hosvd,
    hosvd_energy,
    mode_dot,
    mode_grams,
    reduce_tucker,
    tucker_to_tensor,
    whiten_input_modes,
    whitened_tucker,
)
from .whiten import (
    whiten_mode,
    whitened_low_rank_factors,
    whitened_singular_values,
    whitening_root,
)

# Public, though not in ``__all__`` (as in the single-module ``decompose``): the
# whitening cache and the normalised roots that sequential calibration shares.
whitening_cache = whiten.whitening_cache
normalized_whitening_eig = whiten.normalized_whitening_eig
normalized_whitening_root = whiten.normalized_whitening_root

__all__ = [
    "whitening_root",
    "whitened_singular_values",
    "whitened_low_rank_factors",
    "relative_output_error",
    "TruncatedSVD",
    "truncated_svd",
    "low_rank_factors",
    "svd_tail_error",
    "choose_svd_method",
    "CPDecomposition",
    "cp_als",
    "cp_factors",
    "cp_to_tensor",
    "khatri_rao",
    "whiten_mode",
    "whitened_cp_factors",
    "reduce_low_rank",
    "reduce_tucker",
    "reduce_cp",
    "TuckerDecomposition",
    "mode_dot",
    "tucker_to_tensor",
    "hosvd",
    "hosvd_energy",
    "hooi",
    "mode_grams",
    "whiten_input_modes",
    "whitened_tucker",
    "TTDecomposition",
    "allocate_tt_svd_ranks",
    "tt_tensor",
    "tt_spectra",
    "tt_svd",
    "tt_round",
    "tt_core_spectra",
    "tt_to_matrix",
    "whiten_tt_inputs",
    "whitened_tt_svd",
]
