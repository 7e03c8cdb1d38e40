"""Checkpoints survive failed writes, and damaged files are refused by name (issue #20).

The oracle is the file system and the model itself: after a write that fails part-way
the previous file is byte-identical and still loads, and a truncated or corrupted file
raises a ``ValueError`` naming it while the model keeps every module and value.
"""

import os

import pytest
import torch
import torch.nn as nn

import factorized_layers.checkpoint as checkpoint
from factorized_layers import factorize_, load_factorized, save_factorized

from .tally import record


def _dense(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))


def _converted(seed: int = 0) -> nn.Sequential:
    model = _dense(seed)
    factorize_(model, rank=8, progress=False)
    return model


def _needs(suffix: str) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="needs safetensors")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_previous_checkpoint(suffix, failure, tmp_path, monkeypatch):
    _needs(suffix)
    path = tmp_path / f"model{suffix}"
    first = _converted(seed=0)
    save_factorized(first, path)
    before = path.read_bytes()

    real_replace = os.replace

    def crash_after_half(source, target):
        # The new file is complete on disk, but the process dies before the rename.
        with open(source, "r+b") as handle:
            handle.truncate(os.path.getsize(source) // 2)
        raise failure

    monkeypatch.setattr(checkpoint.os, "replace", crash_after_half)
    with pytest.raises(type(failure)):
        save_factorized(_converted(seed=1), path)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)

    assert record("interrupted writes keeping the previous checkpoint", path.read_bytes() == before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(load_factorized(_dense(seed=5), path)(x), first(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_exception_inside_the_writer_leaves_no_file(suffix, tmp_path, monkeypatch):
    _needs(suffix)
    path = tmp_path / f"model{suffix}"

    def failing_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if suffix == ".pt":
        monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    else:
        monkeypatch.setattr(checkpoint._safetensors(), "save_model", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_factorized(_converted(), path)
    assert list(tmp_path.iterdir()) == []


def _state(model: nn.Module):
    return [(name, type(m).__name__) for name, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_checkpoints_are_refused_by_name_and_change_nothing(suffix, damage, tmp_path):
    _needs(suffix)
    path = tmp_path / f"model{suffix}"
    save_factorized(_converted(), path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    model = _dense(seed=7)
    modules, values = _state(model)
    try:
        load_factorized(model, path)
    except ValueError as error:
        assert str(path) in str(error)
    else:
        # A flip inside tensor payload bytes is not detectable without a checksum: the
        # load then succeeds with different values, which is all that can be promised.
        assert damage == "flip"
        return
    after_modules, after_values = _state(model)
    assert after_modules == modules
    assert record(
        "damaged checkpoint files refused",
        all(torch.equal(values[k], after_values[k]) for k in values),
    )


def test_a_missing_file_keeps_its_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_factorized(_dense(), tmp_path / "absent.pt")
