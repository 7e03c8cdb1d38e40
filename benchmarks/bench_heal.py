"""Healing converted real models with ``distill_``: quality vs seconds, global vs local.

Run: ``python -m benchmarks.bench_heal`` (bench extra). Each model is converted with
``factorize_(..., Budget(params=f), calibration=...)`` (sequential calibration, the
default), copied, and each copy is healed against the dense model with ``distill_`` for
the same wall-clock budget, once per mode:

- ``global``: the whole student against the whole teacher;
- ``local``: block by block on cached block inputs.

Quality is measured on held-out data only (never calibrated or trained on), at the
start, at regular points of the budget (evaluation time kept off the clock) and at the
end:

- all-MiniLM-L6-v2 (every encoder ``nn.Linear``): mean cosine of the sentence
  embeddings to the dense model's on the sentences of ``benchmarks/minilm.py`` and on
  512 held-out Wikipedia sentences; trained on 8,192 other Wikipedia and docstring
  sentences in batches of 32 of similar length (calibrated on the first 1,024);
- SmolLM2-135M (every decoder-block ``nn.Linear``): perplexity on held-out Wikipedia
  articles and on the Lee news corpus as a ratio to the dense model's; trained on the
  calibration articles.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from factorized_layers import Budget, distill_, factorize_

from .peers import optional_module
from .report import Section, Table, write_plots
from .timing import machine_info

MODES = ("global", "local")
FULL = {
    "minilm": (0.5,),
    "llm": (0.8, 0.6),
    "seconds": 300.0,
    "points": 6,
    "sentences": (1024, 8192),
}
QUICK = {"minilm": (0.5,), "llm": (), "seconds": 10.0, "points": 2, "sentences": (128, 512)}
"""``sentences``: MiniLM's calibration and training sentences (the first are a subset)."""
MINILM_RECIPE = {"batch": 32, "lr": {"global": 1e-3, "local": 1e-3}}
LLM_RECIPE = {
    "calibration_chunks": 32,
    "train_chunks": 128,
    "batch": 4,
    "lr": {"global": 1e-4, "local": 3e-4},
}


def _heal(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: List[dict],
    mode: str,
    seconds: float,
    lr: Dict[str, float],
    evaluate: Callable[[torch.nn.Module], Tuple[float, ...]],
    points: int,
) -> List[Tuple[float, int, Tuple[float, ...]]]:
    """Heal ``student`` in place; returns ``(seconds, steps, quality)`` points."""
    values: List[Tuple[float, ...]] = []

    def record(model: torch.nn.Module) -> float:
        values.append(evaluate(model))
        return values[-1][0]

    report = distill_(
        student, teacher, batches, time_budget=seconds, lr=lr[mode], mode=mode,
        evaluate=record, eval_every=seconds / points,
    )  # fmt: skip
    return [(at, steps, value) for (at, steps, _), value in zip(report.curve, values)]


def measure_minilm(
    fractions: Sequence[float], seconds: float, points: int, sentences: Tuple[int, int]
) -> List[dict]:
    """MiniLM: convert at each budget, heal a copy per mode, record the curves."""
    from .minilm import (
        ENCODER_LINEARS,
        SENTENCES,
        calibration_sentences,
        embed,
        load_minilm,
        tokenize,
    )

    recipe = MINILM_RECIPE
    calibrated, trained = sentences
    texts = calibration_sentences(trained + 512)
    if len(texts) < trained + 512:
        raise ImportError(f"needs gensim for {trained + 512} Wikipedia sentences")
    model, tokenizer = load_minilm()
    held_out_wiki = texts[-512:]
    # Batches of sentences of similar length: half the padding of a random order.
    train = sorted(texts[:trained], key=lambda text: len(tokenizer.tokenize(text)))
    calibration = texts[:calibrated]

    def batches(texts: Sequence[str], size: int) -> List[dict]:
        return [dict(tokenize(tokenizer, texts[i : i + size])) for i in range(0, len(texts), size)]

    evaluation = [dict(tokenize(tokenizer, SENTENCES))] + batches(held_out_wiki, 128)
    references = [embed(model, batch) for batch in evaluation]

    def cosines(student: torch.nn.Module) -> Tuple[float, float]:
        sims = [(embed(student, b) * r).sum(-1) for b, r in zip(evaluation, references)]
        return float(sims[0].mean()), float(torch.cat(sims[1:]).mean())

    return _convert_and_heal(
        "MiniLM", model, fractions, ENCODER_LINEARS, batches(calibration, 32),
        batches(train, recipe["batch"]), seconds, recipe["lr"], cosines, points,
    )  # fmt: skip


