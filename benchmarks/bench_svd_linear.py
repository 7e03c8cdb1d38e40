"""SVDLinear vs dense nn.Linear, a hand-written two-matmul module and TensorLy-Torch.

Run: ``python -m benchmarks.bench_svd_linear [--device cuda] [--quick] [--threads N]``.

Prints two markdown tables: forward time (interleaved rounds, medians, ratios within
one run) and ``from_dense`` time/error of SVDLinear's full and randomized SVD against
TensorLy's ``svd_interface`` (truncated and randomized) and TensorLy-Torch's
``FactorizedLinear.from_linear`` with a CP factorization of the untensorized matrix
(one mode per side: exactly a rank-``r`` product, TensorLy-Torch has no plain low-rank
layer), all at the same rank.
Targets (issue 2): at batch >= 64 on sizes >= 1536x384 the speedup over dense is at
least 0.85x the FLOP ratio; at batch 1 SVDLinear takes at most 1.25x the two-matmul
reference; the randomized from_dense of a 4096x4096 layer at rank fraction 0.25 is
>= 3x faster than the full SVD with error <= 1.01x the optimum (``benchmarks.bench_memory``
measures that size).
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial
from types import ModuleType
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import SVDLinear, resolve_matrix_rank
from factorized_layers.decompose import svd_tail_error
from factorized_layers.ranks import dense_linear_flops, low_rank_linear_flops

from .peers import optional_module, version
from .report import Section, Table, fmt_ratio, fmt_time, median
from .timing import interleaved_medians, machine_info

SIZES = [(384, 384), (1536, 384), (4096, 4096)]
BATCHES = [1, 64, 4096]
FRACTIONS = [0.25, 0.5]
ROUNDS = 15
FROM_DENSE_SIZE = 1024
FROM_DENSE_FRACTIONS = [0.1, 0.25, 0.5]
FROM_DENSE_REPEATS = 3
FULL = {
    "sizes": SIZES,
    "batches": BATCHES,
    "fractions": FRACTIONS,
    "rounds": ROUNDS,
    "from_dense_size": FROM_DENSE_SIZE,
    "from_dense_fractions": FROM_DENSE_FRACTIONS,
    "from_dense_repeats": FROM_DENSE_REPEATS,
}
QUICK = {
    "sizes": [(384, 384)],
    "batches": [1, 64],
    "fractions": [0.25],
    "rounds": 3,
    "from_dense_size": 256,
    "from_dense_fractions": [0.25],
    "from_dense_repeats": 1,
}


class TwoMatmulReference(nn.Module):
    """What a user would write by hand: a module doing two F.linear calls, no planning."""

    def __init__(
        self, input_factor: torch.Tensor, output_factor: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.input_factor, self.output_factor, self.bias = input_factor, output_factor, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.input_factor), self.output_factor, self.bias)


def tltorch_low_rank(
    tltorch: ModuleType, in_features: int, out_features: int, rank: int, device: str
) -> nn.Module:
    """TensorLy-Torch's closest layer: CP over one mode per side, i.e. a rank-``rank`` matrix.

    Built with random factors (forward cost does not depend on their values), with
    ``rank * (in + out + 1)`` weight parameters against SVDLinear's ``rank * (in + out)``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tltorch.FactorizedLinear(
            (in_features,),
            (out_features,),
            factorization="cp",
            rank=rank,
            implementation="factorized",
            device=device,
        ).eval()


