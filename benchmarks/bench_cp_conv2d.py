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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import benchmark

if __package__ in (None, ""):
    # Run as a plain script: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from factorized_layers.contract import contract  # noqa: E402
from factorized_layers.layers.cp import CPConv2d  # noqa: E402
from factorized_layers.ranks import cp_conv_flops, dense_conv_flops, resolve_cp_rank  # noqa: E402

CONFIGS = [
    # (name, in, out, kernel, image, batch)
    ("64->128 3x3 32x32 b16", 64, 128, 3, 32, 16),
    ("256->256 3x3 14x14 b8", 256, 256, 3, 14, 8),
]
FRACTIONS = (0.1, 0.25)


def _load_tltorch():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tltorch  # noqa: F401
        return tltorch, ""
    except Exception as exc:  # any import failure is reported, not fatal
        return None, f"{type(exc).__name__}: {exc}"


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


def _no_grad_call(module: nn.Module, x: torch.Tensor):
    def call() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return call


def _fit_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((approx.detach() - weight.detach()).norm() / weight.detach().norm())


def forward_and_fit_table(threads: int, repeats: int, fit: bool = True) -> None:
    tltorch, why = _load_tltorch()
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, repeats: {repeats}")
    if tltorch is None:
        print(f"tltorch unavailable ({why}): its columns are left empty")
    else:
        print(
            f"tltorch {tltorch.__version__} (FactorizedConv, factorization='cp', "
            "implementation='factorized')"
        )
    print()
    header = (
        "| layer | rank (frac) | input | FLOP ratio | dense ms | CP ms | tltorch ms "
        "| speedup vs dense | / (0.5 x FLOP ratio) | speedup vs tltorch |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    fits = []
    for name, cin, cout, k, size, batch in CONFIGS:
        torch.manual_seed(0)
        dense = nn.Conv2d(cin, cout, k, padding=1).eval()
        for fraction in FRACTIONS:
            rank = resolve_cp_rank(fraction, (cout, cin, k, k))
            start = time.perf_counter()
            ours = CPConv2d.from_dense(dense, rank, seed=0).eval()
            ours_fit_s = time.perf_counter() - start
            theirs = None
            theirs_fit_s = theirs_err = math.nan
            if tltorch is not None and not fit:
                # Forward timing only: tltorch's (slow) fit does not change its cost.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theirs = tltorch.FactorizedConv(
                        cin,
                        cout,
                        (k, k),
                        padding=1,
                        bias=True,
                        rank=rank,
                        factorization="cp",
                        implementation="factorized",
                    ).eval()
            elif tltorch is not None:
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theirs = tltorch.FactorizedConv.from_conv(
                        dense, rank=rank, factorization="cp", implementation="factorized"
                    ).eval()
                theirs_fit_s = time.perf_counter() - start
                theirs_err = _fit_error(dense.weight, theirs.weight.to_tensor())
            fits.append(
                (
                    name,
                    rank,
                    fraction,
                    ours_fit_s,
                    ours.fit_error,
                    ours.fit_info["n_iter"],
                    theirs_fit_s,
                    theirs_err,
                )
            )
            ratio = dense_conv_flops(cin, cout, (k, k)) / cp_conv_flops(cin, cout, (k, k), rank)
            for fmt in ("NCHW", "channels_last"):
                x = torch.randn(batch, cin, size, size)
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
                        rtol=1e-3,
                        atol=1e-3,
                    )
                speedup = times["dense"] / times["cp"]
                tl_ms = f"{times['tltorch'] * 1e3:.2f}" if "tltorch" in times else "-"
                vs_tl = f"{times['tltorch'] / times['cp']:.2f}x" if "tltorch" in times else "-"
                print(
                    f"| {name} | {rank} ({fraction}) | {fmt} | {ratio:.1f} | "
                    f"{times['dense'] * 1e3:.2f} | {times['cp'] * 1e3:.2f} | {tl_ms} | "
                    f"{speedup:.2f}x | {speedup / (0.5 * ratio):.2f} | {vs_tl} |"
                )
    if not fit:
        return
    print()
    print(
        "| layer | rank (frac) | from_dense s | CP-ALS sweeps | fit error | tltorch from_conv s "
        "| tltorch fit error | from_dense speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rank, fraction, ours_s, ours_err, sweeps, theirs_s, theirs_err in fits:
        speed = f"{theirs_s / ours_s:.1f}x" if math.isfinite(theirs_s) else "-"
        print(
            f"| {name} | {rank} ({fraction}) | {ours_s:.2f} | {sweeps} | {ours_err:.4f} | "
            f"{theirs_s:.2f} | {theirs_err:.4f} | {speed} |"
        )


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
        forward_and_fit_table(args.threads, args.repeats, fit=not args.forward_only)


if __name__ == "__main__":
    main()
