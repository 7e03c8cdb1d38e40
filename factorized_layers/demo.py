"""End-to-end demo on real data: train a CNN, convert it with factorize_, fine-tune.

Run ``python -m factorized_layers.demo`` (the ``demo`` extra brings scikit-learn, whose
``load_digits`` ships 1,797 real 8x8 handwritten digits: no download). It trains a small
CNN, converts every convolution and linear layer in place with
``factorize_(model, Budget(params=f), example_inputs=[test images], min_speedup=1.0)``
for several budgets ``f`` (CP convolutions, low-rank linears, ranks allocated across
layers; a layer that would run slower than dense at the test batch stays dense, with the
measured ratio in the report), prints the conversion report, the test
accuracy of the dense / converted / fine-tuned model, the parameter ratio and the
measured forward-time ratio, saves the last model with ``save_factorized`` and reloads it
into a freshly built dense CNN with ``load_factorized``, and saves ``demo_accuracy.png``
when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_factorized, save_factorized
from .convert import factorize_
from .ranks import Budget
from .schedule import interleaved_medians

__all__ = ["main", "load_digits_split", "build_cnn", "train", "accuracy", "count_parameters"]


def load_digits_split(seed: int) -> Tuple[torch.Tensor, ...]:
    """scikit-learn's 1,797 real 8x8 digits as ``(x_train, y_train, x_test, y_test)``.

    Images are ``(N, 1, 8, 8)`` floats in ``[0, 1]``; a seeded 80/20 split.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("The demo needs scikit-learn for its real data set: pip install -e '.[demo]'")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def build_cnn(width: int) -> nn.Sequential:
    """The demo CNN: 3x3 convolutions to ``width``, ``2 width``, ``2 width``; two linears."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, 10),
    )  # fmt: skip


def train(model: nn.Module, x, y, epochs: int, lr: float, seed: int, label: str) -> None:
    """Adam on cross-entropy, batches of about 64, with a one-line progress bar per epoch."""
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
def accuracy(model: nn.Module, x, y) -> float:
    """Fraction of ``x`` classified as ``y`` (eval mode, no gradients)."""
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (the demo CNN has only convolutions and linears)."""
    return sum(p.numel() for p in model.parameters())


def _speedup(reference: nn.Module, candidate: nn.Module, x, repeats: int) -> float:
    """Median time of ``reference`` over median time of ``candidate``, from ``repeats``
    interleaved rounds of about 20 ms each (so one scheduler hiccup does not decide)."""
    medians = interleaved_medians(
        {"reference": lambda: reference(x), "candidate": lambda: candidate(x)},
        x.device,
        rounds=repeats,
        min_round_seconds=0.02,
    )
    return medians["reference"] / medians["candidate"]


def _plot(rows, dense_params: int, dense_acc: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    kept = [row["params"] / dense_params for row in rows]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(kept, [row["converted"] for row in rows], "o--", label="converted")
    axis.plot(kept, [row["tuned"] for row in rows], "o-", label="after fine-tuning")
    axis.axhline(dense_acc, color="gray", linestyle=":", label="dense")
    axis.set_xlabel("kept parameters (fraction of dense)")
    axis.set_ylabel("test accuracy")
    axis.set_title("CNN on load_digits, factorize_ with Budget(params=f)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"saved {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; ``--quick`` trains a smaller CNN for fewer epochs (for CI)."""
    parser = argparse.ArgumentParser(prog="python -m factorized_layers.demo", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small model, fewer epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="demo_accuracy.png", help="PNG path ('' for none)")
    parser.add_argument(
        "--allow-slower",
        action="store_true",
        help="convert layers even where they would run slower than dense at the test batch",
    )
    args = parser.parse_args(argv)

    width, epochs, tune_epochs, repeats = (8, 4, 1, 10) if args.quick else (32, 15, 3, 30)
    budgets = (0.5, 0.25) if args.quick else (0.5, 0.33, 0.25, 0.15)
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    print(f"load_digits: {len(y_train)} train / {len(y_test)} test images (8x8), "
          f"CNN width {width}, {torch.get_num_threads()} threads")  # fmt: skip

    torch.manual_seed(args.seed)
    dense = build_cnn(width)
    train(dense, x_train, y_train, epochs, 2e-3, args.seed, "dense")
    dense_acc = accuracy(dense, x_test, y_test)
    print(f"dense test accuracy {dense_acc:.3f}, {count_parameters(dense):,} parameters\n")

    rows, models = [], []
    for fraction in budgets:
        model = copy.deepcopy(dense)
        # Timed at the test batch: a layer that would run slower than dense stays dense.
        report = factorize_(model, rank=Budget(params=fraction), example_inputs=[x_test],
                            min_speedup=1.0, allow_slower=args.allow_slower,
                            progress=False, seed=args.seed)  # fmt: skip
        guard = "allow_slower=True" if args.allow_slower else "min_speedup=1.0"
        print(f"factorize_(model, Budget(params={fraction}), {guard}):\n{report}\n")
        converted = accuracy(model, x_test, y_test)
        train(model, x_train, y_train, tune_epochs, 5e-4, args.seed, f"fine-tune {fraction}")
        rows.append(
            {
                "budget": fraction,
                "params": count_parameters(model),
                "converted": converted,
                "tuned": accuracy(model, x_test, y_test),
                "speedup": _speedup(dense, model, x_test, repeats),
            }
        )
        models.append(model)
    print(f"\n| budget | parameters | fewer | acc dense | acc converted | acc fine-tuned | "
          f"forward speedup ({len(y_test)} images) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        fewer = count_parameters(dense) / row["params"]
        print(f"| {row['budget']} | {row['params']:,} | {fewer:.2f}x | "
              f"{dense_acc:.3f} | {row['converted']:.3f} | {row['tuned']:.3f} | "
              f"{row['speedup']:.2f}x |")  # fmt: skip
    _checkpoint_round_trip(models[-1], build_cnn(width), x_test, y_test)
    if args.plot:
        _plot(rows, count_parameters(dense), dense_acc, args.plot)
    return 0


def _checkpoint_round_trip(model: nn.Module, fresh: nn.Module, x, y) -> None:
    """Save the fine-tuned model and reload it into a freshly built dense CNN."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "digits_cnn.pt")
        save_factorized(model, path)
        size = os.path.getsize(path)
        load_factorized(fresh, path)
    same = accuracy(fresh, x, y) == accuracy(model, x, y)
    print(
        f"\nsave_factorized -> load_factorized into a fresh dense CNN: {size / 1024:.0f} KiB, "
        f"test accuracy {'identical' if same else 'DIFFERENT'} ({accuracy(fresh, x, y):.3f})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
