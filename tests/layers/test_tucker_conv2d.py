"""TuckerConv2d and tucker_convnd: exactness against F.conv2d, Tucker-2 fit optimality and
bounds, rank specs and policies (EVBMF on the channel unfoldings), calibration, truncation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import EVBMF, Budget, Energy, ErrorBound, factorize_
from factorized_layers.calibrate import calibrate
from factorized_layers.decompose import hooi, hosvd
from factorized_layers.functional import conv_padding_pairs, tucker_conv_weight, tucker_convnd
from factorized_layers.layers.tucker_conv import (
    TuckerConv2d,
    resolve_tucker2_ranks,
    tucker2_conv_flops,
    tucker2_conv_params,
)
from factorized_layers.ranks import evbmf_rank, select_rank

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def _oracle(layer: TuckerConv2d, x: torch.Tensor) -> torch.Tensor:
    """What nn.Conv2d computes with the layer's dense kernel (padding_mode via F.pad)."""
    weight = layer.dense_weight()
    if layer.padding_mode == "zeros":
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    pads = conv_padding_pairs(layer.padding, layer.kernel_size, layer.dilation, layer.stride)
    padded = F.pad(x, [p for pair in reversed(pads) for p in pair], mode=layer.padding_mode)
    return F.conv2d(padded, weight, layer.bias, layer.stride, 0, layer.dilation)


def _conv(kernel: torch.Tensor, **options) -> nn.Conv2d:
    out_channels, in_channels, kh, kw = kernel.shape
    conv = nn.Conv2d(in_channels, out_channels, (kh, kw), dtype=kernel.dtype, **options)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    return conv


def _unfolding_svdvals(kernel: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the kernel's channel unfolding (independent of the library)."""
    return torch.linalg.svdvals(kernel.double().movedim(mode, 0).reshape(kernel.shape[mode], -1))


def _tail(values: torch.Tensor, rank: int) -> float:
    return float(values[rank:].square().sum())


def _planted_kernel(shape, ranks, noise, seed=0):
    """A kernel of multilinear channel ranks ``ranks`` plus Gaussian noise (float64)."""
    g = torch.Generator().manual_seed(seed)
    out_channels, in_channels, kh, kw = shape
    core = torch.randn(ranks[0], ranks[1], kh, kw, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(out_channels, ranks[0], generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_channels, ranks[1], generator=g, dtype=torch.float64))[0]
    signal = tucker_conv_weight(core, u, v)
    signal = signal / signal.norm() * math.sqrt(signal.numel())
    return signal + noise * torch.randn(shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- forward


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("padding", [0, 1, (1, 2), "same", "valid"], ids=str)
@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (2, 3)], ids=str)
def test_forward_matches_f_conv2d_and_to_dense(kernel_size, padding, padding_mode):
    torch.manual_seed(0)
    for stride in (1, 2):
        if padding == "same" and stride != 1:
            continue
        for dilation, rank in ((1, (4, 3)), (2, (7, 2)), (1, (3, 5))):
            if kernel_size == (1, 1) and rank[0] != rank[1] and rank[0] < 7 and rank[1] < 5:
                rank = (3, 3)  # a 1x1 core needs r_out == r_in unless a mode is folded
            layer = TuckerConv2d(5, 7, kernel_size, rank=rank, stride=stride, padding=padding,
                                 dilation=dilation, padding_mode=padding_mode,
                                 dtype=torch.float64)  # fmt: skip
            dense = layer.to_dense()
            for batch, channels_last in ((1, False), (3, True)):
                x = torch.randn(batch, 5, 11, 12, dtype=torch.float64)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                expected = _oracle(layer, x)
                msg = f"stride={stride} dilation={dilation} rank={rank} cl={channels_last}"
                torch.testing.assert_close(layer(x), expected, msg=msg)
                torch.testing.assert_close(dense(x), expected, msg=msg)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rank", [(4, 3), (7, 3), (4, 5), (7, 5)], ids=str)