def forward_rows(
    device: str,
    rounds: int,
    sizes: Sequence[Tuple[int, int]] = SIZES,
    batches: Sequence[int] = BATCHES,
    fractions: Sequence[float] = FRACTIONS,
) -> Tuple[List[dict], str]:
    """Median forward seconds per candidate for every size x fraction x batch.

    Returns ``(rows, note)``: each row has ``in``, ``out``, ``batch``, ``fraction``,
    ``rank``, ``flop_ratio`` and the medians ``dense``, ``svd``, ``ref`` and ``tltorch``
    (``None`` without tltorch; ``note`` then says why).
    """
    tltorch, note = optional_module("tltorch")
    rows = []
    for in_features, out_features in sizes:
        torch.manual_seed(0)
        dense = nn.Linear(in_features, out_features, device=device)
        for fraction in fractions:
            layer = SVDLinear.from_dense(dense, fraction)
            reference = TwoMatmulReference(layer.input_factor, layer.output_factor, layer.bias)
            peer = None
            if tltorch is not None:
                peer = tltorch_low_rank(tltorch, in_features, out_features, layer.rank, device)
            for batch in batches:
                x = torch.randn(batch, in_features, device=device)
                candidates: Dict[str, Callable[[], object]] = {
                    "dense": partial(dense, x),
                    "svd": partial(layer, x),
                    "ref": partial(reference, x),
                }
                if peer is not None:
                    candidates["tltorch"] = partial(peer, x)
                med = interleaved_medians(candidates, rounds=rounds, device=device)
                flop_ratio = dense_linear_flops(
                    in_features, out_features, batch
                ) / low_rank_linear_flops(in_features, out_features, layer.rank, batch)
                rows.append(
                    {
                        "in": in_features,
                        "out": out_features,
                        "batch": batch,
                        "fraction": fraction,
                        "rank": layer.rank,
                        "flop_ratio": flop_ratio,
                        "tltorch": med.get("tltorch"),
                        **{k: med[k] for k in ("dense", "svd", "ref")},
                    }
                )
                print(
                    f"  {in_features}x{out_features} batch {batch} rank {layer.rank}: "
                    f"{med['dense'] / med['svd']:.2f}x dense",
                    flush=True,
                )
    if tltorch is not None:
        note = f"{version(tltorch)}: FactorizedLinear, factorization='cp', one mode per side"
    return rows, note


def forward_table(rows: Sequence[dict], device: str, rounds: int) -> Table:
    """Forward rows as a table; ratios are within each row's interleaved measurement."""
    table = Table(
        f"Forward time of dense `nn.Linear` (default init), `SVDLinear.from_dense`, a "
        f"hand-written two-`F.linear` module on the same factors and TensorLy-Torch's CP "
        f"matrix layer at the same rank (equal parameters up to `rank` CP weights), on "
        f"{device}; Gaussian input, `torch.no_grad()`, {rounds} interleaved rounds of "
        f"~20 ms blocks, medians.",
        [
            "in x out", "batch", "rank (frac)", "dense", "SVDLinear", "two-matmul ref",
            "tltorch CP", "speedup vs dense", "FLOP ratio", "speedup / FLOP ratio",
            "SVDLinear / ref", "speedup vs tltorch",
        ],
    )  # fmt: skip
    for r in rows:
        speedup = r["dense"] / r["svd"]
        table.add(
            f"{r['in']}x{r['out']}",
            r["batch"],
            f"{r['rank']} ({r['fraction']})",
            fmt_time(r["dense"]),
            fmt_time(r["svd"]),
            fmt_time(r["ref"]),
            fmt_time(r["tltorch"]),
            fmt_ratio(speedup),
            f"{r['flop_ratio']:.2f}",
            f"{speedup / r['flop_ratio']:.2f}",
            f"{r['svd'] / r['ref']:.2f}",
            fmt_ratio(r["tltorch"] / r["svd"] if r["tltorch"] else None),
        )
    return table