def measure_llm(fractions: Sequence[float], seconds: float, points: int) -> List[dict]:
    """SmolLM2: convert at each budget, heal a copy per mode, record the curves."""
    from .smollm2 import (
        load_smollm2,
        news_text,
        perplexity,
        split_articles,
        token_chunks,
        wikipedia_articles,
    )

    recipe = LLM_RECIPE
    model, tokenizer = load_smollm2()
    calibration_text, held_out_text = split_articles(wikipedia_articles())
    chunks = token_chunks(tokenizer, calibration_text, 256, recipe["train_chunks"])
    wiki = token_chunks(tokenizer, held_out_text, 256, 16)
    news = token_chunks(tokenizer, [news_text()], 256, 16)
    dense = perplexity(model, wiki), perplexity(model, news)

    def batches(tokens: torch.Tensor) -> List[dict]:
        size = recipe["batch"]
        return [
            {"input_ids": tokens[i : i + size], "use_cache": False}
            for i in range(0, tokens.shape[0], size)
        ]

    def ratios(student: torch.nn.Module) -> Tuple[float, float]:
        return perplexity(student, wiki) / dense[0], perplexity(student, news) / dense[1]

    return _convert_and_heal(
        "SmolLM2-135M", model, fractions, r"re:model\.layers\.\d+\..*",
        batches(chunks[: recipe["calibration_chunks"]]), batches(chunks), seconds,
        recipe["lr"], ratios, points,
    )  # fmt: skip


def _convert_and_heal(
    name: str,
    model: torch.nn.Module,
    fractions: Sequence[float],
    include: str,
    calibration: List[dict],
    train: List[dict],
    seconds: float,
    lr: Dict[str, float],
    evaluate: Callable[[torch.nn.Module], Tuple[float, ...]],
    points: int,
) -> List[dict]:
    """Convert ``model`` at each budget, heal one copy per mode; one row per pair."""
    rows = []
    for fraction in fractions:
        converted = copy.deepcopy(model)
        start = time.perf_counter()
        factorize_(
            converted, Budget(params=fraction), include=[include], calibration=calibration,
            progress=False,
        )  # fmt: skip
        conversion = time.perf_counter() - start
        for mode in MODES:
            student = copy.deepcopy(converted)
            curve = _heal(student, model, train, mode, seconds, lr, evaluate, points)
            rows.append(
                {"model": name, "fraction": fraction, "mode": mode, "conversion": conversion,
                 "curve": curve}
            )  # fmt: skip
            print(f"  {name} {fraction} {mode}: {_describe(curve)}", flush=True)
            del student
        del converted
    return rows


def _describe(curve: List[Tuple[float, int, Tuple[float, ...]]]) -> str:
    first, last = curve[0][2], curve[-1][2]
    return f"{first} -> {last} in {curve[-1][0]:.0f} s, {curve[-1][1]} steps"