def test_folded_modes_bias_and_unbatched_input(rank, channels_last):
    torch.manual_seed(0)
    layer = TuckerConv2d(5, 7, 3, rank=rank, stride=(2, 1), padding=1, padding_mode="reflect",
                         dtype=torch.float64)  # fmt: skip
    assert (layer.out_channel_factor is None) == (rank[0] == 7)
    assert (layer.in_channel_factor is None) == (rank[1] == 5)
    batched = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    if channels_last:
        batched = batched.contiguous(memory_format=torch.channels_last)
    for x in (batched, torch.randn(5, 9, 8, dtype=torch.float64)):
        torch.testing.assert_close(layer(x), _oracle(layer, x))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _oracle(layer, x))


def test_output_memory_format_follows_input_like_nn_conv2d():
    torch.manual_seed(0)
    for rank in ((4, 3), (7, 3), (7, 5)):
        layer = TuckerConv2d(5, 7, 3, rank=rank, padding=1)
        dense = layer.to_dense()
        x = torch.randn(2, 5, 8, 8)
        for value in (x, x.contiguous(memory_format=torch.channels_last)):
            out, reference = layer(value), dense(value)
            assert out.is_contiguous() == reference.is_contiguous()
            cl = torch.channels_last
            assert out.is_contiguous(memory_format=cl) == reference.is_contiguous(memory_format=cl)


def test_functional_kernel_in_1d_and_3d_and_bad_arguments():
    g = torch.Generator().manual_seed(3)
    out, inp = torch.randn(6, 3, generator=g).double(), torch.randn(4, 2, generator=g).double()
    core1, core3 = torch.randn(3, 2, 3).double(), torch.randn(3, 2, 3, 2, 3).double()
    bias = torch.randn(6).double()
    x1 = torch.randn(2, 4, 10).double()
    expected = F.conv1d(F.pad(x1, (1, 1), mode="circular"), tucker_conv_weight(core1, out, inp),
                        bias, stride=2)  # fmt: skip
    got = tucker_convnd(x1, core1, out, inp, bias, stride=2, padding=1, padding_mode="circular")
    torch.testing.assert_close(got, expected)
    x3 = torch.randn(4, 5, 6, 7).double()
    expected = F.conv3d(x3, tucker_conv_weight(core3, out, inp), bias, padding="same")
    torch.testing.assert_close(tucker_convnd(x3, core3, out, inp, bias, padding="same"), expected)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 4, \*spatial\)"):
        tucker_convnd(torch.randn(2, 5, 10).double(), core1, out, inp)
    with pytest.raises(TypeError, match="bias dtype torch.float32 differs"):
        tucker_convnd(x1, core1, out, inp, bias.float())
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        tucker_convnd(x1, core1, out, inp, padding_mode="mirror")
    with pytest.raises(ValueError, match="core must be"):
        tucker_convnd(x1, torch.randn(3, 2).double(), out, inp)


def test_compile_fullgraph_channels_last_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = TuckerConv2d(6, 10, 3, rank=(5, 3), padding=1, stride=2)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled(x), layer(x))
    layer(x).square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_low_precision_forward_follows_the_float32_oracle():
    torch.manual_seed(0)
    layer = TuckerConv2d(8, 12, 3, rank=(6, 4), padding=1)
    x = torch.randn(2, 8, 9, 9)
    expected = _oracle(layer, x)
    for dtype in (torch.bfloat16, torch.float16):
        low = copy.deepcopy(layer).to(dtype)
        got = low(x.to(dtype)).float()
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)


# --------------------------------------------------------------------------- fit


