"""Fine-tuning converted models: autograd, mixed precision, torch.compile, DDP and FSDP2."""

from __future__ import annotations

import copy
import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import (
    CPConv2d,
    SVDLinear,
    TuckerLinear,
    factorize_,
    load_factorized,
    save_factorized,
)

from .distributed_worker import build_dense_model, global_batch, train_single

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4)
    )


def _converted_mlp(tucker: bool = False) -> nn.Module:
    model = _mlp()
    layers = {nn.Linear: TuckerLinear} if tucker else None
    factorize_(model, rank=0.5, layers=layers, exclude=["4"])
    return model


@functools.cache
def _converted_cnn_once() -> nn.Module:
    model = build_dense_model()
    factorize_(model, rank=0.4, seed=0, layer_options={CPConv2d: {"n_iter": 10}})
    return model


def _converted_cnn() -> nn.Module:
    return copy.deepcopy(_converted_cnn_once())


def _regression_data(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=generator)
    teacher = torch.randn(32, 4, generator=generator)
    return x, torch.tanh(x @ teacher)


@pytest.mark.parametrize("tucker", [False, True], ids=["svd", "tucker"])
def test_fine_tuning_lowers_loss_and_reaches_every_factor(tucker):
    model = _converted_mlp(tucker)
    x, y = _regression_data()
    params = dict(model.named_parameters())
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum()]
            assert not no_grad, f"no gradient reached {no_grad}"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_fine_tuning_cnn_reaches_every_factor():
    model = _converted_cnn()
    assert any(isinstance(m, CPConv2d) for m in model.modules())
    images, labels = global_batch(0)
    F.cross_entropy(model(images), labels).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("make", [_converted_mlp, _converted_cnn], ids=["mlp", "cnn"])
def test_autocast_bfloat16_on_cpu(make):
    model = make()
    x = torch.randn(8, 32) if make is _converted_mlp else global_batch(0)[0]
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: a few of its epsilons per accumulated layer.
    scale = reference.abs().max()
    assert (out.float() - reference).abs().max() <= 0.05 * scale
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())


@pytest.mark.parametrize("make", [_converted_mlp, _converted_cnn], ids=["mlp", "cnn"])
def test_compile_fullgraph_of_converted_model_matches_eager(make):
    torch._dynamo.reset()
    model = make()
    x = torch.randn(8, 32) if make is _converted_mlp else global_batch(0)[0]
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    x.requires_grad_(True)
    compiled(x).sum().backward()
    eager_grad = torch.autograd.grad(model(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, eager_grad, rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_matches_single_process(mode: str, tmp_path: Path) -> None:
    steps = 5
    converted = _converted_cnn()
    checkpoint = tmp_path / "start.pt"
    save_factorized(converted, checkpoint)
    start_model = load_factorized(build_dense_model(), checkpoint)
    assert isinstance(start_model[0], CPConv2d) and isinstance(start_model[5], SVDLinear)
    reference = train_single(start_model, steps)
    out = tmp_path / f"{mode}.pt"
    pythonpath = os.environ.get("PYTHONPATH", "")
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            "--mode",
            mode,
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--steps",
            str(steps),
            "--port",
            str(_free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        # The worker must import the package under test, not whatever is installed.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), pythonpath]))},
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 60, f"{mode} run took {elapsed:.1f} s"
    trained = torch.load(out, weights_only=True)
    assert trained.keys() == reference.keys()
    assert "0.in_channel_factor" in trained and "5.input_factor" in trained
    initial = dict(load_factorized(build_dense_model(), checkpoint).named_parameters())
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    _distributed_matches_single_process("ddp", tmp_path)


def test_fsdp2_two_gloo_processes_match_single_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="this torch has no torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no FSDP2 fully_shard (added in 2.6)")
    _distributed_matches_single_process("fsdp", tmp_path)


def test_optimizer_state_dict_round_trip_after_conversion(tmp_path):
    model = _converted_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = _regression_data()
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    save_factorized(model, path)
    torch.save(optimizer.state_dict(), tmp_path / "optim.pt")
    restored = load_factorized(_mlp(), path)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    restored_optimizer.load_state_dict(torch.load(tmp_path / "optim.pt", weights_only=True))
    for opt, net in ((optimizer, model), (restored_optimizer, restored)):
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), restored.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert isinstance(copy.deepcopy(restored)[0], SVDLinear)
