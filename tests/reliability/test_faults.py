"""An exception or KeyboardInterrupt at any swap leaves the model bit-identical (#20).

Each function that swaps modules is run once per swap it makes, with the k-th swap
raising; the oracle is a snapshot of the model taken before: module types per name,
every parameter and buffer (bitwise) with its ``requires_grad``, every hook, and every
``training`` flag.
"""

import importlib
import inspect

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

from .snapshot import snapshot, unchanged
from .tally import record


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


class _Faults:
    """Counts the calls of every callable it wraps; the ``fail_at``-th raises ``error``.

    ``fail_at`` 0 never raises (a clean run counts the calls); :meth:`arm` restarts the
    count for the next injection.
    """

    def __init__(self, error: BaseException):
        self.error, self.calls, self.fail_at = error, 0, 0

    def arm(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def wrap(self, real):
        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise self.error
            return real(*args, **kwargs)

        return failing

    def patch(self, monkeypatch, owner, name: str) -> None:
        """Wrap ``owner.name`` (a classmethod stays a classmethod)."""
        real = getattr(owner, name)
        if isinstance(inspect.getattr_static(owner, name), classmethod):
            monkeypatch.setattr(owner, name, classmethod(self.wrap(real.__func__)))
        else:
            monkeypatch.setattr(owner, name, self.wrap(real))

    def patch_every_family(self, monkeypatch, name: str) -> None:
        """Wrap ``name`` on every registered layer class."""
        from factorized_layers import registered_layers

        for cls in registered_layers():
            self.patch(monkeypatch, cls, name)


def _saved_checkpoint(path):
    saved = _model(seed=1)
    factorize_(saved, rank=0.5, progress=False)
    save_factorized(saved, path)
    return path


def _fresh(operation: str) -> nn.Sequential:
    """The model an operation starts from: converted for those that need factorized layers."""
    model = _model()
    if operation not in ("factorize_", "load_factorized"):
        factorize_(model, rank=0.5, progress=False)
    return model


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
    path = _saved_checkpoint(tmp_path / "model.pt")
    faults = _Faults(error)
    faults.patch(monkeypatch, walk, "_swap")
    counting = _fresh(operation)
    faults.arm(0)  # count the swaps of a clean run of the operation alone
    OPERATIONS[operation](counting, path)
    swaps = faults.calls
    assert swaps >= 3
    for fail_at in range(1, swaps + 1):
        faults.arm(0)  # building the model swaps too: not a fault point of this operation
        model = _fresh(operation)
        before = snapshot(model)
        faults.arm(fail_at)
        with pytest.raises(type(error)):
            OPERATIONS[operation](model, path)
        assert record("faults injected", unchanged(model, before))
        x = torch.randn(2, 3, 6, 6)
        model(x)  # still runs, with its original modules


def test_undoing_a_swap_of_a_static_padding_subclass_does_not_pad_twice(monkeypatch):
    from ..test_subclasses import StaticSameConv

    torch.manual_seed(0)
    model = nn.Sequential(StaticSameConv(3, 8, 3, stride=2), nn.ReLU(),
                          StaticSameConv(8, 8, 3), nn.ReLU())  # fmt: skip
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    before = snapshot(model)
    faults = _Faults(RuntimeError("injected"))
    faults.patch(monkeypatch, walk, "_swap")
    faults.arm(2)
    with pytest.raises(RuntimeError, match="injected"):
        factorize_(model, rank=0.5, progress=False)
    assert record("faults injected", unchanged(model, before))
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
        before = snapshot(model)
        # A model error is reported as the batch that failed; an interrupt stays one.
        if isinstance(error, KeyboardInterrupt):
            raised = pytest.raises(KeyboardInterrupt)
        else:
            raised = pytest.raises(
                ValueError, match=f"calibration batch {fail_at - 1} failed in the model: injected"
            )
        with raised:
            calibrate(model, batches, sensitivity=sensitivity)
        assert record("faults injected", unchanged(model, before))
        assert all(p.grad is None for p in model.parameters())


def _calibration_batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 6, 6, generator=generator) for _ in range(2)]