@pytest.mark.parametrize(
    "shape, ranks",
    [((12, 8, 3, 3), (5, 3)), ((16, 6, 5, 3), (9, 4)), ((10, 10, 1, 1), (4, 4)),
     ((24, 16, 3, 3), (7, 11))],
    ids=str,
)  # fmt: skip
def test_hooi_error_between_the_unfolding_bounds_and_at_most_hosvd(shape, ranks):
    torch.manual_seed(0)
    kernel = torch.randn(shape, dtype=torch.float64)
    conv = _conv(kernel)
    fitted = TuckerConv2d.from_dense(conv, ranks)
    started = TuckerConv2d.from_dense(conv, ranks, n_iter=0)
    # Independent oracles: a Tucker-2 kernel's channel unfoldings have ranks <= (r_out,
    # r_in), so Eckart-Young bounds the error below by each unfolding's tail; the truncated
    # HOSVD error is at most the root of the summed tails (De Lathauwer et al. 2000).
    tails = [_tail(_unfolding_svdvals(kernel, k), r) for k, r in enumerate(ranks)]
    norm2 = float(kernel.square().sum())
    lower, upper = math.sqrt(max(tails) / norm2), math.sqrt(sum(tails) / norm2)
    assert lower - 1e-12 <= fitted.fit_error <= started.fit_error + 1e-12
    assert started.fit_error <= upper + 1e-12
    # HOSVD as torch.linalg.svd computes it: leading left singular vectors of each unfolding.
    bases = [
        torch.linalg.svd(kernel.movedim(k, 0).reshape(shape[k], -1))[0][:, :r]
        for k, r in enumerate(ranks)
    ]
    core = torch.einsum("oihw,oa,ib->abhw", kernel, *bases)
    hosvd_error = float((tucker_conv_weight(core, *bases) - kernel).norm()) / math.sqrt(norm2)
    assert started.fit_error == pytest.approx(hosvd_error, rel=1e-9, abs=1e-12)
    # The fit error is the layer's own kernel error, and the factors are orthonormal.
    measured = float((fitted.dense_weight().detach() - kernel).norm()) / math.sqrt(norm2)
    assert fitted.fit_error == pytest.approx(measured, rel=1e-9)
    for factor in (fitted.out_channel_factor, fitted.in_channel_factor):
        eye = torch.eye(factor.shape[1], dtype=factor.dtype)
        torch.testing.assert_close(factor.T @ factor, eye)


def test_hooi_sweeps_are_the_decompose_hooi_of_the_three_way_kernel():
    torch.manual_seed(1)
    kernel = torch.randn(20, 12, 3, 3, dtype=torch.float64)
    layer = TuckerConv2d.from_dense(_conv(kernel), (6, 5), n_iter=7, tol=0.0)
    reference = hooi(kernel.reshape(20, 12, 9), (6, 5, 9), n_iter=7, tol=0.0)
    assert layer.fit_info["n_iter"] == reference.n_iter
    assert layer.fit_error == pytest.approx(reference.error, rel=1e-9)
    assert hosvd(kernel.reshape(20, 12, 9), (6, 5, 9)).error >= reference.error


def test_error_decreases_with_rank_and_full_rank_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, padding=1, dtype=torch.float64)
    ranks = [(min(2 * k, 20), k) for k in range(1, 13)]
    errors = [TuckerConv2d.from_dense(conv, r).fit_error for r in ranks]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12
    for full in ((20, 12), 20, 1.0):
        layer = TuckerConv2d.from_dense(conv, full)
        assert layer.rank == (20, 12) and layer.fit_error == 0.0
        assert layer.in_channel_factor is None and layer.out_channel_factor is None
        assert set(layer.state_dict()) == {"core", "bias"}
        x = torch.randn(2, 12, 7, 7, dtype=torch.float64)
        torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-13)


