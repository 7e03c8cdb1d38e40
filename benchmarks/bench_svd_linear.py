"""SVDLinear vs dense nn.Linear vs a hand-written two-matmul reference.

Run: ``python -m benchmarks.bench_svd_linear [--device cuda] [--quick]``.

Prints two markdown tables: forward time (interleaved rounds, medians, ratios within
one run) and ``from_dense`` time/error of the randomized vs full SVD path.
Targets (issue 2): at batch >= 64 on sizes >= 1536x384 the speedup over dense is at
least 0.85x the FLOP ratio; at batch 1 SVDLinear takes at most 1.25x the two-matmul
reference; the randomized from_dense of a 4096x4096 layer at rank fraction 0.25 is
>= 3x faster than the full SVD with error <= 1.01x the optimum.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import SVDLinear
from factorized_layers.decompose import svd_tail_error
from factorized_layers.ranks import dense_linear_flops, low_rank_linear_flops

from .timing import interleaved_medians, machine_info

SIZES = [(384, 384), (1536, 384), (4096, 4096)]
BATCHES = [1, 64, 4096]
FRACTIONS = [0.25, 0.5]


class TwoMatmulReference(nn.Module):
    """What a user would write by hand: a module doing two F.linear calls, no planning."""

    def __init__(self, input_factor, output_factor, bias):
        super().__init__()
        self.input_factor, self.output_factor, self.bias = input_factor, output_factor, bias

    def forward(self, x):
        return F.linear(F.linear(x, self.input_factor), self.output_factor, self.bias)


def forward_table(device: str, rounds: int, sizes=SIZES, batches=BATCHES) -> str:
    """Forward medians; the reference is a minimal nn.Module with two F.linear calls."""
    lines = [
        "| in x out | batch | rank fraction | rank | dense | SVDLinear | two-matmul ref | "
        "speedup vs dense | FLOP ratio | speedup / FLOP ratio | SVDLinear / ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for in_features, out_features in sizes:
        torch.manual_seed(0)
        dense = nn.Linear(in_features, out_features, device=device)
        for fraction in FRACTIONS:
            layer = SVDLinear.from_dense(dense, fraction)
            reference = TwoMatmulReference(layer.input_factor, layer.output_factor, layer.bias)
            for batch in batches:
                x = torch.randn(batch, in_features, device=device)
                med = interleaved_medians(
                    {
                        "dense": partial(dense, x),
                        "svd": partial(layer, x),
                        "ref": partial(reference, x),
                    },
                    rounds=rounds,
                    device=device,
                )
                flop_ratio = dense_linear_flops(
                    in_features, out_features, batch
                ) / low_rank_linear_flops(in_features, out_features, layer.rank, batch)
                speedup = med["dense"] / med["svd"]
                lines.append(
                    f"| {in_features}x{out_features} | {batch} | {fraction} | {layer.rank} | "
                    f"{med['dense'] * 1e6:.1f} us | {med['svd'] * 1e6:.1f} us | "
                    f"{med['ref'] * 1e6:.1f} us | {speedup:.2f}x | {flop_ratio:.2f} | "
                    f"{speedup / flop_ratio:.2f} | {med['svd'] / med['ref']:.2f} |"
                )
                print(lines[-1], flush=True)
    return "\n".join(lines)


def from_dense_table(device: str, size: int, repeats: int) -> str:
    lines = [
        "| weight | method | rank | median time | speedup vs full | error / optimum |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    torch.manual_seed(0)
    dense = nn.Linear(size, size, device=device)
    singular_values = torch.linalg.svdvals(dense.weight.detach().double())
    times = {"full": [], "randomized": []}
    errors = {}
    for _ in range(repeats):
        for method in times:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            layer = SVDLinear.from_dense(dense, 0.25, method=method)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - start)
            with torch.no_grad():
                error = (layer.dense_weight() - dense.weight).norm() / dense.weight.norm()
            errors[method] = float(error) / svd_tail_error(singular_values, layer.rank)
    median = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
    for method in times:
        lines.append(
            f"| {size}x{size} nn.Linear init | {method} | {layer.rank} | {median[method]:.2f} s | "
            f"{median['full'] / median[method]:.2f}x | {errors[method]:.4f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# SVDLinear benchmark on {args.device}: {machine_info(args.device)}\n")
    if args.quick:
        forward_table(args.device, rounds=3, sizes=[(384, 384)], batches=[1, 64])
        from_dense_table(args.device, 1024, repeats=1)
    else:
        forward_table(args.device, rounds=15)
        print()
        from_dense_table(args.device, 4096, repeats=3)


if __name__ == "__main__":
    main()