def _timed(fn: Callable[[], object], device: str) -> Tuple[object, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def _from_dense_methods(
    dense: nn.Linear, fraction: float
) -> Tuple[int, Dict[str, Callable[[], torch.Tensor]], List[str]]:
    """``(rank, {method: () -> approximated weight}, notes)`` for one layer and fraction."""
    rank = resolve_matrix_rank(fraction, dense.out_features, dense.in_features)
    weight = dense.weight.detach()
    methods: Dict[str, Callable[[], torch.Tensor]] = {
        "SVDLinear full": lambda: SVDLinear.from_dense(dense, rank, method="full").dense_weight(),
        "SVDLinear randomized": lambda: SVDLinear.from_dense(
            dense, rank, method="randomized"
        ).dense_weight(),
    }
    notes = []
    tensorly, why = optional_module("tensorly")
    if tensorly is None:
        notes.append(f"{why}: its rows are missing")
    else:
        from tensorly.tenalg import svd_interface

        def tensorly_svd(method: str) -> torch.Tensor:
            with tensorly.backend_context("pytorch"):
                u, s, v = svd_interface(weight, method=method, n_eigenvecs=rank)
            return (u * s) @ v

        methods["tensorly truncated_svd"] = partial(tensorly_svd, "truncated_svd")
        methods["tensorly randomized_svd"] = partial(tensorly_svd, "randomized_svd")
        notes.append(f"{version(tensorly)}: `tenalg.svd_interface` on the pytorch backend")
    tltorch, why = optional_module("tltorch")
    if tltorch is None:
        notes.append(f"{why}: its rows are missing")
    else:

        def tltorch_cp() -> torch.Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer = tltorch.FactorizedLinear.from_linear(
                    dense,
                    rank=rank,
                    auto_tensorize=False,
                    in_tensorized_features=(dense.in_features,),
                    out_tensorized_features=(dense.out_features,),
                    factorization="cp",
                    implementation="factorized",
                )
            return layer.weight.to_matrix()

        methods["tltorch CP from_linear"] = tltorch_cp
        notes.append(f"{version(tltorch)}: `FactorizedLinear.from_linear`, CP, one mode per side")
    return rank, methods, notes


def from_dense_rows(
    device: str,
    size: int = FROM_DENSE_SIZE,
    fractions: Sequence[float] = FROM_DENSE_FRACTIONS,
    repeats: int = FROM_DENSE_REPEATS,
) -> Tuple[List[dict], List[str]]:
    """Median time and error / optimum of every method at every fraction, interleaved.

    Returns ``(rows, notes)``; each row has ``fraction``, ``rank``, ``method``, ``kept``
    (weight parameters / dense), ``seconds``, ``error`` (relative Frobenius error of the
    weight) and ``optimum_ratio`` (``error`` over the Eckart-Young optimum).
    """
    torch.manual_seed(0)
    dense = nn.Linear(size, size, device=device)
    singular_values = torch.linalg.svdvals(dense.weight.detach().double())
    rows: List[dict] = []
    notes: List[str] = []
    with torch.no_grad():
        for fraction in fractions:
            rank, methods, method_notes = _from_dense_methods(dense, fraction)
            notes += [note for note in method_notes if note not in notes]
            times: Dict[str, List[float]] = {name: [] for name in methods}
            errors: Dict[str, float] = {}
            for _ in range(repeats):
                for name in list(methods):
                    try:
                        approx, seconds = _timed(methods[name], device)
                    except Exception as error:  # noqa: BLE001 - a peer may fail, e.g. on CUDA
                        if name.startswith("SVDLinear"):
                            raise
                        notes.append(f"{name} failed: {type(error).__name__}: {error}")
                        del methods[name]
                        continue
                    times[name].append(seconds)
                    approx = approx.to(dense.weight.device)
                    errors[name] = float((approx - dense.weight).norm() / dense.weight.norm())
            optimum = svd_tail_error(singular_values, rank)
            print(
                f"  from_dense {size}x{size} rank {rank}: "
                + ", ".join(f"{name} {fmt_time(median(times[name]))}" for name in methods),
                flush=True,
            )
            for name in methods:
                rows.append(
                    {
                        "fraction": fraction,
                        "rank": rank,
                        "method": name,
                        "kept": rank * 2 * size / size**2,
                        "seconds": median(times[name]),
                        "error": errors[name],
                        "optimum_ratio": errors[name] / optimum,
                    }
                )
    return rows, notes


def from_dense_table(rows: Sequence[dict], size: int, repeats: int, device: str) -> Table:
    """From-dense rows as a table; speedups are against SVDLinear's full SVD at that rank."""
    table = Table(
        f"`from_dense` of a {size}x{size} `nn.Linear` (default init: a flat Marchenko-Pastur "
        f"spectrum) on {device}: wall time (median of {repeats} repeat(s), methods "
        "interleaved) and relative weight error, divided by the Eckart-Young optimum at that "
        "rank.",
        ["rank (frac)", "method", "median time", "speedup vs SVDLinear full", "error",
         "error / optimum"],
    )  # fmt: skip
    full = {r["fraction"]: r["seconds"] for r in rows if r["method"] == "SVDLinear full"}
    for r in rows:
        table.add(
            f"{r['rank']} ({r['fraction']})",
            r["method"],
            fmt_time(r["seconds"]),
            fmt_ratio(full[r["fraction"]] / r["seconds"]),
            f"{r['error']:.4f}",
            f"{r['optimum_ratio']:.4f}",
        )
    return table


def _from_dense_headline(rows: Sequence[dict], size: int) -> str:
    """Time and error / optimum of every method at rank fraction 0.25 (or the first one)."""
    fractions = [r["fraction"] for r in rows]
    fraction = 0.25 if 0.25 in fractions else fractions[0]
    at = {r["method"]: r for r in rows if r["fraction"] == fraction}
    full = at.pop("SVDLinear full")
    return (
        f"`from_dense` of a {size}x{size} layer at rank fraction {fraction}: SVDLinear's full "
        f"SVD {fmt_time(full['seconds'])} at error / optimum {full['optimum_ratio']:.4f}; "
        "speed relative to it and error / optimum: "
        + "; ".join(
            f"{name} {full['seconds'] / r['seconds']:.2f}x, {r['optimum_ratio']:.4f}"
            for name, r in at.items()
        )
        + "."
    )


def section(quick: bool, device: str) -> Section:
    """Both tables, headline ratios and plot points for the suite."""
    cfg = QUICK if quick else FULL
    result = Section("svd_linear", "SVDLinear: forward vs dense and tltorch, from_dense")
    rows, note = forward_rows(device, cfg["rounds"], cfg["sizes"], cfg["batches"], cfg["fractions"])
    result.tables.append(forward_table(rows, device, cfg["rounds"]))
    result.notes.append(note)
    fits, notes = from_dense_rows(
        device, cfg["from_dense_size"], cfg["from_dense_fractions"], cfg["from_dense_repeats"]
    )
    result.tables.append(
        from_dense_table(fits, cfg["from_dense_size"], cfg["from_dense_repeats"], device)
    )
    result.notes += notes
    speedups = [r["dense"] / r["svd"] for r in rows]
    result.headline.append(
        f"SVDLinear forward vs dense `nn.Linear`: best {max(speedups):.2f}x, median "
        f"{median(speedups):.2f}x over {len(rows)} size/batch/rank rows"
        + (
            f"; median {median([r['tltorch'] / r['svd'] for r in rows]):.2f}x TensorLy-Torch's "
            "CP matrix layer at the same rank"
            if all(r["tltorch"] for r in rows)
            else ""
        )
        + "."
    )
    result.headline.append(_from_dense_headline(fits, cfg["from_dense_size"]))
    result.points["speedup"] = [
        {"layer": "SVDLinear", "flop_ratio": r["flop_ratio"], "speedup": r["dense"] / r["svd"]}
        for r in rows
    ]
    result.points["error"] = [
        {
            "weight": f"{cfg['from_dense_size']}x{cfg['from_dense_size']} nn.Linear init "
            "(weight error)",
            "method": r["method"],
            "kept": r["kept"],
            "error": r["error"],
        }
        for r in fits
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# SVDLinear benchmark on {args.device}: {machine_info(args.device)}\n")
    result = section(args.quick, args.device)
    print(result.markdown())


if __name__ == "__main__":
    main()