def test_planted_multilinear_rank_is_recovered():
    kernel = _planted_kernel((16, 12, 3, 3), (5, 3), noise=0.0)
    layer = TuckerConv2d.from_dense(_conv(kernel), (5, 3))
    assert layer.fit_error < 1e-10
    assert TuckerConv2d.from_dense(_conv(kernel), (4, 3)).fit_error > 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_sources_are_fitted_in_float32(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    low = nn.Conv2d(16, 24, 3, padding=1, dtype=dtype)
    with torch.no_grad():
        low.weight.copy_(conv.weight)
        low.bias.copy_(conv.bias)
    layer = TuckerConv2d.from_dense(low, (10, 6))
    assert all(p.dtype == dtype for p in layer.parameters())
    reference = TuckerConv2d.from_dense(_conv(low.weight.detach().float()), (10, 6))
    assert layer.fit_error == pytest.approx(reference.fit_error, rel=1e-4)
    assert torch.isfinite(layer(torch.randn(2, 16, 6, 6, dtype=dtype))).all()


def test_meta_source_gives_a_meta_layer_without_computing():
    with torch.device("meta"):
        conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
    for rank in (0.3, (8, 16), 32):
        layer = TuckerConv2d.from_dense(conv, rank, calibration=torch.eye(16))
        assert all(p.device.type == "meta" for p in layer.parameters())
        assert layer.fit_error is None
        assert layer(torch.empty(2, 16, 9, 9, device="meta")).shape == (2, 32, 5, 5)
        assert layer.truncated(4).rank == (4, 4)
    with pytest.raises(ValueError, match="needs the weight's values"):
        TuckerConv2d.from_dense(conv, EVBMF())


def test_non_finite_kernel_raises_value_error():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\) out of 108"):
        TuckerConv2d.from_dense(conv, 2)


# --------------------------------------------------------------------------- ranks


def test_rank_specs_and_cost_arithmetic():
    assert resolve_tucker2_ranks(0.25, 128, 64, (3, 3)) == (49, 24)
    assert resolve_tucker2_ranks(1.0, 128, 64, (3, 3)) == (128, 64)
    assert resolve_tucker2_ranks(100, 128, 64, (3, 3)) == (100, 64)
    assert resolve_tucker2_ranks([32, 16], 128, 64, (3, 3)) == (32, 16)
    # A factored rank above other rank x kernel positions is useless: clipped.
    assert resolve_tucker2_ranks(8, 8, 3, (1, 1)) == (8, 3)
    assert resolve_tucker2_ranks(5, 8, 6, (1, 1)) == (5, 5)
    for fraction in (0.05, 0.1, 0.25, 0.5, 0.9):
        ranks = resolve_tucker2_ranks(fraction, 96, 40, (3, 3))
        assert tucker2_conv_params(96, 40, (3, 3), ranks) <= fraction * 96 * 40 * 9
        bigger = tuple(r + 1 for r in ranks)
        assert tucker2_conv_params(96, 40, (3, 3), bigger) > fraction * 96 * 40 * 9
    layer = TuckerConv2d(40, 96, 3, rank=0.25, stride=2)
    stored = sum(p.numel() for name, p in layer.named_parameters() if name != "bias")
    assert stored == tucker2_conv_params(96, 40, (3, 3), layer.rank)
    r_out, r_in = layer.rank
    assert layer.flops_per_position() == 40 * r_in * 4 + r_in * r_out * 9 + r_out * 96
    assert tucker2_conv_flops(96, 40, (3, 3), (96, 40)) == 96 * 40 * 9


@pytest.mark.parametrize(
    "rank, error, match",
    [
        (0, ValueError, r"an int rank must be >= 1"),
        ((0, 3), ValueError, r"r_out must be in \[1, 8\] \(the channel count\), got 0"),
        ((3, 7), ValueError, r"r_in must be in \[1, 6\] \(the channel count\), got 7"),
        ((1, 5), ValueError, r"r_in=5 is larger than the core allows.*\[1, 4\]"),
        ((2, 3, 1), ValueError, r"a rank pair is \(r_out, r_in\): two ints, got 3"),
        (0.0, ValueError, r"fraction of parameters in \(0, 1\], got 0.0"),
        (1e-4, ValueError, r"valid fractions are in \[0\.\d+, 1\]"),
        ((2.0, 3), TypeError, r"r_out must be an int, got float"),
        (True, TypeError, r"got bool True"),
        ("half", TypeError, r"got str 'half'"),
    ],
    ids=str,
)
def test_bad_rank_raises_naming_value_and_range(rank, error, match):
    with pytest.raises(error, match=match):
        TuckerConv2d(6, 8, (2, 2), rank=rank)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 2}, "supports groups=1 only, got groups=2"),
        ({"padding_mode": "mirror"}, "padding_mode must be one of"),
        ({"padding": "same", "stride": 2}, "padding='same' is not supported for strided"),
        ({"padding": "full"}, "padding must be 'same', 'valid', an int or a tuple"),
        ({"kernel_size": (3, 3, 3)}, r"kernel_size must be an int or a tuple of 2 ints"),
        ({"in_channels": 0}, "in_channels must be a positive integer, got 0"),
    ],
    ids=str,
)
def test_bad_constructor_arguments_raise_value_error(kwargs, match):
    arguments = dict(in_channels=6, out_channels=8, kernel_size=3, rank=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TuckerConv2d(**arguments)


def test_grouped_source_and_wrong_module_are_rejected():
    with pytest.raises(ValueError, match="groups=2: grouped/depthwise convolutions stay"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 8, 3, groups=2), 2)
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        TuckerConv2d.from_dense(nn.Conv1d(4, 8, 3), 2)


