"""TuckerConv2d vs dense nn.Conv2d vs TensorLy-Torch's Tucker convolution, in one run.

Run standalone: ``python benchmarks/bench_tucker_conv2d.py [--rounds N] [--threads T]
[--quick] [--device cuda]`` (or ``python -m benchmarks --only tucker_conv2d``).

* Layers: default-initialised ``nn.Conv2d`` 64->128 3x3 (padding 1) on 32x32 images at
  batch 8 and 32 -- the issue's target layer -- and 256->256 3x3 on 14x14 at batch 8.
  Ranks: ``TuckerConv2d.plain_rank`` of the parameter fractions 0.25 (4x fewer
  parameters and multiply-adds, the issue's target) and 0.1: the channel ranks keep
  the ratio of the channel counts.
* Peer: ``tltorch.FactorizedConv.from_conv(conv, rank=(r_out, r_in, kH, kW),
  factorization='tucker', implementation='factorized')`` -- the same channel ranks, so
  equal parameters up to its two 3x3 spatial factors (18 entries); its forward is a
  1x1 ``conv1d``, the core convolution and a 1x1 ``conv1d``.
* Forward: under ``torch.no_grad()``, NCHW and channels-last input (each layer gets
  the input the user passes; its own layout changes are inside its time),
  ``benchmarks.timing.interleaved_medians`` (every candidate in every round, medians);
  ratios are formed within this one run.
* Fit: ``TuckerConv2d.from_dense`` (HOSVD + HOOI) against ``from_conv`` (tensorly's
  ``tucker``): relative Frobenius error of the kernel and wall time (one run each,
  after one untimed fit of a small kernel by each).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from types import ModuleType
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.peers import optional_module, version  # noqa: E402
from benchmarks.report import Section, Table, fmt_range, fmt_ratio, median  # noqa: E402
from benchmarks.timing import interleaved_medians, machine_info  # noqa: E402
from factorized_layers.layers.tucker_conv import (  # noqa: E402
    TuckerConv2d,
    tucker2_conv_flops,
    tucker2_conv_params,
)

CONFIGS = [
    # (name, in, out, kernel, image, batches)
    ("64->128 3x3 32x32", 64, 128, 3, 32, (8, 32)),
    ("256->256 3x3 14x14", 256, 256, 3, 14, (8,)),
]
FRACTIONS = (0.25, 0.1)
FORMATS = ("NCHW", "channels_last")
ROUNDS = 15
FULL = {"configs": CONFIGS, "fractions": FRACTIONS, "formats": FORMATS, "rounds": ROUNDS}
QUICK = {
    "configs": [("32->64 3x3 16x16", 32, 64, 3, 16, (4,))],
    "fractions": (0.25,),
    "formats": ("NCHW",),
    "rounds": 3,
}
OURS, DENSE, PEER = "TuckerConv2d", "dense nn.Conv2d", "tltorch Tucker"


def _kernel_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    weight, approximation = weight.detach().double(), approximation.detach().double()
    return float((approximation - weight).norm() / weight.norm())


def _tltorch_conv(
    tltorch: ModuleType, dense: nn.Conv2d, ranks: Tuple[int, int]
) -> Tuple[nn.Module | None, float, float, int, str]:
    """``(layer, from_conv seconds, kernel error, parameters, note)``; layer ``None`` on failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            layer = tltorch.FactorizedConv.from_conv(
                dense,
                rank=tuple(ranks) + tuple(dense.kernel_size),
                factorization="tucker",
                implementation="factorized",
            )
            seconds = time.perf_counter() - start
            layer = layer.to(dense.weight.device).eval()
            error = _kernel_error(dense.weight, layer.weight.to_tensor())
        params = layer.weight.core.numel() + sum(f.numel() for f in layer.weight.factors)
        return layer, seconds, error, params, ""
    except Exception as error:  # noqa: BLE001 - a peer's failure is reported, not fatal
        return None, math.nan, math.nan, 0, f"tltorch failed: {type(error).__name__}: {error}"


