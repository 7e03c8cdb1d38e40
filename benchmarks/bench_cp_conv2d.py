"""CPConv2d vs dense nn.Conv2d vs TensorLy-Torch's CP convolution, in one run.

Forward time (interleaved repeats, medians) for 64->128 3x3 on 32x32 (batch 16) and
256->256 3x3 on 14x14 (batch 8) at rank fractions 0.1 and 0.25, on NCHW and on
channels-last input (every layer gets the same input the user passes; any format
conversion a layer does is inside its time), plus ``from_dense`` time and kernel fit
error against tltorch's ``FactorizedConv.from_conv``. Prints a markdown table.

    python benchmarks/bench_cp_conv2d.py              # the table (or python -m benchmarks...)
    python benchmarks/bench_cp_conv2d.py --depthwise  # merged vs separable depthwise
    python benchmarks/bench_cp_conv2d.py --contraction  # GEMM vs 1x1 conv vs opt_einsum

Options: ``--threads N`` (default 2), ``--repeats N`` (interleaved rounds, default 7),
``--forward-only`` (tltorch layer built with random factors instead of its slow fit).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import benchmark

if __package__ in (None, ""):
    # Run as a plain script: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import optional_module, version  # noqa: E402
from benchmarks.report import Section, Table, fmt_range, fmt_ratio, median  # noqa: E402
from benchmarks.timing import machine_info  # noqa: E402
from factorized_layers.contract import contract  # noqa: E402
from factorized_layers.layers.cp import CPConv2d  # noqa: E402
from factorized_layers.ranks import (  # noqa: E402
    cp_conv_flops,
    cp_params,
    dense_conv_flops,
    resolve_cp_rank,
)

CONFIGS = [
    # (name, in, out, kernel, image, batch)
    ("64->128 3x3 32x32 b16", 64, 128, 3, 32, 16),
    ("256->256 3x3 14x14 b8", 256, 256, 3, 14, 8),
]
FRACTIONS = (0.1, 0.25)
FORMATS = ("NCHW", "channels_last")
REPEATS = 7
_FIT_REPEATS = 3
_FIT_REPEAT_BELOW_S = 2.0
"""``from_dense`` and tltorch's ``from_conv`` alternate up to ``_FIT_REPEATS`` times
(medians reported) while tltorch's fit takes under ``_FIT_REPEAT_BELOW_S`` seconds;
slower fits run once each."""
FULL = {"configs": CONFIGS, "fractions": FRACTIONS, "formats": FORMATS, "repeats": REPEATS}
QUICK = {
    "configs": [("32->64 3x3 16x16 b4", 32, 64, 3, 16, 4)],
    "fractions": (0.25,),
    "formats": ("NCHW",),
    "repeats": 3,
}


def _interleaved(candidates: dict, repeats: int, threads: int, budget: float = 0.15) -> dict:
    """Median seconds per call of each candidate, timing them round-robin."""
    timers, numbers = {}, {}
    for name, fn in candidates.items():
        fn()  # warm-up: oneDNN primitive creation, allocator
        timers[name] = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        numbers[name] = max(1, min(50, int(budget / max(once, 1e-6))))
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(numbers[name]).mean)
    return {name: statistics.median(values) for name, values in samples.items()}


def _no_grad_call(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return call


def _fit_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((approx.detach() - weight.detach()).norm() / weight.detach().norm())


def _tltorch_conv(
    tltorch: ModuleType, dense: nn.Conv2d, rank: int, fit: bool
) -> Tuple[nn.Module | None, float, float, str]:
    """``(layer, from_conv seconds, fit error, note)``; ``layer`` is ``None`` on failure.

    Without ``fit`` the layer gets random factors (forward cost does not depend on them)
    and the time and error are NaN.
    """
    cin, cout, kernel = dense.in_channels, dense.out_channels, dense.kernel_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not fit:
                layer = tltorch.FactorizedConv(
                    cin, cout, kernel, padding=dense.padding, bias=True, rank=rank,
                    factorization="cp", implementation="factorized",
                )  # fmt: skip
                return layer.to(dense.weight.device).eval(), math.nan, math.nan, ""
            start = time.perf_counter()
            layer = tltorch.FactorizedConv.from_conv(
                dense, rank=rank, factorization="cp", implementation="factorized"
            )
            seconds = time.perf_counter() - start
        layer = layer.to(dense.weight.device).eval()
        return layer, seconds, _fit_error(dense.weight, layer.weight.to_tensor()), ""
    except Exception as error:  # noqa: BLE001 - a peer's failure is reported, not fatal
        return None, math.nan, math.nan, f"tltorch failed: {type(error).__name__}: {error}"


def measure(
    threads: int,
    repeats: int,
    fit: bool = True,
    configs: Sequence[tuple] = CONFIGS,
    fractions: Sequence[float] = FRACTIONS,
    formats: Sequence[str] = FORMATS,
    device: str = "cpu",
) -> Tuple[List[dict], List[dict], List[str]]:
    """Forward medians and ``from_dense`` fits of CPConv2d, dense and tltorch.

    Returns ``(forward_rows, fit_rows, notes)``. A forward row has ``layer``, ``rank``,
    ``fraction``, ``format``, ``flop_ratio`` and the median seconds ``dense``, ``cp``,
    ``tltorch`` (``None`` without tltorch); a fit row has ``layer``, ``rank``,
    ``fraction``, ``kept``, ``seconds``, ``sweeps``, ``error``, ``tl_seconds`` and
    ``tl_error`` (NaN without a tltorch fit).
    """
    tltorch, why = optional_module("tltorch")
    notes = []
    if tltorch is None:
        notes.append(f"{why}: its columns are left empty")
    else:
        notes.append(
            f"{version(tltorch)} (FactorizedConv, factorization='cp', implementation='factorized'"
            + ("" if fit else ", random factors: --forward-only")
            + ")"
        )
    forward_rows, fit_rows = [], []
    if fit:
        # One-time costs (lazy library initialisation, first-call caches) stay out of
        # both timed fits: each method fits a small kernel first.
        warm = nn.Conv2d(8, 16, 3, padding=1).to(device)
        CPConv2d.from_dense(warm, 4, seed=0)
        if tltorch is not None:
            _tltorch_conv(tltorch, warm, 4, fit)
    # cuDNN convolutions may run in TF32 on CUDA; the CP path's GEMMs do not.
    tolerance = 2e-2 if device.startswith("cuda") else 1e-3
    for name, cin, cout, k, size, batch in configs:
        torch.manual_seed(0)
        dense = nn.Conv2d(cin, cout, k, padding=1).to(device).eval()
        for fraction in fractions:
            rank = resolve_cp_rank(fraction, (cout, cin, k, k))
            ours_runs, theirs_runs, theirs = [], [], None
            for _ in range(_FIT_REPEATS):
                start = time.perf_counter()
                ours = CPConv2d.from_dense(dense, rank, seed=0).eval()
                ours_runs.append(time.perf_counter() - start)
                if tltorch is None:
                    break
                layer, seconds, error, note = _tltorch_conv(tltorch, dense, rank, fit)
                if note and note not in notes:
                    notes.append(note)
                if layer is None:
                    break  # a failure is reported, not retried
                if theirs is None:
                    theirs = layer
                theirs_runs.append((seconds, error))
                if not (fit and seconds < _FIT_REPEAT_BELOW_S):
                    break
            ours_fit_s = statistics.median(ours_runs)
            theirs_fit_s = theirs_err = math.nan
            if theirs_runs:
                theirs_fit_s = statistics.median(t for t, _ in theirs_runs)
                theirs_err = statistics.median(e for _, e in theirs_runs)
            fit_rows.append(
                {
                    "layer": name,
                    "rank": rank,
                    "fraction": fraction,
                    "kept": cp_params((cout, cin, k, k), rank) / (cout * cin * k * k),
                    "seconds": ours_fit_s,
                    "sweeps": ours.fit_info["n_iter"],
                    "error": ours.fit_error,
                    "tl_seconds": theirs_fit_s,
                    "tl_error": theirs_err,
                }
            )
            ratio = dense_conv_flops(cin, cout, (k, k)) / cp_conv_flops(cin, cout, (k, k), rank)
            for fmt in formats:
                x = torch.randn(batch, cin, size, size, device=device)
                if fmt == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                candidates = {"dense": _no_grad_call(dense, x), "cp": _no_grad_call(ours, x)}
                if theirs is not None:
                    candidates["tltorch"] = _no_grad_call(theirs, x)
                with torch.no_grad():
                    times = _interleaved(candidates, repeats, threads)
                    torch.testing.assert_close(
                        ours(x),
                        F.conv2d(x, ours.dense_weight(), ours.bias, padding=1),
                        rtol=tolerance,
                        atol=tolerance,
                    )
                forward_rows.append(
                    {
                        "layer": name,
                        "rank": rank,
                        "fraction": fraction,
                        "format": fmt,
                        "flop_ratio": ratio,
                        "dense": times["dense"],
                        "cp": times["cp"],
                        "tltorch": times.get("tltorch"),
                    }
                )
                print(
                    f"  {name} rank {rank} {fmt}: {times['dense'] / times['cp']:.2f}x dense "
                    f"(from_dense {ours_fit_s:.2f} s, tltorch from_conv {theirs_fit_s:.2f} s)",
                    flush=True,
                )
    return forward_rows, fit_rows, notes


def forward_table(rows: Sequence[dict], repeats: int, device: str) -> Table:
    """Forward rows; ``/ (0.5 x FLOP ratio)`` is the issue's target (>= 1 meets it)."""
    table = Table(
        f"Forward time of dense `nn.Conv2d` (padding 1), `CPConv2d.from_dense` and "
        f"TensorLy-Torch's CP `FactorizedConv` at the same rank, on {device}, NCHW and "
        f"channels_last input (a layer's own layout changes are inside its time); "
        f"`torch.utils.benchmark.Timer`, {repeats} interleaved repeats, medians.",
        ["layer", "rank (frac)", "input", "FLOP ratio", "dense ms", "CP ms", "tltorch ms",
         "speedup vs dense", "/ (0.5 x FLOP ratio)", "speedup vs tltorch"],
    )  # fmt: skip
    for r in rows:
        speedup = r["dense"] / r["cp"]
        table.add(
            r["layer"],
            f"{r['rank']} ({r['fraction']})",
            r["format"],
            f"{r['flop_ratio']:.1f}",
            f"{r['dense'] * 1e3:.2f}",
            f"{r['cp'] * 1e3:.2f}",
            "-" if r["tltorch"] is None else f"{r['tltorch'] * 1e3:.2f}",
            fmt_ratio(speedup),
            f"{speedup / (0.5 * r['flop_ratio']):.2f}",
            fmt_ratio(r["tltorch"] / r["cp"] if r["tltorch"] else None),
        )
    return table