# --------------------------------------------------------------------------- policies


def test_evbmf_policy_keeps_the_evbmf_ranks_of_both_channel_unfoldings():
    kernel = _planted_kernel((32, 24, 3, 3), (9, 5), noise=0.3)
    conv = _conv(kernel)
    expected = []
    for mode, (rows, cols) in enumerate(((32, 24 * 9), (24, 32 * 9))):
        values = _unfolding_svdvals(kernel, mode)
        found = evbmf_rank(values.tolist(), rows, cols, float(kernel.square().sum()))
        expected.append(max(1, found))
    assert tuple(expected) == (9, 5)  # the planted multilinear ranks
    profile = TuckerConv2d.rank_profile(conv)
    assert select_rank(EVBMF(), profile) == (9, 5)
    assert TuckerConv2d.from_dense(conv, EVBMF()).rank == (9, 5)
    # The other mode's ratio holds below the EVBMF pair; min_rank raises the larger rank.
    assert TuckerConv2d.from_dense(conv, EVBMF(min_rank=12)).rank[0] >= 12


def test_rank_profile_errors_are_achieved_upper_bounds_and_policies_meet_them():
    torch.manual_seed(0)
    conv = _conv(_planted_kernel((24, 16, 3, 3), (8, 6), noise=0.5, seed=2))
    profile = TuckerConv2d.rank_profile(conv)
    assert profile.ranks[-1] == (24, 16) and profile.errors[-1] == pytest.approx(0.0, abs=1e-6)
    assert list(profile.params) == sorted(profile.params)
    assert all(p < profile.dense_params for p in profile.params[:-1])
    for i in range(0, len(profile.ranks), 3):
        ranks = profile.ranks[i]
        fitted = TuckerConv2d.from_dense(conv, ranks)
        hosvd_fit = TuckerConv2d.from_dense(conv, ranks, n_iter=0)
        assert hosvd_fit.fit_error == pytest.approx(profile.errors[i], rel=1e-5, abs=1e-7)
        assert fitted.fit_error <= profile.errors[i] + 1e-7
        assert profile.params[i] == tucker2_conv_params(24, 16, (3, 3), ranks)
    for bound in (0.6, 0.4, 0.2):
        layer = TuckerConv2d.from_dense(conv, ErrorBound(bound))
        assert layer.fit_error <= bound
    layer = TuckerConv2d.from_dense(conv, Energy(0.9))
    assert layer.fit_error <= math.sqrt(0.1)
    for fraction in (0.2, 0.5):
        layer = TuckerConv2d.from_dense(conv, Budget(params=fraction))
        assert tucker2_conv_params(24, 16, (3, 3), layer.rank) <= fraction * 24 * 16 * 9


# --------------------------------------------------------------------------- calibration


def _correlated_images(count, channels, live, seed=0, size=8):
    """Images whose channel vectors lie near a fixed ``live``-dimensional subspace."""
    mixing = torch.randn(
        channels, live, generator=torch.Generator().manual_seed(1234), dtype=torch.float64
    )
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(count, live, size, size, generator=g, dtype=torch.float64)
    noise = 0.05 * torch.randn(count, channels, size, size, generator=g, dtype=torch.float64)
    return torch.einsum("cl,nlhw->nchw", mixing, latent) + noise