CONVERSIONS = {
    "plain": lambda model: factorize_(model, rank=0.5, progress=False),
    "auto": lambda model: factorize_(model, rank=0.5, layers="auto", progress=False),
    "calibrated": lambda model: factorize_(
        model, rank=0.5, calibration=_calibration_batches(), progress=False
    ),
    "sequential": lambda model: factorize_(
        model, rank=0.5, calibration=_calibration_batches(), sequential=True, progress=False
    ),
}


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=type)
def test_a_fault_in_any_decomposition_leaves_the_model_as_it_was(conversion, error,
                                                                   monkeypatch):  # fmt: skip
    faults = _Faults(error)
    faults.patch_every_family(monkeypatch, "fit_factors")
    CONVERSIONS[conversion](_model())
    fits = faults.calls
    assert fits >= 3
    for fail_at in range(1, fits + 1):
        model = _model()
        before = snapshot(model)
        faults.arm(fail_at)
        with pytest.raises(type(error)):
            CONVERSIONS[conversion](model)
        survived = unchanged(model, before)
        assert record("faults injected", survived), f"fault at decomposition {fail_at} of {fits}"


@pytest.mark.parametrize("linalg", ["svd", "eigh", "cholesky_ex", "svdvals"])
def test_a_linear_algebra_failure_inside_a_decomposition_leaves_the_model_as_it_was(
    linalg, monkeypatch
):
    faults = _Faults(torch.linalg.LinAlgError("injected"))
    faults.patch(monkeypatch, torch.linalg, linalg)
    tried = 0
    for name, conversion in CONVERSIONS.items():
        faults.arm(0)
        conversion(_model())
        total = faults.calls
        for fail_at in sorted({1, (total + 1) // 2, total}) if total else []:
            faults.arm(fail_at)
            model = _model()
            before = snapshot(model)
            with pytest.raises(torch.linalg.LinAlgError, match="injected"):
                conversion(model)
            where = f"{name}: {linalg} failing at {fail_at} of {total}"
            assert record("faults injected", unchanged(model, before)), where
            tried += 1
    assert tried >= 1


@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=type)
def test_a_fault_in_any_calibration_hook_leaves_no_hook_and_no_change(error, monkeypatch):
    # The package exports the function ``calibrate``, which shadows the module's name.
    calibration = importlib.import_module("factorized_layers.calibrate")

    faults = _Faults(error)
    faults.patch(monkeypatch, calibration, "gram_of")
    calibration.calibrate(_model(), _calibration_batches())
    total = faults.calls
    assert total >= 6
    for fail_at in range(1, total + 1):
        faults.arm(fail_at)
        model = _model()
        before = snapshot(model)
        with pytest.raises((type(error), ValueError)):
            calibration.calibrate(model, _calibration_batches())
        where = f"fault in calibration hook call {fail_at} of {total}"
        assert record("faults injected", unchanged(model, before)), where


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("sequential", [False, True])
def test_non_finite_calibration_inputs_are_refused_naming_the_layer(bad, sequential):
    from factorized_layers import calibrate

    batches = _calibration_batches()
    batches[1][3, 0, 2, 2] = bad
    model = _model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"NaN or Inf .*'0' \(Conv2d\)"):
        calibrate(model, batches)
    with pytest.raises(ValueError, match=r"NaN.*'?0'? \(Conv2d\)|0 \(Conv2d\).*NaN"):
        factorize_(model, rank=0.5, calibration=batches, sequential=sequential, progress=False)
    assert record("faults injected", unchanged(model, before))


# The per-layer step each operation runs before its swaps: truncation refits the
# factors, unfactorize_ rebuilds the dense module, load_factorized builds from the plan.
PER_LAYER_STEPS = {
    "truncate_": "truncate_factors",
    "unfactorize_": "to_dense",
    "load_factorized": "from_config",
}


@pytest.mark.parametrize("operation", list(PER_LAYER_STEPS))
@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=type)
def test_a_fault_in_any_per_layer_step_leaves_the_model_as_it_was(operation, error, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    path = _saved_checkpoint(tmp_path / "model.pt")
    name = PER_LAYER_STEPS[operation]
    faults = _Faults(error)
    faults.patch_every_family(monkeypatch, name)
    OPERATIONS[operation](_fresh(operation), path)
    total = faults.calls
    assert total >= 3
    for fail_at in range(1, total + 1):
        faults.arm(fail_at)
        model = _fresh(operation)
        before = snapshot(model)
        # load_factorized reports a failure to build a layer from the plan (on meta,
        # before anything real) as a bad plan entry; an interrupt stays one.
        with pytest.raises((type(error), ValueError)):
            OPERATIONS[operation](model, path)
        where = f"{operation}: {name} failing at call {fail_at} of {total}"
        assert record("faults injected", unchanged(model, before)), where
