"""Converted models and the contraction cache under 8 threads at once (issue #20).

Oracles: the same model run single-threaded on the same inputs (forward and input and
parameter gradients), ``torch.einsum`` for the cache's contractions, and the cache's
own bound and counters.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from factorized_layers import (
    CPConv2d,
    SVDConv2d,
    SVDLinear,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)
from factorized_layers.contract import ContractionCache, contract

from .tally import record

THREADS = 8


class _Mixed(nn.Module):
    """Every forward schedule family: CP, Tucker-2 and low-rank convolutions, then
    Tucker, tensor-train and low-rank linears."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cp = CPConv2d.from_dense(nn.Conv2d(3, 8, 3, padding=1), 6, seed=0)
        self.tucker_conv = TuckerConv2d.from_dense(nn.Conv2d(8, 12, 3, padding=1), (6, 4))
        self.svd_conv = SVDConv2d.from_dense(nn.Conv2d(12, 16, 3, stride=2, padding=1), 6)
        self.tucker = TuckerLinear.from_dense(nn.Linear(16, 48), 0.5)
        self.tt = TTLinear.from_dense(nn.Linear(48, 48), 0.5)
        self.svd = SVDLinear.from_dense(nn.Linear(48, 10), 4)

    def forward(self, x):
        x = torch.relu(self.cp(x))
        x = torch.relu(self.tucker_conv(x))
        x = torch.relu(self.svd_conv(x)).mean(dim=(2, 3))
        return self.svd(torch.relu(self.tt(torch.relu(self.tucker(x)))))


def _run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    return y.detach(), [g.detach() for g in grads]


def test_forward_and_backward_from_8_threads_match_single_threaded_runs():
    model = _Mixed()
    generator = torch.Generator().manual_seed(1)
    shapes = [(batch, 3, size, size) for batch in (1, 2, 5, 8) for size in (6, 9)]
    inputs = [torch.randn(shape, generator=generator) for shape in shapes * 3]
    expected = [_run(model, x) for x in inputs]
    start = threading.Barrier(THREADS)

    def task(index):
        if index < THREADS:
            start.wait()  # the first wave starts together
        return _run(model, inputs[index])

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(task, range(len(inputs))))
    for (y, grads), (want_y, want_grads) in zip(results, expected):
        torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-7)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        record("concurrent forward+backward results equal to single-threaded")


def test_the_contraction_cache_stays_bounded_and_counts_every_lookup_from_8_threads():
    cache = ContractionCache(maxsize=4)
    generator = torch.Generator().manual_seed(2)
    cases = []
    for batch in range(1, 13):  # 12 distinct shapes for a cache of 4
        shapes = [(batch, 6), (3, 6), (5, 3)]
        cases.append([torch.randn(shape, generator=generator) for shape in shapes])
    calls = cases * 10
    sizes = []

    def task(operands):
        result = contract("bi,ri,or->bo", *operands, cache=cache)
        sizes.append(cache.info().currsize)
        return result

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(task, calls))
    for operands, result in zip(calls, results):
        torch.testing.assert_close(result, torch.einsum("bi,ri,or->bo", *operands))
        record("concurrent cached contractions equal to torch.einsum")
    info = cache.info()
    assert info.hits + info.misses == len(calls)
    assert info.misses >= len(cases) and info.currsize <= 4 and max(sizes) <= 4