def fit_table(rows: Sequence[dict], device: str) -> Table:
    """``from_dense`` vs tltorch's ``from_conv`` at the same rank."""
    table = Table(
        f"`CPConv2d.from_dense` (CP-ALS, seed 0) vs TensorLy-Torch's `from_conv` at the same "
        f"rank on a default-init `nn.Conv2d`, on {device}: wall time (median of "
        f"{_FIT_REPEATS} alternating runs each where tltorch's fit takes under "
        f"{_FIT_REPEAT_BELOW_S:g} s, else one run each; after one untimed fit of a small "
        f"kernel by each) and relative Frobenius fit error (tltorch's: median over its "
        f"runs, whose random initial columns differ).",
        ["layer", "rank (frac)", "from_dense s", "CP-ALS sweeps", "fit error",
         "tltorch from_conv s", "tltorch fit error", "from_dense speedup"],
    )  # fmt: skip
    for r in rows:
        table.add(
            r["layer"],
            f"{r['rank']} ({r['fraction']})",
            f"{r['seconds']:.2f}",
            r["sweeps"],
            f"{r['error']:.4f}",
            f"{r['tl_seconds']:.2f}",
            f"{r['tl_error']:.4f}",
            fmt_ratio(r["tl_seconds"] / r["seconds"]),
        )
    return table


