import pytest
import torch

from factorized_layers.decompose import (
    choose_svd_method,
    low_rank_factors,
    svd_tail_error,
    truncated_svd,
)


def _matrix(rows, cols, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=dtype)


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_singular_values_match_linalg(method):
    w = _matrix(80, 50)
    U, S, Vh = truncated_svd(w, 10, method=method, n_iter=6)
    reference = torch.linalg.svdvals(w)[:10]
    torch.testing.assert_close(S, reference, rtol=2e-2 if method == "randomized" else 1e-10, atol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(10, dtype=w.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(10, dtype=w.dtype), atol=1e-10, rtol=0)


def test_low_precision_inputs_are_upcast_and_cast_back(device):
    w = _matrix(40, 30, dtype=torch.float32).to(device)
    for dtype in (torch.float16, torch.bfloat16):
        U, S, Vh = truncated_svd(w.to(dtype), 5)
        assert U.dtype == S.dtype == Vh.dtype == dtype
        assert U.device.type == device
        torch.testing.assert_close(
            S.float(), torch.linalg.svdvals(w.to(dtype).float())[:5], rtol=1e-2, atol=0
        )


def test_compute_dtype_float64_on_request():
    w = _matrix(30, 20, dtype=torch.float32)
    B, A = low_rank_factors(w, 20, compute_dtype=torch.float64)
    assert B.dtype == torch.float32
    torch.testing.assert_close(B @ A, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="compute_dtype must be torch.float32 or torch.float64"):
        truncated_svd(w, 3, compute_dtype=torch.float16)


def test_meta_input_returns_meta_shapes():
    w = torch.empty(300, 200, device="meta", dtype=torch.bfloat16)
    U, S, Vh = truncated_svd(w, 0.5)
    rank = 60
    assert (U.shape, S.shape, Vh.shape) == ((300, rank), (rank,), (rank, 200))
    assert U.device.type == "meta" and U.dtype == torch.bfloat16


def test_auto_method_rule():
    assert choose_svd_method(4096, 4096, 512, 51) == "randomized"
    assert choose_svd_method(384, 384, 48, 10) == "full"
    assert choose_svd_method(1536, 384, 76, 10) == "full"
    assert choose_svd_method(2048, 1024, 400, 40) == "full"


def test_generator_gives_reproducible_randomized_results():
    w = _matrix(600, 600, dtype=torch.float32)
    first = truncated_svd(w, 20, method="randomized", generator=torch.Generator().manual_seed(1))
    again = truncated_svd(w, 20, method="randomized", generator=torch.Generator().manual_seed(1))
    assert torch.equal(first.U, again.U)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "qr"}, ValueError, "method must be one of"),
        ({"n_iter": -1}, ValueError, "n_iter must be a non-negative integer, got -1"),
        ({"oversample": -2}, ValueError, "oversample must be a non-negative integer, got -2"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        truncated_svd(_matrix(10, 8), 2, **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(2, 3, 4\)"):
        truncated_svd(torch.randn(2, 3, 4), 1)
    with pytest.raises(TypeError, match="floating-point"):
        truncated_svd(torch.ones(3, 3, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        truncated_svd([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        low_rank_factors(torch.randn(3, 3), 1, niter=2)


def test_tail_error():
    assert svd_tail_error(torch.tensor([4.0, 3.0]), 1) == pytest.approx(0.6)
    assert svd_tail_error(torch.zeros(3), 1) == 0.0


def test_randomized_path_is_seeded_and_leaves_device_rng_alone(device):
    w = _matrix(700, 600, dtype=torch.float32).to(device)
    rng_state = torch.cuda.get_rng_state() if device == "cuda" else torch.random.get_rng_state()
    first = truncated_svd(w, 16, method="randomized", seed=7)
    after = torch.cuda.get_rng_state() if device == "cuda" else torch.random.get_rng_state()
    assert torch.equal(rng_state, after)
    assert torch.equal(first.U, truncated_svd(w, 16, method="randomized", seed=7).U)
    assert first.U.device.type == device
    optimum = svd_tail_error(torch.linalg.svdvals(w.double()), 16)
    approx = (first.U * first.S) @ first.Vh
    assert float((approx - w).norm() / w.norm()) <= 1.01 * optimum


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_finiteness_check_survives_a_sum_that_overflows_and_counts_exactly(dtype):
    from factorized_layers.decompose._common import _check_finite, all_finite

    big = torch.full((300, 300), torch.finfo(dtype).max / 2, dtype=dtype)
    assert all_finite(big)  # the sum overflows, the values do not
    _check_finite(big, "weight")
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensor = torch.zeros(2_100_000, dtype=dtype)  # more than one chunk of 2**20
        tensor[[5, 1_500_000]] = bad
        assert not all_finite(tensor)
        with pytest.raises(ValueError, match="contains 2 NaN/Inf value"):
            _check_finite(tensor, "weight")
