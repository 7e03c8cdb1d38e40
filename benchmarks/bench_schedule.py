"""Every forward schedule against the one chosen, over a grid of ranks and batch sizes.

Run: ``python -m benchmarks.bench_schedule [--quick] [--device cuda] [--threads N]``.

For each layer (Tucker linears of MiniLM's shapes at several ranks, tensor-train
linears, CP convolutions) and batch size, the dense layer and every schedule the
kernel can run are timed in interleaved rounds (median of the per-round ratios):
then the schedule the cost model picks (the default) and the one measured schedules
pick (``factorized_layers.measured_schedules``) are compared with the best. A choice
"within 10%" runs at no less than 0.9x the best schedule's speed.
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import CPConv2d, TTLinear, TuckerLinear, measured_schedules
from factorized_layers.functional.cp import cp_conv_separable, cp_convnd
from factorized_layers.functional.tt import TT_SCHEDULES, tt_dense_weight, tt_linear, tt_schedule
from factorized_layers.functional.tucker import (
    tucker_linear_schedule,
    tucker_linear_scheduled,
)
from factorized_layers.schedule import default_schedule_cache

from .report import Section, Table
from .timing import interleaved_medians, machine_info

TUCKER_RANKS = {
    (384, 1536): [(12, 9, 7, 8, 8, 6), (8, 6, 4, 8, 8, 6), (10, 8, 6, 6, 6, 4), (6, 6, 4, 4, 4, 3)],
    (384, 384): [(3, 8, 6, 8, 8, 6), (6, 6, 4, 6, 6, 4), (4, 4, 3, 4, 4, 3)],
}
SHAPES = {384: (8, 8, 6), 1536: (16, 12, 8)}
TT_CASES = [((48, 32), (16, 24), (16,)), ((48, 32), (16, 24), (64,))]
CP_CASES = [(64, 64, 3, 16, 16), (64, 64, 5, 16, 16), (32, 32, 7, 32, 32)]
FULL = {"batches": (1, 64, 1024, 4096), "conv_batches": (1, 16), "rounds": 9, "block_s": 0.05}
QUICK = {"batches": (64,), "conv_batches": (4,), "rounds": 2, "block_s": 0.005}


def _speedups(
    dense: Callable[[], object], runs: Dict[str, Callable[[], object]], cfg: dict, device: str
) -> Dict[str, float]:
    """Dense median time / each schedule's, from interleaved rounds."""
    medians = interleaved_medians(
        {"dense": dense, **runs}, rounds=cfg["rounds"], min_block_s=cfg["block_s"], device=device
    )
    return {name: medians["dense"] / medians[name] for name in runs}


def _measured_choice(run: Callable[[], object]) -> str | None:
    """The schedule measured schedules pick for ``run`` (a layer's forward)."""
    default_schedule_cache.clear()
    with torch.no_grad(), measured_schedules():
        run()
    choices = default_schedule_cache.choices()
    return choices[-1][1] if choices else None


def _row(table: Table, layer: str, batch: int, speedups: Dict[str, float], default: str,
         measured: str | None) -> Dict[str, float]:  # fmt: skip
    best = max(speedups.values())
    measured = measured or default  # one candidate only: nothing to measure
    cells = ", ".join(f"{name} {value:.2f}x" for name, value in speedups.items())
    default_share = speedups[default] / best
    measured_share = speedups[measured] / best
    table.add(layer, batch, cells, f"{default} ({default_share:.2f})",
              f"{measured} ({measured_share:.2f})")  # fmt: skip
    return {"batch": batch, "default": default_share, "measured": measured_share}


def tucker_rows(table: Table, cfg: dict, device: str) -> List[Dict[str, float]]:
    found = []
    for (n_in, n_out), grid in TUCKER_RANKS.items():
        for ranks in grid:
            torch.manual_seed(0)
            layer = TuckerLinear(n_in, n_out, rank=ranks, in_shape=SHAPES[n_in],
                                 out_shape=SHAPES[n_out], device=device).eval()  # fmt: skip
            plan = layer._plan
            core, outs, ins = layer.core, layer.out_factors(), layer.in_factors()
            weight = layer.dense_weight().detach()
            single = len(plan.out_modes) == 1 and len(plan.in_modes) == 1
            names = (
                ["chain", "weight_first"] if single else ["in_place", "rotation", "weight_first"]
            )
            for batch in cfg["batches"]:
                x = torch.randn(batch, n_in, device=device)
                runs = {
                    name: functools.partial(
                        tucker_linear_scheduled, name, x, core, outs, ins, layer.bias, plan=plan
                    )
                    for name in names
                }
                dense = functools.partial(F.linear, x, weight, layer.bias)
                speedups = _speedups(dense, runs, cfg, device)
                label = f"Tucker {n_in}->{n_out} {ranks[:3]}/{ranks[3:]}"
                default = tucker_linear_schedule(plan, batch)
                measured = _measured_choice(functools.partial(layer, x))
                found.append(_row(table, label, batch, speedups, default, measured))
    return found


