"""SVDConv2d and svd_conv2d: exactness against F.conv2d, Eckart--Young and whitened optimality,
rank policies, truncation, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from factorized_layers import (
    EVBMF,
    Budget,
    Energy,
    ErrorBound,
    SVDConv2d,
    SVDLinear,
    calibrate,
    factorize_,
)
from factorized_layers.decompose import whitened_low_rank_factors
from factorized_layers.functional import conv_padding_pairs, svd_conv2d, svd_conv2d_plan

MODES = ["channel", "spatial"]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
PADDINGS = [0, 1, (1, 2), "same", "valid"]
KERNELS = [(1, 1), (3, 3), (5, 3), (4, 2), (3, 1), (1, 3)]


def _oracle(conv_like, weight: torch.Tensor, x: torch.Tensor, bias=None) -> torch.Tensor:
    """What nn.Conv2d computes with ``weight`` and ``conv_like``'s options (padding via F.pad)."""
    if conv_like.padding_mode == "zeros":
        return F.conv2d(x, weight, bias, conv_like.stride, conv_like.padding, conv_like.dilation)
    pads = conv_padding_pairs(
        conv_like.padding, conv_like.kernel_size, conv_like.dilation, conv_like.stride
    )
    flat = [p for pair in reversed(pads) for p in pair]
    padded = F.pad(x, flat, mode=conv_like.padding_mode)
    return F.conv2d(padded, weight, bias, conv_like.stride, 0, conv_like.dilation)


def _dense(in_channels, out_channels, kernel_size, seed=0, **options) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(in_channels, out_channels, kernel_size, dtype=torch.float64, **options)


