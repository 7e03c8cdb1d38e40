"""SVDConv2d (channel and spatial low rank) vs dense nn.Conv2d and CPConv2d, in one run.

Run standalone: ``python benchmarks/bench_svd_conv2d.py [--quick] [--rounds N]
[--threads T] [--device cuda]`` (or ``python -m benchmarks --only svd_conv2d``).

* Forward time (``benchmarks.timing.interleaved_medians``: every candidate in every
  round, medians, under ``torch.no_grad()``) of dense ``nn.Conv2d``, ``SVDConv2d`` and
  ``CPConv2d`` at the same FLOP reduction (about 2x and 4x fewer multiply-adds per
  output pixel than dense) on an EfficientNet-like ``1x1`` 192->1152 at 14x14 and a
  ``3x3`` 64->128 (padding 1) at 32x32, batch 1 and 32, NCHW and channels-last input
  (any layout change a layer makes is inside its time). For a ``1x1`` kernel the two
  modes are the same layer, so only the channel mode is timed.
* Kernel error at equal parameters (the fraction ``f`` of the dense kernel given to
  every method as its float rank; the kept fraction each reached is in the table):
  ``SVDConv2d`` in both modes (exact Eckart--Young optima of their matrix views) vs
  ``CPConv2d`` (CP-ALS, seed 0), on a default-init 64->128 ``3x3`` kernel and on the
  trained convolutions of the digits CNN (:mod:`factorized_layers.demo`, trained here
  for a few epochs on scikit-learn's digits), where the output error on held-out
  images is reported too, plain and calibrated (``calibration=`` the training images'
  channel statistics). TensorLy-Torch has no SVD convolution; its CP convolution is
  compared with ``CPConv2d`` in ``bench_cp_conv2d.py``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import Section, Table, fmt_range, fmt_ratio, median  # noqa: E402
from benchmarks.timing import interleaved_medians, machine_info  # noqa: E402
from factorized_layers.layers.cp import CPConv2d  # noqa: E402
from factorized_layers.layers.svd_conv import SVDConv2d  # noqa: E402
from factorized_layers.ranks import cp_conv_flops, dense_conv_flops  # noqa: E402

# (name, in, out, kernel, image)
CONFIGS = [
    ("192->1152 1x1 14x14", 192, 1152, 1, 14),
    ("64->128 3x3 32x32", 64, 128, 3, 32),
]
FULL = {
    "configs": CONFIGS,
    "reductions": (2, 4),
    "batches": (1, 32),
    "formats": ("NCHW", "channels_last"),
    "rounds": 11,
    "kernel": (64, 128, 3),
    "fractions": (0.1, 0.25, 0.5),
    "digits": {"width": 32, "epochs": 12},
}
QUICK = {
    "configs": [("48->288 1x1 14x14", 48, 288, 1, 14), ("16->32 3x3 16x16", 16, 32, 3, 16)],
    "reductions": (4,),
    "batches": (1, 8),
    "formats": ("NCHW",),
    "rounds": 3,
    "kernel": (16, 32, 3),
    "fractions": (0.25,),
    "digits": None,
}
METHODS = ("SVDConv2d channel", "SVDConv2d spatial", "CPConv2d")


def _rank_for_reduction(per_rank: int, dense: int, reduction: float) -> int:
    """The largest rank whose multiply-adds are at most ``dense / reduction``."""
    return max(1, int(dense / (reduction * per_rank)))


def _forward_candidates(cin, cout, k, reduction, mode, device):
    """``(dense, svd, cp)`` layers (default init; speed does not depend on the values)."""
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, k, padding=k // 2).to(device).eval()
    flops = dense_conv_flops(cin, cout, (k, k))
    per_rank = SVDConv2d.rank_profile(dense, mode=mode).flops[0]
    svd = SVDConv2d.from_dense(dense, _rank_for_reduction(per_rank, flops, reduction), mode=mode)
    cp_rank = _rank_for_reduction(cp_conv_flops(cin, cout, (k, k), 1), flops, reduction)
    cp = CPConv2d(cin, cout, k, cp_rank, padding=k // 2, device=device)
    return dense, svd.eval(), cp.eval()


def measure_forward(cfg: dict, device: str) -> List[dict]:
    """One row per layer / reduction / mode / batch / input format, with median seconds."""
    rows = []
    for name, cin, cout, k, size in cfg["configs"]:
        modes = ("channel",) if k == 1 else ("channel", "spatial")
        for reduction in cfg["reductions"]:
            for mode in modes:
                dense, svd, cp = _forward_candidates(cin, cout, k, reduction, mode, device)
                flops = dense_conv_flops(cin, cout, (k, k))
                for batch in cfg["batches"]:
                    for fmt in cfg["formats"]:
                        x = torch.randn(batch, cin, size, size, device=device)
                        if fmt == "channels_last":
                            x = x.contiguous(memory_format=torch.channels_last)
                        with torch.no_grad():
                            error = (svd(x) - svd.to_dense()(x)).abs().max().item()
                        tolerance = 2e-2 if device.startswith("cuda") else 1e-3
                        assert error < tolerance, f"{name} {mode}: forward differs by {error}"
                        layers = {"dense": dense, "svd": svd, "cp": cp}
                        times = interleaved_medians(
                            {key: functools.partial(m, x) for key, m in layers.items()},
                            rounds=cfg["rounds"],
                            device=device,
                        )
                        row = {
                            "layer": name,
                            "mode": mode,
                            "rank": svd.rank,
                            "cp_rank": cp.rank,
                            "reduction": reduction,
                            "flop_ratio": flops / svd.flops_per_position(),
                            "cp_flop_ratio": flops / cp.flops_per_position(),
                            "batch": batch,
                            "format": fmt,
                            **times,
                        }
                        rows.append(row)
                        print(
                            f"  {name} {mode} rank {svd.rank} batch {batch} {fmt}: "
                            f"{times['dense'] / times['svd']:.2f}x dense, "
                            f"{times['cp'] / times['svd']:.2f}x CPConv2d",
                            flush=True,
                        )
    return rows


def forward_table(rows: Sequence[dict], rounds: int, device: str) -> Table:
    table = Table(
        f"Forward time on {device} of dense `nn.Conv2d`, `SVDConv2d` and `CPConv2d` (default "
        f"init) at about the same FLOP reduction (FLOP ratio = dense multiply-adds per output "
        f"pixel / the layer's); `benchmarks.timing.interleaved_medians`, {rounds} rounds, "
        f"medians; batch x channels x image as in the layer name.",
        ["layer", "mode", "rank", "FLOP ratio", "batch", "input", "dense ms", "SVD ms",
         "speedup vs dense", "CP rank (FLOP ratio)", "CP ms", "speedup vs CP"],
    )  # fmt: skip
    for r in rows:
        table.add(
            r["layer"],
            r["mode"],
            r["rank"],
            f"{r['flop_ratio']:.2f}",
            r["batch"],
            r["format"],
            f"{r['dense'] * 1e3:.3f}",
            f"{r['svd'] * 1e3:.3f}",
            fmt_ratio(r["dense"] / r["svd"]),
            f"{r['cp_rank']} ({r['cp_flop_ratio']:.2f})",
            f"{r['cp'] * 1e3:.3f}",
            fmt_ratio(r["cp"] / r["svd"]),
        )
    return table


def _weight_params(layer: nn.Module) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if n != "bias")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


def _fit(method: str, dense: nn.Conv2d, fraction: float, stats=None) -> nn.Module:
    if method == "CPConv2d":
        return CPConv2d.from_dense(dense, fraction, seed=0, calibration=stats)
    mode = method.split()[-1]
    return SVDConv2d.from_dense(dense, fraction, mode=mode, calibration=stats)


def _output_error(layer: nn.Module, dense: nn.Conv2d, x: torch.Tensor) -> float:
    with torch.no_grad():
        reference = dense(x) - dense.bias.view(1, -1, 1, 1)
        return float((layer(x) - dense(x)).norm() / reference.norm())


def measure_default_kernel(cfg: dict, device: str) -> List[dict]:
    """Kernel errors of every method on a default-init kernel."""
    cin, cout, k = cfg["kernel"]
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, k, padding=1).to(device)
    rows = []
    for fraction in cfg["fractions"]:
        for method in METHODS:
            layer = _fit(method, dense, fraction)
            rows.append(
                {
                    "weight": f"{cin}->{cout} {k}x{k} default init",
                    "method": method,
                    "fraction": fraction,
                    "kept": _weight_params(layer) / dense.weight.numel(),
                    "error": _relative(layer.dense_weight(), dense.weight),
                    "output_error": math.nan,
                    "calibrated_error": math.nan,
                }
            )
    return rows


def _digits_layers(width: int, epochs: int, device: str):
    """The trained digits CNN's convolutions with their train / test inputs."""
    from factorized_layers import calibrate, demo

    x_train, y_train, x_test, _ = demo.load_digits_split(seed=0)
    model = demo.build_cnn(width)
    demo.train(model, x_train, y_train, epochs, 2e-3, 0, "digits CNN")
    model = model.to(device).eval()
    x_train, x_test = x_train.to(device), x_test.to(device)
    stats = calibrate(model, [x_train])
    layers = []
    for index, module in enumerate(model):
        if isinstance(module, nn.Conv2d) and module.in_channels > 1:
            prefix = model[:index]
            with torch.no_grad():
                inputs = prefix(x_test)
            layers.append((str(index), copy.deepcopy(module), stats[str(index)], inputs))
    return layers