def _output_error(layer, dense, x):
    with torch.no_grad():
        reference = F.conv2d(x, dense.weight, None, dense.stride, dense.padding)
        return float((layer(x) - dense(x)).norm() / reference.norm())


@pytest.mark.parametrize("ranks, factor", [((6, 3), 0.85), ((10, 4), 0.7), ((16, 6), 0.4)], ids=str)
def test_calibration_lowers_the_output_error_on_correlated_inputs(ranks, factor):
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 24, 3, padding=1, dtype=torch.float64)
    train, held_out = (_correlated_images(32, 16, live=5, seed=s) for s in (0, 1))
    stats = calibrate(nn.Sequential(dense), [train])["0"]
    calibrated = TuckerConv2d.from_dense(dense, ranks, calibration=stats)
    plain = TuckerConv2d.from_dense(dense, ranks)
    # Measured 0.73/0.93, 0.54/0.88, 0.28/0.79 on both sets.
    for x in (train, held_out):
        assert _output_error(calibrated, dense, x) < factor * _output_error(plain, dense, x)
    # The whitened metric is the output error on the calibration data up to the borders
    # (zero padding) and spatial correlations, which these images do not have.
    weighted = calibrated.fit_info["weighted_error"]
    assert weighted == pytest.approx(_output_error(calibrated, dense, train), abs=0.02)
    assert "weighted_error" not in plain.fit_info
    # fit_error stays the kernel's error, which the calibrated fit trades away.
    with torch.no_grad():
        measured = float((calibrated.dense_weight() - dense.weight).norm() / dense.weight.norm())
    assert calibrated.fit_error == pytest.approx(measured, rel=1e-9)
    assert calibrated.fit_error >= plain.fit_error


def test_calibrated_profile_is_the_hosvd_of_the_whitened_kernel():
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 24, 3, padding=1, dtype=torch.float64)
    x = _correlated_images(32, 16, live=3)
    gram = torch.einsum("nchw,ndhw->cd", x, x)
    profile = TuckerConv2d.rank_profile(dense, calibration=gram)
    # Oracle: whiten the input channels by the (normalised) Gram's root, then the
    # truncated HOSVD of the two channel modes by torch.linalg.svd.
    normalized = gram / gram.diagonal().mean()
    values, vectors = torch.linalg.eigh(normalized)
    root = vectors * (values.clamp_min(0) + 1e-6).sqrt()
    whitened = torch.einsum("oihw,ij->ojhw", dense.weight.detach(), root)
    for ranks, error in list(zip(profile.ranks, profile.errors))[::4]:
        bases = [
            torch.linalg.svd(whitened.movedim(k, 0).reshape(whitened.shape[k], -1))[0][:, :r]
            for k, r in enumerate(ranks)
        ]
        core = torch.einsum("oihw,oa,ib->abhw", whitened, *bases)
        expected = float((tucker_conv_weight(core, *bases) - whitened).norm() / whitened.norm())
        assert error == pytest.approx(expected, rel=1e-6, abs=1e-9), ranks
    # Three live input directions: a calibrated error target needs few input ranks.
    calibrated = TuckerConv2d.from_dense(dense, ErrorBound(0.3), calibration=gram)
    plain = TuckerConv2d.from_dense(dense, ErrorBound(0.3))
    assert calibrated.fit_info["weighted_error"] <= 0.3 + 1e-4
    assert calibrated.rank[1] < plain.rank[1]


def test_factorize_converts_conv2d_with_tucker_calibrated_and_by_policy():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2)
    )
    x = torch.randn(4, 8, 12, 12)
    reference = model(x)
    report = factorize_(model, 0.5, layers={nn.Conv2d: TuckerConv2d}, calibration=[x])
    assert all(isinstance(m, TuckerConv2d) for m in (model[0], model[2]))
    assert model(x).shape == reference.shape and len(report.layers) == 2
    other = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    factorize_(other, EVBMF(), layers={nn.Conv2d: TuckerConv2d}, allow_larger=True)
    assert isinstance(other[0], TuckerConv2d)