def tt_rows(table: Table, cfg: dict, device: str) -> List[Dict[str, float]]:
    found = []
    for out_shape, in_shape, ranks in TT_CASES:
        torch.manual_seed(0)
        n_in, n_out = in_shape[0] * in_shape[1], out_shape[0] * out_shape[1]
        layer = TTLinear(n_in, n_out, rank=ranks, in_shape=in_shape, out_shape=out_shape,
                         device=device).eval()  # fmt: skip
        cores, plan = layer.cores(), layer._plan
        weight = tt_dense_weight(cores).detach()
        for batch in cfg["batches"]:
            x = torch.randn(batch, n_in, device=device)
            runs = {
                name: functools.partial(tt_linear, x, cores, layer.bias, plan=plan, schedule=name)
                for name in TT_SCHEDULES
            }
            speedups = _speedups(functools.partial(F.linear, x, weight, layer.bias), runs, cfg,
                                 device)  # fmt: skip
            label = f"TT {n_in}->{n_out} {in_shape}->{out_shape} ranks {ranks}"
            measured = _measured_choice(functools.partial(layer, x))
            found.append(_row(table, label, batch, speedups, tt_schedule(plan, batch), measured))
    return found


def cp_rows(table: Table, cfg: dict, device: str) -> List[Dict[str, float]]:
    found = []
    for c_in, c_out, k, h, w in CP_CASES:
        torch.manual_seed(0)
        dense = nn.Conv2d(c_in, c_out, k, padding=k // 2, device=device)
        layer = CPConv2d.from_dense(dense, 0.25, seed=0).eval()
        spatial = layer.spatial_factors()
        for batch in cfg["conv_batches"]:
            x = torch.randn(batch, c_in, h, w, device=device)
            factors = (layer.out_channel_factor, layer.in_channel_factor, spatial, layer.bias)
            runs = {
                name: functools.partial(
                    cp_convnd, x, *factors, padding=k // 2, separable=separable
                )  # fmt: skip
                for name, separable in (("separable", True), ("merged", False))
            }
            speedups = _speedups(functools.partial(dense, x), runs, cfg, device)
            default = "separable" if cp_conv_separable((k, k)) else "merged"
            label = f"CP conv {c_in}->{c_out} {k}x{k} rank {layer.rank} at {h}x{w}"
            measured = _measured_choice(functools.partial(layer, x))
            found.append(_row(table, label, batch, speedups, default, measured))
    return found


def section(quick: bool, device: str) -> Section:
    """The schedule table and a headline on the worst choice at batch >= 64."""
    cfg = QUICK if quick else FULL
    result = Section("schedule", "Forward schedules: every candidate vs the chosen one")
    table = Table(
        f"Speed of every schedule relative to the dense layer on {device} (medians of "
        f"{cfg['rounds']} interleaved rounds, blocks of >= {cfg['block_s']} s; random factors, "
        "eval mode, no autograd), and the schedule the cost model (default) and measured "
        "schedules pick, with its speed as a share of the best candidate's. Batch is rows "
        "(linears) or images (convolutions).",
        ["layer", "batch", "speed vs dense per schedule", "default (share of best)",
         "measured (share of best)"],
    )  # fmt: skip
    rows = tucker_rows(table, cfg, device) + tt_rows(table, cfg, device)
    if not quick:
        rows += cp_rows(table, cfg, device)
    result.tables.append(table)
    large = [r for r in rows if r["batch"] >= 64]
    worst_default = min(r["default"] for r in large)
    worst_measured = min(r["measured"] for r in large)
    within = sum(r["measured"] >= 0.9 for r in large)
    result.headline.append(
        f"Schedules at batch >= 64: the cost model's choice reaches >= {worst_default:.2f} of "
        f"the best candidate's speed, measured schedules >= {worst_measured:.2f} "
        f"({within}/{len(large)} within 10%)."
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only, one round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info(args.device))
    print(section(args.quick, args.device).markdown())


if __name__ == "__main__":
    main()