def _matrix(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The reshaped kernel of each mode, written independently of the layer's own helper.

    Channel: ``(C_out, C_in kH kW)``. Spatial: the papers' ``(C_in kH, C_out kW)`` with
    entry ``[(c, h), (o, w)] = W[o, c, h, w]``.
    """
    out_channels, in_channels, kh, kw = weight.shape
    if mode == "channel":
        return weight.reshape(out_channels, -1)
    return weight.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)


def _full_rank(conv: nn.Conv2d, mode: str) -> int:
    return min(_matrix(conv.weight, mode).shape)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


# --------------------------------------------------------------------------- forward


# The oracle's own F.conv2d(padding='same') warns about even kernels; the layer pads with F.pad.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kernel_size", KERNELS, ids=str)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_forward_matches_f_conv2d_and_to_dense(mode, padding_mode, kernel_size):
    torch.manual_seed(0)
    for padding in PADDINGS:
        for stride in ((1, 1), (2, 1), (1, 2), (2, 3)):
            if padding == "same" and stride != (1, 1):
                continue
            for dilation in ((1, 1), (2, 1), (1, 2)):
                layer = SVDConv2d(
                    5,
                    7,
                    kernel_size,
                    rank=3,
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    padding_mode=padding_mode,
                    dtype=torch.float64,
                    mode=mode,
                )
                dense = layer.to_dense()
                batched = torch.randn(3, 5, 11, 12, dtype=torch.float64)
                inputs = (
                    batched,
                    batched.contiguous(memory_format=torch.channels_last),
                    batched[0],
                )
                for x in inputs:
                    msg = f"padding={padding} stride={stride} dilation={dilation} {x.shape}"
                    expected = _oracle(layer, layer.dense_weight(), x, layer.bias)
                    torch.testing.assert_close(layer(x), expected, msg=msg)
                    torch.testing.assert_close(dense(x), expected, msg=msg)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_full_rank_reproduces_the_dense_conv_with_every_option(mode, padding_mode):
    options = [
        dict(stride=(2, 3), padding=(1, 2), dilation=(2, 1)),
        dict(stride=1, padding="same", dilation=(1, 2)),
        dict(stride=(1, 2), padding="valid", dilation=1),
        dict(stride=3, padding=2, dilation=2),
    ]
    for kernel_size in ((3, 3), (4, 5), (2, 1), (1, 1)):
        for opts in options:
            dense = _dense(6, 4, kernel_size, padding_mode=padding_mode, **opts)
            layer = SVDConv2d.from_dense(dense, _full_rank(dense, mode), mode=mode)
            x = torch.randn(2, 6, 13, 14, dtype=torch.float64)
            torch.testing.assert_close(layer(x), dense(x), msg=f"{kernel_size} {opts}")


@given(
    in_channels=st.integers(1, 5),
    out_channels=st.integers(1, 5),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    padding_mode=st.sampled_from(PADDING_MODES),
    mode=st.sampled_from(MODES),
    bias=st.booleans(),
)
def test_full_rank_is_exact_property(
    in_channels, out_channels, kh, kw, sh, sw, dh, dw, ph, pw, padding_mode, mode, bias
):
    dense = _dense(
        in_channels, out_channels, (kh, kw), stride=(sh, sw), padding=(ph, pw),
        dilation=(dh, dw), padding_mode=padding_mode, bias=bias,
    )  # fmt: skip
    layer = SVDConv2d.from_dense(dense, _full_rank(dense, mode), mode=mode)
    x = torch.randn(2, in_channels, 10, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x))


def test_functional_svd_conv2d_matches_the_layer_and_infers_the_split():
    torch.manual_seed(0)
    for mode in MODES:
        layer = SVDConv2d(4, 6, (3, 5), rank=3, stride=(2, 2), padding=(1, 2), mode=mode,
                          padding_mode="replicate", dtype=torch.float64)  # fmt: skip
        x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
        out = svd_conv2d(x, layer.input_factor, layer.output_factor, layer.bias, layer.stride,
                         layer.padding, layer.dilation, layer.padding_mode)  # fmt: skip
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


def test_plan_splits_height_and_width_options():
    plan = svd_conv2d_plan((4, 3), padding="same", dilation=(1, 2), padding_mode="reflect",
                           width_on_second=True)  # fmt: skip
    # 'same' with an even kernel pads (1, 2) in height: in F.pad before the first step.
    assert plan.first_pad == (0, 0, 1, 2) and plan.first_padding == (0, 0)
    assert plan.second_pad == (2, 2, 0, 0) and plan.pad_mode == "reflect"
    assert plan.first_dilation == (1, 1) and plan.second_dilation == (1, 2)
    zeros = svd_conv2d_plan((3, 3), stride=2, padding=1)
    assert zeros.first_pad is None and zeros.first_padding == (1, 1)
    assert zeros.first_stride == (2, 2) and zeros.second_stride == (1, 1)


def test_forward_runs_two_convolutions_and_never_the_dense_kernel(monkeypatch):
    layer = SVDConv2d(8, 16, 3, rank=4, padding=1, mode="spatial")
    monkeypatch.setattr(SVDConv2d, "dense_weight", lambda self: pytest.fail("dense kernel"))
    calls = []
    original = F.conv2d

    def counting(input, weight, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return original(input, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counting)
    layer(torch.randn(2, 8, 6, 6))
    assert calls == [(4, 8, 3, 1), (16, 4, 1, 3)]


# --------------------------------------------------------------------------- costs


@pytest.mark.parametrize("mode", MODES)
def test_flops_per_position_counts_the_forward_multiply_adds(mode):
    # Input width a multiple of the stride: the kH x 1 step's columns are exactly s_W
    # per output pixel.
    for kernel_size, stride in (((3, 3), (1, 1)), ((3, 5), (2, 2)), ((1, 1), (1, 2))):
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
        layer = SVDConv2d(6, 10, kernel_size, rank=4, stride=stride, padding=padding, mode=mode)
        x = torch.randn(2, 6, 12, 12)
        with FlopCounterMode(display=False) as counter:
            out = layer(x)
        pixels = out.shape[0] * out.shape[2] * out.shape[3]
        assert counter.get_total_flops() // 2 == layer.flops_per_position() * pixels
        stored = layer.input_factor.numel() + layer.output_factor.numel()
        profile = SVDConv2d.rank_profile(layer.to_dense(), mode=mode)
        assert profile.params[3] == stored
        assert profile.flops[3] == layer.flops_per_position()
        assert profile.dense_flops == profile.dense_params == 6 * 10 * math.prod(kernel_size)


# --------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (5, 3)], ids=str)
def test_kernel_error_is_the_eckart_young_optimum(mode, kernel_size):
    dense = _dense(12, 10, kernel_size)
    weight = dense.weight.detach()
    singular_values = torch.linalg.svdvals(_matrix(weight, mode))
    profile = SVDConv2d.rank_profile(dense, mode=mode)
    for rank in (1, 3, len(singular_values) // 2, len(singular_values)):
        layer = SVDConv2d.from_dense(dense, rank, mode=mode)
        error = _relative(layer.dense_weight().detach(), weight)
        optimum = float(singular_values[rank:].norm() / singular_values.norm())
        assert error == pytest.approx(optimum, abs=1e-10)
        assert profile.errors[rank - 1] == pytest.approx(optimum, abs=1e-10)
    assert profile.spectrum == pytest.approx(singular_values.tolist())


def test_spatial_mode_beats_channel_mode_on_a_separable_kernel():
    # W[o, i, h, w] = sum_r a[r, i, h] b[o, r, w] with r = 2: spatial rank 2 is exact,
    # while the channel view of the same kernel has a larger rank.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    b = torch.randn(9, 2, 3, generator=g, dtype=torch.float64)
    dense = _dense(8, 9, 3, padding=1)
    with torch.no_grad():
        dense.weight.copy_(torch.einsum("rih,orw->oihw", a, b))
    spatial = SVDConv2d.from_dense(dense, 2, mode="spatial")
    channel = SVDConv2d.from_dense(dense, 2, mode="channel")
    assert _relative(spatial.dense_weight(), dense.weight) < 1e-12
    assert _relative(channel.dense_weight(), dense.weight) > 0.1


def test_1x1_conv_equals_svd_linear_on_the_same_matrix():
    dense = _dense(24, 16, 1, stride=2)
    linear = nn.Linear(24, 16, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(dense.weight[:, :, 0, 0])
    x = _correlated_inputs(24, seed=1)
    gram = _channel_gram(x)
    for calibration in (None, gram):
        for mode in MODES:
            conv = SVDConv2d.from_dense(dense, 5, mode=mode, calibration=calibration)
            reference = SVDLinear.from_dense(linear, 5, calibration=calibration)
            torch.testing.assert_close(conv.dense_weight()[:, :, 0, 0], reference.dense_weight())


def _correlated_inputs(channels: int, seed: int = 0, images: int = 64, size: int = 8):
    """Inputs whose channels are strongly correlated (a few latent factors plus noise) and
    whose positions are independent, so the patch Gram is close to ``G kron I``."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(3, channels, generator=g, dtype=torch.float64)
    latent = torch.randn(images, size, size, 3, generator=g, dtype=torch.float64)
    noise = 0.05 * torch.randn(images, size, size, channels, generator=g, dtype=torch.float64)
    return (latent @ mixing + noise).permute(0, 3, 1, 2).contiguous()


def _channel_gram(x: torch.Tensor) -> torch.Tensor:
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return rows.T @ rows


def _output_error(layer: nn.Module, dense: nn.Conv2d, x: torch.Tensor) -> float:
    reference = _oracle(dense, dense.weight, x)
    return _relative(_oracle(dense, layer.dense_weight(), x), reference)


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_whitened_1x1_is_the_exact_output_optimum_and_beats_plain_svd(rank):
    dense = _dense(16, 20, 1)
    x = _correlated_inputs(16)
    gram = _channel_gram(x)
    plain = SVDConv2d.from_dense(dense, rank)
    whitened = SVDConv2d.from_dense(dense, rank, calibration=gram, ridge=0.0)
    # Independent optimum: ||(W - W') X|| over rank-r W' is the tail of the singular
    # values of W L with L L^T = X^T X (Cholesky of the Gram, never used by the layer).
    weight = dense.weight.detach()[:, :, 0, 0]
    root = torch.linalg.cholesky(gram)
    values = torch.linalg.svdvals(weight @ root)
    optimum = float(values[rank:].norm() / values.norm())
    assert _output_error(whitened, dense, x) == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    # Three latent channel factors: from rank 3 on the whitened fit is near exact.
    assert _output_error(whitened, dense, x) < 0.8 * _output_error(plain, dense, x)
    profile = SVDConv2d.rank_profile(dense, calibration=gram, ridge=0.0)
    assert profile.errors[rank - 1] == pytest.approx(optimum, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_kronecker_whitening_equals_whitened_svd_with_the_kronecker_gram(mode):
    # For k > 1 the channel Gram stands for the patch Gram G kron I; the layer never
    # forms that matrix, but its factors must be the whitened SVD's with it.
    dense = _dense(6, 5, (3, 2))
    gram = _channel_gram(_correlated_inputs(6))
    layer = SVDConv2d.from_dense(dense, 3, mode=mode, calibration=gram, ridge=1e-4)
    weight = dense.weight.detach()
    if mode == "channel":
        matrix, positions = weight.reshape(5, -1), 6
        fitted = layer.dense_weight().detach().reshape(5, -1)
    else:
        # Rows (o, w), columns (c, h): the channel is the leading column index.
        matrix, positions = weight.permute(0, 3, 1, 2).reshape(10, 18), 3
        fitted = layer.dense_weight().detach().permute(0, 3, 1, 2).reshape(10, 18)
    kron = torch.kron(gram, torch.eye(positions, dtype=gram.dtype))
    b, a = whitened_low_rank_factors(matrix, kron, 3, ridge=1e-4)
    torch.testing.assert_close(fitted, b @ a)
    profile = SVDConv2d.rank_profile(dense, calibration=gram, ridge=1e-4, mode=mode)
    root = torch.linalg.cholesky(kron + 1e-4 * kron.diagonal().mean() * torch.eye(len(kron)))
    values = torch.linalg.svdvals(matrix @ root)
    assert profile.errors[2] == pytest.approx(float(values[3:].norm() / values.norm()), rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_calibrated_3x3_lowers_the_output_error_on_correlated_channels(mode):
    dense = _dense(12, 16, 3, padding=1)
    x = _correlated_inputs(12, size=10)
    model = nn.Sequential(dense)
    stats = calibrate(model, [x[:32], x[32:]])["0"]
    # Measured: 0.81-0.41 (channel) and 0.75-0.19 (spatial) against 0.87-0.59 and
    # 0.92-0.69 for the plain SVD over ranks 2-8.
    for rank, ratio in ((2, 0.95), (4, 0.9), (8, 0.75)):
        plain = SVDConv2d.from_dense(dense, rank, mode=mode)
        calibrated = SVDConv2d.from_dense(dense, rank, mode=mode, calibration=stats)
        assert _output_error(calibrated, dense, x) < ratio * _output_error(plain, dense, x)


# --------------------------------------------------------------------------- ranks


@pytest.mark.parametrize("mode", MODES)
def test_rank_policies_pick_ranks_from_the_profile(mode):
    dense = _dense(16, 24, 3, padding=1)
    weight = dense.weight.detach()
    for bound in (0.9, 0.6):
        layer = SVDConv2d.from_dense(dense, ErrorBound(bound), mode=mode)
        assert _relative(layer.dense_weight(), weight) <= bound + 1e-9
        smaller = SVDConv2d.from_dense(dense, layer.rank - 1, mode=mode)
        assert _relative(smaller.dense_weight(), weight) > bound
    energy = SVDConv2d.from_dense(dense, Energy(0.5), mode=mode)
    assert _relative(energy.dense_weight(), weight) <= math.sqrt(0.5) + 1e-9
    budget = SVDConv2d.from_dense(dense, Budget(params=0.25), mode=mode)
    stored = budget.input_factor.numel() + budget.output_factor.numel()
    assert stored <= 0.25 * weight.numel()
    assert SVDConv2d.from_dense(dense, EVBMF(), mode=mode).rank >= 1
    flops = SVDConv2d.from_dense(dense, Budget(flops=0.3), mode=mode)
    assert flops.flops_per_position() <= 0.3 * weight.numel()


def test_float_rank_is_a_parameter_fraction_of_each_modes_matrix():
    dense = _dense(64, 128, 3)
    channel = SVDConv2d.from_dense(dense, 0.25)
    spatial = SVDConv2d.from_dense(dense, 0.25, mode="spatial")
    assert channel.rank == (0.25 * 73728) // (128 + 576)
    assert spatial.rank == (0.25 * 73728) // (384 + 192)
    for layer, per_rank in ((channel, 128 + 576), (spatial, 384 + 192)):
        stored = layer.input_factor.numel() + layer.output_factor.numel()
        assert stored == layer.rank * per_rank <= 0.25 * 73728 < stored + per_rank


@pytest.mark.parametrize("mode", MODES)
def test_truncated_is_the_optimum_for_the_layers_own_kernel(mode, monkeypatch):
    dense = _dense(10, 12, (3, 2), padding=1)
    layer = SVDConv2d.from_dense(dense, 8, mode=mode)
    with torch.no_grad():  # a "fine-tuned" layer: factors no longer from one SVD
        layer.input_factor.add_(0.1 * torch.randn_like(layer.input_factor))
    kernel = layer.dense_weight().detach()
    values = torch.linalg.svdvals(_matrix(kernel, mode))
    monkeypatch.setattr(SVDConv2d, "dense_weight", lambda self: pytest.fail("dense kernel"))
    truncated = layer.truncated(3)
    monkeypatch.undo()
    assert truncated.rank == 3 and truncated.mode == mode
    error = _relative(truncated.dense_weight().detach(), kernel)
    assert error == pytest.approx(float(values[3:].norm() / values.norm()), abs=1e-10)
    assert layer.truncated(10).rank == 8
    x = torch.randn(2, 10, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(truncated(x), truncated.to_dense()(x))


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("mode", MODES)
def test_reset_parameters_gives_nn_conv2d_default_variance(mode):
    torch.manual_seed(0)
    layer = SVDConv2d(96, 128, (3, 5), rank=40, mode=mode)
    dense = nn.Conv2d(96, 128, (3, 5))
    fan_in = 96 * 15
    assert layer.dense_weight().var().item() == pytest.approx(1 / (3 * fan_in), rel=0.05)
    assert dense.weight.var().item() == pytest.approx(1 / (3 * fan_in), rel=0.05)
    assert layer.bias.abs().max() <= 1 / math.sqrt(fan_in)


# --------------------------------------------------------------------------- conversion


def test_factorize_converts_convolutions_in_both_modes_and_skips_grouped_ones():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(16, 32, 1),
    )  # fmt: skip
    x = torch.randn(4, 3, 8, 8)
    for mode in MODES:
        converted = copy.deepcopy(model)
        report = factorize_(converted, 0.5, layers={nn.Conv2d: SVDConv2d}, mode=mode)
        assert isinstance(converted[4], SVDConv2d) and converted[4].mode == mode
        assert type(converted[2]) is nn.Conv2d
        skipped = {row.name: row.skipped for row in report.layers}
        assert "groups=4" in skipped["2"]
        assert converted(x).shape == model(x).shape
    calibrated = copy.deepcopy(model)
    factorize_(calibrated, 0.5, layers={nn.Conv2d: SVDConv2d}, calibration=[x])
    assert isinstance(calibrated[4], SVDConv2d)


# --------------------------------------------------------------------------- dtypes, meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_sources_are_decomposed_in_float32(dtype):
    dense = nn.Conv2d(8, 12, 3, padding=1).to(dtype)
    layer = SVDConv2d.from_dense(dense, 8, mode="spatial")
    reference = SVDConv2d.from_dense(dense.float(), 8, mode="spatial")
    assert layer.input_factor.dtype == dtype and layer.bias.dtype == dtype
    torch.testing.assert_close(
        layer.dense_weight().float(), reference.dense_weight(), rtol=2e-2, atol=2e-2
    )


def test_meta_source_with_calibration_stays_on_meta():
    dense = nn.Conv2d(8, 12, 3, device="meta")
    gram = torch.empty(8, 8, device="meta")
    for mode in MODES:
        layer = SVDConv2d.from_dense(dense, 4, mode=mode, calibration=gram)
        assert all(p.device.type == "meta" for p in layer.parameters())


# --------------------------------------------------------------------------- validation


def test_bad_constructor_arguments_are_refused_with_the_valid_range():
    with pytest.raises(ValueError, match=r"mode must be one of \('channel', 'spatial'\)"):
        SVDConv2d(4, 4, 3, rank=2, mode="depthwise")
    with pytest.raises(ValueError, match="groups=1 only, got groups=2"):
        SVDConv2d(4, 4, 3, rank=2, groups=2)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 12\]"):
        SVDConv2d(4, 4, 3, rank=13, mode="spatial")
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        SVDConv2d(4, 4, 3, rank=5)
    with pytest.raises(ValueError, match="fraction of parameters in"):
        SVDConv2d(4, 4, 3, rank=1.5)
    with pytest.raises(TypeError, match="rank must be an int or a float"):
        SVDConv2d(4, 4, 3, rank="full")
    with pytest.raises(ValueError, match="not supported for strided"):
        SVDConv2d(4, 4, 3, rank=2, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        SVDConv2d(4, 4, 3, rank=2, padding_mode="mirror")
    with pytest.raises(ValueError, match="kernel_size"):
        SVDConv2d(4, 4, (3, 3, 3), rank=2)
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        SVDConv2d(0, 4, 3, rank=2)


def test_bad_from_dense_arguments_are_refused():
    grouped = nn.Conv2d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2: grouped/depthwise"):
        SVDConv2d.from_dense(grouped, 2)
    with pytest.raises(ValueError, match="groups=2"):
        SVDConv2d.rank_profile(grouped)
    dense = nn.Conv2d(4, 8, 3)
    with pytest.raises(TypeError, match=r"expects an nn.Conv2d"):
        SVDConv2d.from_dense(nn.Conv1d(4, 8, 3), 2)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\]"):
        SVDConv2d.from_dense(dense, 9)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        SVDConv2d.from_dense(dense, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        SVDConv2d.from_dense(dense, 2, mode="depth")
    with pytest.raises(TypeError, match="unknown option"):
        SVDConv2d.from_dense(dense, 2, whitening_ridge=1e-3)
    with pytest.raises(TypeError, match=r"ridge= and compute_dtype= only"):
        SVDConv2d.from_dense(dense, 2, calibration=torch.eye(4), method="randomized")
    for mode in MODES:
        with pytest.raises(ValueError, match=r"\(4, 4\) input second-moment"):
            SVDConv2d.from_dense(dense, 2, calibration=torch.eye(5), mode=mode)
    bad = nn.Conv2d(4, 8, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    for mode in MODES:
        with pytest.raises(ValueError, match="NaN/Inf"):
            SVDConv2d.from_dense(bad, 2, mode=mode)
        with pytest.raises(ValueError, match="NaN/Inf"):
            SVDConv2d.from_dense(bad, 2, mode=mode, calibration=torch.eye(4))


def test_functional_refuses_mismatched_factors_inputs_and_bias():
    x = torch.randn(1, 4, 6, 6)
    a, b = torch.randn(3, 4, 3, 3), torch.randn(5, 3, 1, 3)
    with pytest.raises(ValueError, match=r"kW2 == 1 unless"):
        svd_conv2d(x, a, b)
    with pytest.raises(ValueError, match=r"output_factor must be \(C_out, 3, 1, kW2\)"):
        svd_conv2d(x, a, torch.randn(5, 2, 1, 1))
    with pytest.raises(ValueError, match=r"input_factor must be"):
        svd_conv2d(x, a[0], b)
    with pytest.raises(ValueError, match=r"\(N, 4, \*spatial\)"):
        svd_conv2d(torch.randn(1, 5, 6, 6), a, torch.randn(5, 3, 1, 1))
    with pytest.raises(TypeError, match="bias dtype torch.float64"):
        svd_conv2d(x, a, torch.randn(5, 3, 1, 1), torch.randn(5, dtype=torch.float64))