def table(rows: List[dict], seconds: float) -> Table:
    """One row per model, budget and mode: quality before and after healing."""
    out = Table(
        f"Healing with `distill_` for {seconds:.0f} s of training on this machine's CPU "
        "(evaluation time excluded), after `factorize_(..., Budget(params=f))` with "
        "sequential calibration. MiniLM: mean embedding cosine to the dense model on the "
        "evaluation sentences / on 512 held-out Wikipedia sentences. SmolLM2: held-out "
        "Wikipedia / news perplexity as a ratio to the dense model's. One run.",
        ["model", "kept", "mode", "converted", "healed", "steps", "s / step", "conversion"],
    )  # fmt: skip
    for row in rows:
        curve = row["curve"]
        first, last = curve[0][2], curve[-1][2]
        steps = curve[-1][1]
        spec = ".3f" if row["model"] == "MiniLM" else ".2f"
        suffix = "" if row["model"] == "MiniLM" else "x"
        out.add(
            row["model"],
            row["fraction"],
            row["mode"],
            f"{first[0]:{spec}}{suffix} / {first[1]:{spec}}{suffix}",
            f"{last[0]:{spec}}{suffix} / {last[1]:{spec}}{suffix}",
            steps,
            f"{curve[-1][0] / max(steps, 1):.3f}",
            f"{row['conversion']:.0f} s",
        )
    return out


def _headline(model: str, rows: List[dict], config: dict) -> str:
    """Before -> after of the best mode at each budget (highest cosine, lowest perplexity)."""
    sign = 1.0 if model == "MiniLM" else -1.0
    best: Dict[float, dict] = {}
    for row in rows:
        current = best.get(row["fraction"])
        if current is None or sign * row["curve"][-1][2][0] > sign * current["curve"][-1][2][0]:
            best[row["fraction"]] = row
    unit = "mean embedding cosine" if model == "MiniLM" else "held-out Wikipedia perplexity / dense"
    parts = [
        f"{f}: {r['curve'][0][2][0]:.3f} -> {r['curve'][-1][2][0]:.3f} ({r['mode']})"
        for f, r in best.items()
    ]
    return (
        f"{model} healed by distill_ in {config['seconds']:.0f} s on the CPU, {unit}: "
        + ", ".join(parts)
        + "."
    )


def section(quick: bool, device: str) -> Section:
    """Healing table, curve plot points and a headline per model."""
    return section_for(QUICK if quick else FULL, device)


def section_for(config: dict, device: str) -> Section:
    """:func:`section` for an explicit configuration (models, budgets, seconds)."""
    result = Section("heal", "Healing converted models with distill_")
    module, why = optional_module("transformers")
    if module is None:
        result.skipped = why
        return result
    if device != "cpu":
        result.skipped = "runs on the CPU only"
        return result
    rows = []
    if config["minilm"]:
        try:
            from .minilm import model_dir

            model_dir()
            rows += measure_minilm(
                config["minilm"], config["seconds"], config["points"], config["sentences"]
            )
        except ImportError as exc:
            result.notes.append(f"MiniLM skipped: {exc}")
    if config["llm"]:
        if optional_module("gguf")[0] is None or optional_module("gensim")[0] is None:
            result.notes.append("SmolLM2 skipped: needs gguf and gensim")
        else:
            try:
                rows += measure_llm(config["llm"], config["seconds"], config["points"])
            except ImportError as exc:
                result.notes.append(f"SmolLM2 skipped: {exc}")
    if not rows:
        result.skipped = "; ".join(result.notes) or "no model available"
        return result
    result.tables.append(table(rows, config["seconds"]))
    result.points["heal"] = [
        {"panel": f"{r['model']} at {r['fraction']}", "series": r["mode"],
         "seconds": at, "quality": value[0]}
        for r in rows for at, _, value in r["curve"]
    ]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in rows):
        result.headline.append(_headline(model, [r for r in rows if r["model"] == model], config))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--models", default="minilm,llm", help="comma-separated subset of minilm,llm"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder of the quality-vs-seconds plot",
    )
    args = parser.parse_args()
    chosen = set(args.models.split(","))
    config = dict(QUICK if args.quick else FULL)
    for model in ("minilm", "llm"):
        if model not in chosen:
            config[model] = ()
    print(machine_info())
    result = section_for(config, "cpu")
    print(result.markdown())
    names, why_not = write_plots([result], args.out, f"cpu_{'_'.join(sorted(chosen))}")
    print(why_not or "wrote " + ", ".join(str(args.out / name) for name in names))


if __name__ == "__main__":
    main()