def section(quick: bool, device: str) -> Section:
    """Both tables, headline ratios and plot points for the suite."""
    cfg = QUICK if quick else FULL
    result = Section("cp_conv2d", "CPConv2d: forward vs dense and tltorch, from_dense fit")
    forward, fits, notes = measure(
        torch.get_num_threads(),
        cfg["repeats"],
        configs=cfg["configs"],
        fractions=cfg["fractions"],
        formats=cfg["formats"],
        device=device,
    )
    result.tables += [forward_table(forward, cfg["repeats"], device), fit_table(fits, device)]
    result.notes += notes
    speedups = [r["dense"] / r["cp"] for r in forward]
    line = (
        f"CPConv2d forward vs dense `nn.Conv2d`: best {max(speedups):.2f}x, median "
        f"{median(speedups):.2f}x over {len(forward)} layer/rank/layout rows"
    )
    if all(r["tltorch"] for r in forward):
        line += f"; median {median([r['tltorch'] / r['cp'] for r in forward]):.2f}x tltorch's"
    if all(math.isfinite(r["tl_error"]) for r in fits):
        error_ratios = [r["error"] / r["tl_error"] for r in fits]
        fit_speed = [r["tl_seconds"] / r["seconds"] for r in fits]
        line += (
            f"; fit error / tltorch's {fmt_range(error_ratios, '.4f')}, `from_dense` "
            f"{fmt_range(fit_speed, '.1f', 'x')} faster than `from_conv`"
        )
    result.headline.append(line + ".")
    result.points["speedup"] = [
        {"layer": "CPConv2d", "flop_ratio": r["flop_ratio"], "speedup": r["dense"] / r["cp"]}
        for r in forward
    ]
    result.points["error"] = []
    for r in fits:
        weight = f"{r['layer']} conv init (CP, kernel error)"
        result.points["error"].append(
            {"weight": weight, "method": "CPConv2d", "kept": r["kept"], "error": r["error"]}
        )
        if math.isfinite(r["tl_error"]):
            result.points["error"].append(
                {
                    "weight": weight,
                    "method": "tltorch CP",
                    "kept": r["kept"],
                    "error": r["tl_error"],
                }
            )
    return result


