import pytest
from hypothesis import given
from hypothesis import strategies as st

from factorized_layers.ranks import low_rank_params, resolve_matrix_rank


@given(rows=st.integers(1, 5000), cols=st.integers(1, 5000), fraction=st.floats(1e-6, 1.0))
def test_float_rank_is_largest_within_budget(rows, cols, fraction):
    rank = resolve_matrix_rank(fraction, rows, cols)
    assert 1 <= rank <= min(rows, cols)
    budget = fraction * rows * cols
    if rank > 1:
        assert low_rank_params(rows, cols, rank) <= budget * (1 + 1e-9)
    if rank < min(rows, cols):
        assert low_rank_params(rows, cols, rank + 1) > budget


def test_int_rank_bounds_and_types():
    assert resolve_matrix_rank(3, 10, 4) == 3
    assert resolve_matrix_rank(1.0, 10, 4) == 2  # 2 * 14 <= 40 < 3 * 14
    with pytest.raises(ValueError, match=r"\[1, 4\] = \[1, min\(10, 4\)\], got 5"):
        resolve_matrix_rank(5, 10, 4)
    with pytest.raises(ValueError, match="rows must be a positive integer, got 0"):
        resolve_matrix_rank(1, 0, 4)
    with pytest.raises(TypeError, match="bool"):
        resolve_matrix_rank(False, 10, 4)
