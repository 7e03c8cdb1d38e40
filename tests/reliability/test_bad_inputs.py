"""Bad inputs at run time are refused naming the layer and what it expects (#20).

Every registered family, converted inside a model: wrong feature or channel count,
wrong number of dimensions, spatial maps smaller than the kernel, float64 or integer
activations, float or out-of-range indices, non-tensors. Each must raise
``ValueError`` (shape, device, index range) or ``TypeError`` (dtype, type) whose
message starts with the layer's class and configuration, and leave the model usable.
"""

import pytest
import torch
import torch.nn as nn

from factorized_layers import (
    CPConv2d,
    SVDConv2d,
    SVDEmbedding,
    SVDLinear,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
    factorize_,
)

from .tally import record

LINEARS = [SVDLinear, TuckerLinear, TTLinear]
CONVS = [CPConv2d, TuckerConv2d, SVDConv2d]

LINEAR_INPUTS = {
    "wrong features": (torch.randn(4, 31), ValueError, r"shape \(\*, 32\), got shape \(4, 31\)"),
    "zero dimensions": (torch.tensor(1.0), ValueError, r"shape \(\*, 32\), got shape \(\)"),
    "float64": (torch.randn(4, 32, dtype=torch.float64), TypeError, "dtype torch.float32"),
    "integers": (torch.ones(4, 32, dtype=torch.long), TypeError, "floating-point input"),
    "not a tensor": ([0.0] * 32, TypeError, "expected a torch.Tensor input, got list"),
}
CONV_INPUTS = {
    "wrong channels": (torch.randn(2, 4, 8, 8), ValueError, r"\(N, 3, \*spatial\)"),
    "one spatial dim": (torch.randn(2, 3, 8), ValueError, "2 spatial dimension"),
    "smaller than kernel": (torch.randn(2, 3, 2, 2), ValueError, "at least the dilated kernel"),
    "float64": (torch.randn(2, 3, 8, 8, dtype=torch.float64), TypeError, "dtype torch.float32"),
    "integers": (torch.ones(2, 3, 8, 8, dtype=torch.long), TypeError, "floating-point input"),
}
EMBEDDING_INPUTS = {
    "float indices": (torch.randn(2, 5), TypeError, "torch.long or torch.int indices"),
    "index too large": (torch.full((2, 5), 50), ValueError, r"indices in \[0, 50\)"),
    "negative index": (torch.full((2, 5), -1), ValueError, r"indices in \[0, 50\)"),
}


def _converted(dense: nn.Module, cls: type) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(dense, nn.Identity())
    factorize_(model, 0.5, layers={type(dense): cls}, allow_larger=True, progress=False)
    assert isinstance(model[0], cls)
    return model


CASES = (
    [(cls, nn.Linear(32, 16), name, *v) for cls in LINEARS for name, v in LINEAR_INPUTS.items()]
    + [(cls, nn.Conv2d(3, 8, 5), name, *v) for cls in CONVS for name, v in CONV_INPUTS.items()]
    + [(SVDEmbedding, nn.Embedding(50, 16), n, *v) for n, v in EMBEDDING_INPUTS.items()]
)


@pytest.mark.parametrize(
    "cls, dense, what, bad, error, words",
    CASES,
    ids=[f"{c[0].__name__}-{c[2]}" for c in CASES],
)
def test_a_bad_input_is_refused_naming_the_layer(cls, dense, what, bad, error, words):
    model = _converted(dense, cls)
    with pytest.raises(error, match=words) as raised:
        model(bad)
    assert record(
        "bad inputs refused naming the layer",
        str(raised.value).startswith(f"{cls.__name__}({model[0].extra_repr()}): "),
    )
    good = torch.randint(0, 50, (2, 5)) if cls is SVDEmbedding else None
    if good is None:
        good = torch.randn(4, 32) if cls in LINEARS else torch.randn(2, 3, 8, 8)
    assert torch.isfinite(model(good)).all()  # the layer still works


def test_autocast_inputs_are_not_refused():
    model = _converted(nn.Linear(32, 16), SVDLinear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_an_error_that_is_not_the_inputs_fault_propagates_unchanged(monkeypatch):
    import factorized_layers.layers.svd as svd

    model = _converted(nn.Linear(32, 16), SVDLinear)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(svd, "svd_linear", broken)
    monkeypatch.setattr(model[0], "_always_input_first", False)
    with pytest.raises(RuntimeError, match=r"^out of memory \(injected\)$"):
        model(torch.randn(4, 32))