def measure_digits(cfg: dict, device: str) -> List[dict]:
    """Kernel and held-out output errors on the trained digits CNN's convolutions."""
    settings = cfg["digits"]
    rows = []
    for name, dense, stats, inputs in _digits_layers(settings["width"], settings["epochs"], device):
        shape = "x".join(str(s) for s in dense.weight.shape)
        for fraction in cfg["fractions"]:
            for method in METHODS:
                layer = _fit(method, dense, fraction)
                calibrated = _fit(method, dense, fraction, stats)
                rows.append(
                    {
                        "weight": f"digits CNN conv {name} ({shape}, trained)",
                        "method": method,
                        "fraction": fraction,
                        "kept": _weight_params(layer) / dense.weight.numel(),
                        "error": _relative(layer.dense_weight(), dense.weight),
                        "output_error": _output_error(layer, dense, inputs),
                        "calibrated_error": _output_error(calibrated, dense, inputs),
                    }
                )
    return rows


def error_table(rows: Sequence[dict], device: str) -> Table:
    table = Table(
        f"Relative kernel (Frobenius) error at equal parameters on {device}: each method's "
        f"float rank is the same fraction of the dense kernel (kept = its actual weight "
        f"parameters / dense); output error = relative error of the layer's output (bias "
        f"excluded) on held-out digits, plain and with `calibration=` (training images).",
        ["kernel", "fraction", "method", "kept", "kernel error", "output error",
         "output error calibrated"],
    )  # fmt: skip
    for r in rows:
        table.add(
            r["weight"],
            r["fraction"],
            r["method"],
            f"{r['kept']:.3f}",
            f"{r['error']:.4f}",
            "-" if math.isnan(r["output_error"]) else f"{r['output_error']:.4f}",
            "-" if math.isnan(r["calibrated_error"]) else f"{r['calibrated_error']:.4f}",
        )
    return table


