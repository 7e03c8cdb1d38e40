"""End-to-end demo on real data: train, compress with SVDLinear, fine-tune, compare.

Run ``python -m factorized_layers.demo`` (needs the ``demo`` extra for scikit-learn's
``load_digits``: 1,797 real 8x8 handwritten digits, shipped inside the package, no
download). It trains a small MLP, replaces every hidden ``nn.Linear`` by
``SVDLinear.from_dense`` at several parameter budgets, fine-tunes each compressed model
briefly, and prints accuracy, parameter ratio and measured forward-time ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import SVDLinear

__all__ = ["main"]


def _load_digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("The demo needs scikit-learn for its real data set: pip install -e '.[demo]'")
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )  # fmt: skip


def _train(model: nn.Module, x, y, epochs: int, lr: float, seed: int, label: str) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    batches = max(1, len(y) // 64)
    interactive = sys.stdout.isatty()
    for epoch in range(epochs):
        order = torch.randperm(len(y))
        total = 0.0
        for i, idx in enumerate(order.chunk(batches)):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            if interactive or i + 1 == batches:
                bar = "#" * (20 * (i + 1) // batches)
                line = f"{label} epoch {epoch + 1}/{epochs} [{bar:<20}] loss {total / (i + 1):.3f}"
                print(f"\r  {line}", end="", flush=True)
        print()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def _compress(model: nn.Sequential, fraction: float) -> nn.Sequential:
    """Copy of ``model`` whose hidden Linear layers are SVDLinear at ``fraction`` of parameters.

    The 10-way output layer stays dense: at these sizes its factors would save nothing.
    """
    layers = []
    for module in model:
        if isinstance(module, nn.Linear) and module.out_features > 10:
            layers.append(SVDLinear.from_dense(module, fraction))
        else:
            layers.append(module)
    return nn.Sequential(*layers)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _speedup(reference: nn.Module, candidate: nn.Module, x, repeats: int) -> float:
    """Median time of ``reference`` over median time of ``candidate``, calls interleaved."""
    times = {id(reference): [], id(candidate): []}
    for model in (reference, candidate):  # warm-up
        model(x)
    for _ in range(repeats):
        for model in (reference, candidate):
            start = time.perf_counter()
            model(x)
            times[id(model)].append(time.perf_counter() - start)
    ref, cand = (sorted(times[id(m)])[repeats // 2] for m in (reference, candidate))
    return ref / cand


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; ``--quick`` trains less and times fewer repeats (for CI)."""
    parser = argparse.ArgumentParser(prog="python -m factorized_layers.demo", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small model, fewer epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    hidden, epochs, finetune_epochs, repeats = (256, 5, 1, 15) if args.quick else (1024, 15, 3, 60)
    x_train, y_train, x_test, y_test = _load_digits(args.seed)
    print(f"load_digits: {len(y_train)} train / {len(y_test)} test images, "
          f"MLP 64-{hidden}-{hidden}-{hidden}-10, {torch.get_num_threads()} threads")  # fmt: skip

    torch.manual_seed(args.seed)
    dense = _mlp(hidden)
    _train(dense, x_train, y_train, epochs, 1e-3, args.seed, "dense")
    dense_acc = _accuracy(dense, x_test, y_test)
    timing_batch = torch.randn(1024, 64)

    rows = []
    for fraction in (0.5, 0.25, 0.1):
        compressed = _compress(dense, fraction)
        converted_acc = _accuracy(compressed, x_test, y_test)
        _train(compressed, x_train, y_train, finetune_epochs, 3e-4, args.seed, f"{fraction:.2f}")
        tuned_acc = _accuracy(compressed, x_test, y_test)
        speedup = _speedup(dense, compressed, timing_batch, repeats)
        ranks = [m.rank for m in compressed if isinstance(m, SVDLinear)]
        rows.append((fraction, ranks, _params(dense) / _params(compressed),
                     converted_acc, tuned_acc, speedup))  # fmt: skip

    print(f"\ndense test accuracy: {dense_acc:.3f}   parameters: {_params(dense):,}")
    print("| kept fraction | ranks | fewer params | acc converted | acc fine-tuned | "
          "forward speedup (batch 1024) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for fraction, ranks, ratio, converted_acc, tuned_acc, speedup in rows:
        print(f"| {fraction:.2f} | {ranks} | {ratio:.2f}x | {converted_acc:.3f} | "
              f"{tuned_acc:.3f} | {speedup:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