def measure(
    configs: Sequence[tuple], fractions: Sequence[float], formats: Sequence[str], rounds: int,
    device: str = "cpu",
) -> Tuple[List[dict], List[dict], List[str]]:  # fmt: skip
    """Forward medians and fits of TuckerConv2d, dense and tltorch.

    Returns ``(forward_rows, fit_rows, notes)``.
    """
    tltorch, why = optional_module("tltorch")
    notes = []
    if tltorch is None:
        notes.append(f"{why}: its columns are left empty")
    else:
        notes.append(
            f"{version(tltorch)} (FactorizedConv.from_conv, factorization='tucker', "
            "implementation='factorized', rank=(r_out, r_in, kH, kW))"
        )
    warm = nn.Conv2d(8, 16, 3, padding=1).to(device)
    TuckerConv2d.from_dense(warm, (4, 4))
    if tltorch is not None:
        _tltorch_conv(tltorch, warm, (4, 4))
    # cuDNN may run convolutions in TF32; the GEMMs of the factorized path do not.
    tolerance = 2e-2 if device.startswith("cuda") else 1e-3
    forward_rows, fit_rows = [], []
    for name, cin, cout, k, size, batches in configs:
        torch.manual_seed(0)
        dense = nn.Conv2d(cin, cout, k, padding=1).to(device).eval()
        kernel = (k, k)
        for fraction in fractions:
            ranks = TuckerConv2d.plain_rank(dense, fraction)
            start = time.perf_counter()
            ours = TuckerConv2d.from_dense(dense, ranks).eval()
            seconds = time.perf_counter() - start
            theirs, tl_seconds, tl_error, tl_params, note = (None, math.nan, math.nan, 0, "")
            if tltorch is not None:
                theirs, tl_seconds, tl_error, tl_params, note = _tltorch_conv(tltorch, dense, ranks)
                if note and note not in notes:
                    notes.append(note)
            params = tucker2_conv_params(cout, cin, kernel, ranks)
            fit_rows.append(
                {
                    "layer": name,
                    "ranks": ranks,
                    "fraction": fraction,
                    "kept": params / dense.weight.numel(),
                    "params": params,
                    "seconds": seconds,
                    "sweeps": ours.fit_info["n_iter"],
                    "error": ours.fit_error,
                    "tl_params": tl_params,
                    "tl_seconds": tl_seconds,
                    "tl_error": tl_error,
                }
            )
            flop_ratio = dense.weight.numel() / tucker2_conv_flops(cout, cin, kernel, ranks)
            for batch in batches:
                for fmt in formats:
                    x = torch.randn(batch, cin, size, size, device=device)
                    if fmt == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    candidates = {
                        DENSE: lambda x=x, dense=dense: dense(x),
                        OURS: lambda x=x, ours=ours: ours(x),
                    }
                    if theirs is not None:
                        candidates[PEER] = lambda x=x, theirs=theirs: theirs(x)
                    times = interleaved_medians(candidates, rounds=rounds, device=device)
                    with torch.no_grad():
                        expected = F.conv2d(x, ours.dense_weight(), ours.bias, padding=1)
                        torch.testing.assert_close(
                            ours(x), expected, rtol=tolerance, atol=tolerance
                        )
                    forward_rows.append(
                        {
                            "layer": name,
                            "ranks": ranks,
                            "fraction": fraction,
                            "batch": batch,
                            "format": fmt,
                            "flop_ratio": flop_ratio,
                            "times": times,
                        }
                    )
                    print(
                        f"  {name} b{batch} ranks {ranks} {fmt}: "
                        f"{times[DENSE] / times[OURS]:.2f}x dense"
                        + (f", {times[PEER] / times[OURS]:.2f}x tltorch" if PEER in times else ""),
                        flush=True,
                    )
    return forward_rows, fit_rows, notes