def depthwise_table(threads: int, repeats: int) -> None:
    """Merged (kH x kW) vs separable (kH x 1 then 1 x kW) depthwise convolutions."""
    print(f"threads: {torch.get_num_threads()}")
    print("| batch x rank x image | kernel | merged ms | separable ms | separable / merged |")
    print("|---|---|---|---|---|")
    for batch, rank, size in [(16, 37, 32), (8, 66, 14), (4, 32, 56)]:
        for kh, kw in [(3, 3), (5, 5), (7, 7), (9, 9), (11, 11), (3, 9), (7, 5)]:
            y = torch.randn(batch, rank, size, size).contiguous(memory_format=torch.channels_last)
            merged = torch.randn(rank, 1, kh, kw)
            col, row = torch.randn(rank, 1, kh, 1), torch.randn(rank, 1, 1, kw)
            pad = (kh // 2, kw // 2)

            def run_merged(y=y, merged=merged, pad=pad, rank=rank):
                return F.conv2d(y, merged, padding=pad, groups=rank)

            def run_separable(y=y, col=col, row=row, pad=pad, rank=rank):
                first = F.conv2d(y, col, padding=(pad[0], 0), groups=rank)
                return F.conv2d(first, row, padding=(0, pad[1]), groups=rank)

            times = _interleaved({"m": run_merged, "s": run_separable}, repeats, threads)
            print(
                f"| {batch}x{rank}x{size}x{size} | {kh}x{kw} | {times['m'] * 1e3:.3f} | "
                f"{times['s'] * 1e3:.3f} | {times['s'] / times['m']:.2f} |"
            )


def contraction_table(threads: int, repeats: int) -> None:
    """in -> rank contraction: GEMM (what cp_conv2d does) vs 1x1 conv vs opt_einsum."""
    print(f"threads: {torch.get_num_threads()}")
    print("| input | shape | GEMM ms | 1x1 conv ms | opt_einsum ms |")
    print("|---|---|---|---|---|")
    for batch, cin, size, rank in [(16, 64, 32, 37), (8, 256, 14, 113)]:
        factor = torch.randn(cin, rank)
        conv_weight = factor.T.reshape(rank, cin, 1, 1).contiguous()
        for fmt in ("NCHW", "channels_last"):
            x = torch.randn(batch, cin, size, size)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)

            def gemm(x=x, factor=factor):
                if x.is_contiguous():
                    return torch.matmul(x.flatten(2).transpose(1, 2), factor)
                return torch.matmul(x.movedim(1, -1), factor)

            candidates = {
                "gemm": gemm,
                "conv": lambda x=x, w=conv_weight: F.conv2d(x, w),
                "einsum": lambda x=x, f=factor: contract("bchw,cr->bhwr", x, f),
            }
            t = _interleaved(candidates, repeats, threads)
            print(
                f"| {fmt} | {batch}x{cin}x{size}x{size} -> {rank} | {t['gemm'] * 1e3:.3f} | "
                f"{t['conv'] * 1e3:.3f} | {t['einsum'] * 1e3:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--depthwise", action="store_true")
    parser.add_argument("--contraction", action="store_true")
    parser.add_argument(
        "--forward-only", action="store_true", help="skip tltorch's from_conv (minutes)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.depthwise:
        depthwise_table(args.threads, args.repeats)
    elif args.contraction:
        contraction_table(args.threads, args.repeats)
    else:
        print(f"{machine_info()}, repeats: {args.repeats}\n")
        forward, fits, notes = measure(args.threads, args.repeats, fit=not args.forward_only)
        print(forward_table(forward, args.repeats, "cpu").markdown() + "\n")
        if not args.forward_only:
            print(fit_table(fits, "cpu").markdown() + "\n")
        print("\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
