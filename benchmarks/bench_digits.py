"""Digits CNN: test accuracy vs kept parameters after factorize_, with and without fine-tuning.

Run: ``python -m benchmarks.bench_digits [--quick] [--device cuda]`` (needs scikit-learn
for ``load_digits``). Reuses the demo's data split, CNN, training loop and accuracy
(:mod:`factorized_layers.demo`): the dense CNN is trained once, then a copy is converted
in place with ``factorize_(model, Budget(params=f))`` for every budget ``f`` (CP
convolutions, low-rank linears), evaluated, fine-tuned and evaluated again. Forward time
of the dense and converted models on the test images is measured with interleaved
rounds in the same run.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial
from typing import List, Sequence

import torch

from factorized_layers import Budget, demo, factorize_

from .peers import optional_module
from .report import Section, Table, fmt_ratio, fmt_time
from .timing import interleaved_medians, machine_info

BUDGETS = (0.5, 0.33, 0.25, 0.15)
WIDTH, EPOCHS, TUNE_EPOCHS = 32, 15, 3
ROUNDS = 15
FULL = {
    "budgets": BUDGETS,
    "width": WIDTH,
    "epochs": EPOCHS,
    "tune_epochs": TUNE_EPOCHS,
    "rounds": ROUNDS,
}
QUICK = {"budgets": (0.5, 0.25), "width": 8, "epochs": 4, "tune_epochs": 1, "rounds": 5}


def measure(
    budgets: Sequence[float] = BUDGETS,
    width: int = WIDTH,
    epochs: int = EPOCHS,
    tune_epochs: int = TUNE_EPOCHS,
    rounds: int = ROUNDS,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Train the demo CNN, then convert, evaluate and fine-tune a copy per budget.

    Returns a dict with ``dense_params``, ``dense_accuracy``, ``test_images`` and
    ``rows`` (``budget``, ``params``, ``converted``/``tuned`` accuracies, ``seconds``
    and ``dense_seconds``: converted and dense forward on the test set, interleaved).
    """
    x_train, y_train, x_test, y_test = (t.to(device) for t in demo.load_digits_split(seed))
    torch.manual_seed(seed)
    dense = demo.build_cnn(width).to(device)
    demo.train(dense, x_train, y_train, epochs, 2e-3, seed, "dense")
    rows: List[dict] = []
    for fraction in budgets:
        model = copy.deepcopy(dense)
        factorize_(model, rank=Budget(params=fraction), progress=False, seed=seed)
        converted = demo.accuracy(model, x_test, y_test)
        demo.train(model, x_train, y_train, tune_epochs, 5e-4, seed, f"fine-tune {fraction}")
        times = interleaved_medians(
            {"dense": partial(dense, x_test), "converted": partial(model, x_test)},
            rounds=rounds,
            device=device,
        )
        rows.append(
            {
                "budget": fraction,
                "params": demo.count_parameters(model),
                "converted": converted,
                "tuned": demo.accuracy(model, x_test, y_test),
                "seconds": times["converted"],
                "dense_seconds": times["dense"],
            }
        )
    return {
        "dense_params": demo.count_parameters(dense),
        "dense_accuracy": demo.accuracy(dense, x_test, y_test),
        "test_images": len(y_test),
        "rows": rows,
    }


def table(result: dict, width: int, epochs: int, tune_epochs: int, rounds: int) -> Table:
    """One row per budget after the dense model's."""
    out = Table(
        f"CNN of `factorized_layers.demo` (width {width}) on scikit-learn's `load_digits` "
        f"(8x8 images, 80/20 split, seed 0): trained {epochs} epochs, converted with "
        f"`factorize_(model, Budget(params=f))`, fine-tuned {tune_epochs} epoch(s); test "
        f"accuracy on {result['test_images']} images; forward on all test images, {rounds} "
        f"interleaved rounds against the dense model, medians.",
        ["budget", "parameters", "kept", "accuracy converted", "accuracy fine-tuned",
         "forward", "forward speedup vs dense"],
    )  # fmt: skip
    dense_params, dense_acc = result["dense_params"], result["dense_accuracy"]
    out.add("dense", f"{dense_params:,}", "1.000", f"{dense_acc:.3f}", f"{dense_acc:.3f}", "-", "-")
    for r in result["rows"]:
        out.add(
            r["budget"],
            f"{r['params']:,}",
            f"{r['params'] / dense_params:.3f}",
            f"{r['converted']:.3f}",
            f"{r['tuned']:.3f}",
            fmt_time(r["seconds"]),
            fmt_ratio(r["dense_seconds"] / r["seconds"]),
        )
    return out


def section(quick: bool, device: str) -> Section:
    """The table, an accuracy headline and plot points; skipped without scikit-learn."""
    result = Section("digits", "Digits CNN: accuracy vs kept parameters")
    sklearn, why = optional_module("sklearn")
    if sklearn is None:
        result.skipped = f"{why}; the real data set comes from scikit-learn"
        return result
    cfg = QUICK if quick else FULL
    measured = measure(
        cfg["budgets"], cfg["width"], cfg["epochs"], cfg["tune_epochs"], cfg["rounds"], device
    )
    result.tables.append(
        table(measured, cfg["width"], cfg["epochs"], cfg["tune_epochs"], cfg["rounds"])
    )
    smallest = min(measured["rows"], key=lambda r: r["params"])
    dense_params = measured["dense_params"]
    result.headline.append(
        f"Digits CNN at {dense_params / smallest['params']:.2f}x fewer parameters: test "
        f"accuracy {smallest['converted']:.3f} converted, {smallest['tuned']:.3f} fine-tuned "
        f"(dense {measured['dense_accuracy']:.3f})."
    )
    result.points["accuracy"] = [
        {"series": "dense", "kept": 1.0, "accuracy": measured["dense_accuracy"]}
    ]
    for key, series in (("converted", "converted"), ("tuned", "fine-tuned")):
        result.points["accuracy"] += [
            {"series": series, "kept": r["params"] / dense_params, "accuracy": r[key]}
            for r in measured["rows"]
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller CNN, fewer epochs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(machine_info(args.device))
    print(section(args.quick, args.device).markdown())


if __name__ == "__main__":
    main()