def test_checkpoint_round_trip_and_truncate_on_a_converted_model(tmp_path):
    from factorized_layers import load_factorized, save_factorized, truncate_

    def build():
        return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3))

    torch.manual_seed(0)
    model = build()
    factorize_(model, 6, layers={nn.Conv2d: TuckerConv2d})
    x = torch.randn(2, 8, 7, 7)
    for name in ("model.pt", "model.safetensors"):
        save_factorized(model, tmp_path / name)
        fresh = load_factorized(build(), tmp_path / name)
        assert isinstance(fresh[0], TuckerConv2d) and fresh[0].rank == (6, 6)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    truncate_(model, 3)
    assert model[0].rank == (3, 3) and model[2].rank == (3, 3)
    assert torch.isfinite(model(x)).all()


# --------------------------------------------------------------------------- truncation


def test_truncated_is_hooi_of_the_own_kernel_also_after_fine_tuning():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, padding=1, dtype=torch.float64)
    layer = TuckerConv2d.from_dense(conv, (12, 8))
    with torch.no_grad():  # "fine-tuning": factors no longer orthonormal
        layer.out_channel_factor.mul_(1.5).add_(0.1)
        layer.in_channel_factor.add_(0.2)
        layer.core.mul_(0.7)
    small = layer.truncated((5, 4), n_iter=10, tol=0.0)
    kernel = layer.dense_weight().detach()
    reference = hooi(kernel.reshape(20, 12, 9), (5, 4, 9), n_iter=10, tol=0.0)
    assert small.fit_error == pytest.approx(reference.error, rel=1e-8)
    measured = float((small.dense_weight().detach() - kernel).norm() / kernel.norm())
    assert small.fit_error == pytest.approx(measured, rel=1e-8)
    assert small.fit_info["truncated_from"] == (12, 8)
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(small(x), _oracle(small, x))
    # Ranks above the current ones keep them; a folded mode can be truncated.
    assert layer.truncated((20, 12)).rank == (12, 8)
    full = TuckerConv2d.from_dense(conv, (20, 12))
    half = full.truncated((10, 12))
    assert half.in_channel_factor is None and half.out_channel_factor.shape == (20, 10)
    expected = TuckerConv2d.from_dense(conv, (10, 12), n_iter=30, tol=1e-6).fit_error
    assert half.fit_error == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- module recipe


def test_reset_parameters_matches_nn_conv2d_variance():
    torch.manual_seed(0)
    for rank in ((20, 12), (64, 12), (20, 48)):
        weights = torch.cat(
            [TuckerConv2d(48, 64, 3, rank=rank).dense_weight().detach().flatten()
             for _ in range(6)]
        )  # fmt: skip
        expected = 1.0 / (3 * 48 * 9)
        assert weights.var().item() == pytest.approx(expected, rel=0.08), rank
    layer = TuckerConv2d(48, 64, 3, rank=4)
    bound = 1 / math.sqrt(48 * 9)
    assert layer.bias.abs().max() <= bound


def test_from_dense_keeps_options_bias_and_names_factors():
    conv = nn.Conv2d(6, 10, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                     padding_mode="replicate")  # fmt: skip
    layer = TuckerConv2d.from_dense(conv, (4, 3))
    assert (layer.stride, layer.padding, layer.dilation, layer.padding_mode) == (
        (2, 1), (1, 0), (1, 2), "replicate"
    )  # fmt: skip
    assert set(dict(layer.named_parameters())) == {
        "core", "out_channel_factor", "in_channel_factor", "bias"
    }  # fmt: skip
    assert layer.core.shape == (4, 3, 3, 2)
    text = repr(layer)
    assert "rank=(4, 3)" in text and "padding_mode='replicate'" in text
    assert "dilation=(1, 2)" in text and "stride=(2, 1)" in text
    torch.testing.assert_close(layer.to_dense().weight, layer.dense_weight(), rtol=0, atol=0)
