"""An exception or KeyboardInterrupt at any swap leaves the model bit-identical (#20).

Each function that swaps modules is run once per swap it makes, with the k-th swap
raising; the oracle is a snapshot of the model taken before: module types per name,
every parameter and buffer (bitwise) with its ``requires_grad``, every hook, and every
``training`` flag.
"""

import pytest
import torch
import torch.nn as nn

import factorized_layers.convert.walk as walk
from factorized_layers import (
    factorize_,
    load_factorized,
    save_factorized,
    truncate_,
    unfactorize_,
)


def _hook(module, args):
    return None


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32),
        nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 10),
    )  # fmt: skip
    model[3].register_forward_pre_hook(_hook)
    model[5].weight.requires_grad_(False)
    model[6].eval()
    return model


def _snapshot(model: nn.Module):
    modules = []
    for name, module in model.named_modules():
        hooks = tuple(
            (attr, tuple(getattr(module, attr).values()))
            for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks")
        )
        modules.append((name, type(module), module.training, hooks))
    tensors = [
        (name, t.detach().clone(), t.requires_grad)
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
    ]
    return modules, tensors


def _assert_unchanged(model, before):
    modules, tensors = _snapshot(model)
    assert modules == before[0]
    assert [(n, g) for n, _, g in tensors] == [(n, g) for n, _, g in before[1]]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(tensors, before[1]))


def _failing_swap(monkeypatch, fail_at: int, error: BaseException):
    real = walk._swap
    calls = {"n": 0}

    def swap(old, new, parents):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise error
        real(old, new, parents)

    monkeypatch.setattr(walk, "_swap", swap)
    return calls


OPERATIONS = {
    "factorize_": lambda model, path: factorize_(model, rank=0.5, progress=False),
    "unfactorize_": lambda model, path: unfactorize_(model),
    "truncate_": lambda model, path: truncate_(model, rank=0.25),
    "load_factorized": lambda model, path: load_factorized(model, path),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=type)
def test_a_fault_at_every_swap_leaves_the_model_as_it_was(operation, error, tmp_path,
                                                            monkeypatch):  # fmt: skip
    path = tmp_path / "model.pt"
    saved = _model(seed=1)
    factorize_(saved, rank=0.5, progress=False)
    save_factorized(saved, path)

    def fresh():
        model = _model()
        if operation in ("unfactorize_", "truncate_"):
            factorize_(model, rank=0.5, progress=False)
        return model

    counting = fresh()
    calls = _failing_swap(monkeypatch, 0, error)  # count the swaps of a clean run
    OPERATIONS[operation](counting, path)
    swaps = calls["n"]
    assert swaps >= 3
    for fail_at in range(1, swaps + 1):
        model = fresh()
        before = _snapshot(model)
        _failing_swap(monkeypatch, fail_at, error)
        with pytest.raises(type(error)):
            OPERATIONS[operation](model, path)
        _assert_unchanged(model, before)
        x = torch.randn(2, 3, 6, 6)
        model(x)  # still runs, with its original modules


def test_undoing_a_swap_of_a_static_padding_subclass_does_not_pad_twice(monkeypatch):
    from ..test_subclasses import StaticSameConv

    torch.manual_seed(0)
    model = nn.Sequential(StaticSameConv(3, 8, 3, stride=2), nn.ReLU(),
                          StaticSameConv(8, 8, 3), nn.ReLU())  # fmt: skip
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    before = _snapshot(model)
    _failing_swap(monkeypatch, 2, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        factorize_(model, rank=0.5, progress=False)
    _assert_unchanged(model, before)
    assert torch.equal(model(x), expected)


class _FailsOnBatch(nn.Module):
    """Raises ``error`` on the ``fail_at``-th forward call."""

    def __init__(self, fail_at: int, error: BaseException):
        super().__init__()
        self.fail_at, self.error, self.calls = fail_at, error, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return x


@pytest.mark.parametrize("sensitivity", [False, True])
@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=type)
def test_a_fault_in_any_calibration_batch_leaves_no_hook_and_no_change(sensitivity, error):
    from factorized_layers import calibrate

    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    for fail_at in range(1, len(batches) + 1):
        model = _model()
        model.insert(4, _FailsOnBatch(fail_at, error))
        before = _snapshot(model)
        # A model error is reported as the batch that failed; an interrupt stays one.
        if isinstance(error, KeyboardInterrupt):
            raised = pytest.raises(KeyboardInterrupt)
        else:
            raised = pytest.raises(
                ValueError, match=f"calibration batch {fail_at - 1} failed in the model: injected"
            )
        with raised:
            calibrate(model, batches, sensitivity=sensitivity)
        _assert_unchanged(model, before)
        assert all(p.grad is None for p in model.parameters())
