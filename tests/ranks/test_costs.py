from hypothesis import given
from hypothesis import strategies as st

from factorized_layers.ranks import (
    dense_linear_flops,
    low_rank_break_even,
    low_rank_linear_flops,
    low_rank_params,
)


@given(rows=st.integers(1, 3000), cols=st.integers(1, 3000))
def test_break_even_is_largest_rank_that_saves(rows, cols):
    r = low_rank_break_even(rows, cols)
    assert low_rank_params(rows, cols, r) < rows * cols
    assert low_rank_params(rows, cols, r + 1) >= rows * cols


def test_flop_counts():
    assert dense_linear_flops(1536, 384, 8) == 8 * 1536 * 384
    assert low_rank_linear_flops(1536, 384, 10, 8) == 8 * 10 * (1536 + 384)