def forward_table(rows: Sequence[dict], rounds: int, device: str) -> Table:
    table = Table(
        f"Forward time of dense `nn.Conv2d` (padding 1), `TuckerConv2d.from_dense` and "
        f"TensorLy-Torch's Tucker `FactorizedConv` at the same channel ranks, on {device}, "
        f"under `torch.no_grad()`; `interleaved_medians`, {rounds} rounds, medians.",
        ["layer", "ranks (frac)", "batch", "input", "FLOP ratio", "dense ms", "Tucker-2 ms",
         "tltorch ms", "speedup vs dense", "speedup vs tltorch"],
    )  # fmt: skip
    for r in rows:
        t = r["times"]
        peer = t.get(PEER)
        table.add(
            r["layer"],
            f"{r['ranks']} ({r['fraction']})",
            r["batch"],
            r["format"],
            f"{r['flop_ratio']:.1f}",
            f"{t[DENSE] * 1e3:.2f}",
            f"{t[OURS] * 1e3:.2f}",
            "-" if peer is None else f"{peer * 1e3:.2f}",
            fmt_ratio(t[DENSE] / t[OURS]),
            fmt_ratio(None if peer is None else peer / t[OURS]),
        )
    return table


def fit_table(rows: Sequence[dict], device: str) -> Table:
    table = Table(
        f"`TuckerConv2d.from_dense` (HOSVD + HOOI) vs TensorLy-Torch's `from_conv` "
        f"(tensorly `tucker`) at the same channel ranks on a default-init `nn.Conv2d`, on "
        f"{device}: kernel parameters, relative Frobenius error of the kernel, wall time "
        f"(one run each).",
        ["layer", "ranks (frac)", "params", "tltorch params", "fit error", "tltorch error",
         "error / tltorch's", "HOOI sweeps", "from_dense s", "tltorch from_conv s"],
    )  # fmt: skip
    for r in rows:
        table.add(
            r["layer"],
            f"{r['ranks']} ({r['fraction']})",
            r["params"],
            r["tl_params"] or "-",
            f"{r['error']:.5f}",
            f"{r['tl_error']:.5f}",
            f"{r['error'] / r['tl_error']:.4f}",
            r["sweeps"],
            f"{r['seconds']:.2f}",
            f"{r['tl_seconds']:.2f}",
        )
    return table


def section(quick: bool, device: str, rounds: int | None = None) -> Section:
    """Both tables, headline ratios and plot points for the suite (``rounds`` overrides)."""
    cfg: Dict = dict(QUICK if quick else FULL)
    if rounds is not None:
        cfg["rounds"] = rounds
    result = Section(
        "tucker_conv2d", "TuckerConv2d: forward vs dense and tltorch, fit error vs tltorch"
    )
    forward, fits, notes = measure(
        cfg["configs"], cfg["fractions"], cfg["formats"], cfg["rounds"], device
    )
    result.tables += [forward_table(forward, cfg["rounds"], device), fit_table(fits, device)]
    result.notes += notes
    speedups = [r["times"][DENSE] / r["times"][OURS] for r in forward]
    line = (
        f"TuckerConv2d forward vs dense `nn.Conv2d`: best {max(speedups):.2f}x, median "
        f"{median(speedups):.2f}x over {len(forward)} layer/rank/batch/layout rows"
    )
    if all(PEER in r["times"] for r in forward):
        peer = [r["times"][PEER] / r["times"][OURS] for r in forward]
        line += f"; {fmt_range(peer, '.2f', 'x')} tltorch's Tucker FactorizedConv"
    if all(math.isfinite(r["tl_error"]) for r in fits):
        ratios = [r["error"] / r["tl_error"] for r in fits]
        line += f"; kernel error / tltorch's at equal ranks {fmt_range(ratios, '.4f')}"
    result.headline.append(line + ".")
    result.points["speedup"] = [
        {
            "layer": OURS,
            "flop_ratio": r["flop_ratio"],
            "speedup": r["times"][DENSE] / r["times"][OURS],
        }
        for r in forward
    ]
    result.points["error"] = []
    for r in fits:
        weight = f"{r['layer']} conv init (Tucker-2, kernel error)"
        result.points["error"].append(
            {"weight": weight, "method": OURS, "kept": r["kept"], "error": r["error"]}
        )
        if math.isfinite(r["tl_error"]):
            result.points["error"].append(
                {"weight": weight, "method": PEER, "kept": r["kept"], "error": r["tl_error"]}
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one small layer, few rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_info(args.device))
    print(section(args.quick, args.device, args.rounds).markdown())


if __name__ == "__main__":
    main()