def _headline(forward: Sequence[dict], errors: Sequence[dict]) -> str:
    parts = []
    for reduction in sorted({r["reduction"] for r in forward}):
        speedups = [r["dense"] / r["svd"] for r in forward if r["reduction"] == reduction]
        parts.append(
            f"at ~{reduction}x fewer FLOPs {fmt_range(speedups, '.2f', 'x')} dense "
            f"(median {median(speedups):.2f}x, {len(speedups)} rows)"
        )
    line = "SVDConv2d forward " + "; ".join(parts)
    best: Dict[Tuple[str, float], Dict[str, float]] = {}
    for r in errors:
        best.setdefault((r["weight"], r["fraction"]), {})[r["method"]] = r["error"]
    ratios = [
        min(m["SVDConv2d channel"], m["SVDConv2d spatial"]) / m["CPConv2d"]
        for m in best.values()
        if m.get("CPConv2d")
    ]
    if ratios:
        line += (
            f"; kernel error of the better SVD mode / CPConv2d's at equal parameters "
            f"{fmt_range(ratios, '.3f')}"
        )
    return line + "."


def section(quick: bool, device: str, rounds: int | None = None) -> Section:
    """Both tables, the headline and plot points for the suite (``rounds`` overrides)."""
    cfg = dict(QUICK if quick else FULL)
    if rounds is not None:
        cfg["rounds"] = rounds
    result = Section("svd_conv2d", "SVDConv2d: forward vs dense and CPConv2d, error vs CPConv2d")
    forward = measure_forward(cfg, device)
    errors = measure_default_kernel(cfg, device)
    if cfg["digits"] is not None:
        try:
            errors += measure_digits(cfg, device)
        except SystemExit as missing:  # the demo exits when scikit-learn is missing
            result.notes.append(f"digits CNN rows skipped: {missing}")
    result.tables += [forward_table(forward, cfg["rounds"], device), error_table(errors, device)]
    result.notes.append(
        "For a 1x1 kernel both modes are the same two 1x1 convolutions (the exact SVD "
        "optimum, or the whitened-SVD optimum of the output error with calibration)."
    )
    result.headline.append(_headline(forward, errors))
    result.points["speedup"] = [
        {
            "layer": f"SVDConv2d {r['mode']}",
            "flop_ratio": r["flop_ratio"],
            "speedup": r["dense"] / r["svd"],
        }
        for r in forward
    ]
    result.points["error"] = [
        {
            "weight": f"{r['weight']} (kernel error)",
            "method": r["method"],
            "kept": r["kept"],
            "error": r["error"],
        }
        for r in errors
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small layers, few rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info(args.device))
    result = section(args.quick, args.device, args.rounds)
    print(result.markdown())
    print("\n".join(f"- {line}" for line in result.headline))


if __name__ == "__main__":
    main()
