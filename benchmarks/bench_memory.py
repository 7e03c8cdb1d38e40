"""Peak memory (and time) of ``from_dense`` on large layers, each in a fresh subprocess.

Run: ``python -m benchmarks.bench_memory [--quick] [--device cuda] [--threads N]``.

Every case runs in its own Python process, so nothing an earlier case allocated (or
left in the allocator's free lists) hides or inflates its peak. The child builds the
dense layer, warms the same code path up on a tiny layer (library initialisation is
not counted), then measures around the one ``from_dense`` call:

* CPU: peak resident set size minus the resident set size just before the call. On
  Linux the peak is ``VmHWM`` of ``/proc/self/status``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` right before the call; elsewhere it is the growth of
  ``ru_maxrss`` (a lower bound when an earlier peak was higher).
* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()``
  before the call, after ``torch.cuda.reset_peak_memory_stats()``.

The increase includes the returned factors; the dense weight existed before.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from factorized_layers import CPConv2d, SVDLinear, TuckerLinear, factorize_

from .report import Section, Table, fmt_ratio, fmt_time
from .timing import status_kib

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
CASES: List[dict] = [
    {"layer": "SVDLinear", "shape": [4096, 4096], "rank": 0.25, "options": {"method": "full"}},
    {
        "layer": "SVDLinear",
        "shape": [4096, 4096],
        "rank": 0.25,
        "options": {"method": "randomized"},
    },
    {
        "layer": "TuckerLinear",
        "shape": [2048, 2048],
        "rank": 0.25,
        "options": {"in_shape": [16, 16, 8], "out_shape": [16, 16, 8]},
    },
    {"layer": "CPConv2d", "shape": [256, 256, 3, 3], "rank": 0.1, "options": {"seed": 0}},
]
QUICK_CASES: List[dict] = [
    {"layer": "SVDLinear", "shape": [512, 512], "rank": 0.25, "options": {"method": "full"}},
    {
        "layer": "SVDLinear",
        "shape": [512, 512],
        "rank": 0.25,
        "options": {"method": "randomized"},
    },
    {
        "layer": "TuckerLinear",
        "shape": [256, 256],
        "rank": 0.25,
        "options": {"in_shape": [8, 8, 4], "out_shape": [8, 8, 4]},
    },
    {"layer": "CPConv2d", "shape": [32, 32, 3, 3], "rank": 0.1, "options": {"seed": 0}},
]
CONVERSIONS: List[dict] = [
    {"layers": 24, "width": 4096, "rank": 0.1, "streaming": streaming,
     "options": {"method": "randomized", "seed": 0}}
    for streaming in (False, True)
]  # fmt: skip
QUICK_CONVERSIONS: List[dict] = [
    {"layers": 4, "width": 512, "rank": 0.1, "streaming": streaming, "options": {"seed": 0}}
    for streaming in (False, True)
]  # fmt: skip
WARM_UP_SHAPES = {
    "SVDLinear": ([64, 64], {}),
    "TuckerLinear": ([64, 64], {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4]}),
    "CPConv2d": ([8, 8, 3, 3], {}),
}


def _dense(layer: str, shape: Sequence[int], device: str) -> nn.Module:
    torch.manual_seed(0)
    if layer == "CPConv2d":
        out_channels, in_channels, kh, kw = shape
        return nn.Conv2d(in_channels, out_channels, (kh, kw), padding=1, device=device)
    out_features, in_features = shape
    return nn.Linear(in_features, out_features, device=device)


def _converter(layer: str) -> Callable[..., nn.Module]:
    return {"SVDLinear": SVDLinear, "TuckerLinear": TuckerLinear, "CPConv2d": CPConv2d}[
        layer
    ].from_dense


def _peak_meter(device: str) -> Tuple[str, Callable[[], None], Callable[[], int]]:
    """``(method, start, peak_increase_bytes)`` for this platform and device."""
    if device.startswith("cuda"):
        base = {}

        def start_cuda() -> None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base["bytes"] = torch.cuda.memory_allocated()

        def stop_cuda() -> int:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base["bytes"]

        return "torch.cuda.max_memory_allocated increase", start_cuda, stop_cuda
    base = {}
    if os.path.exists("/proc/self/clear_refs"):

        def start_proc() -> None:
            base["kib"] = status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS

        def stop_proc() -> int:
            return (status_kib("VmHWM") - base["kib"]) * 1024

        return "peak RSS (VmHWM, reset) - RSS before", start_proc, stop_proc
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere

    def start_rusage() -> None:
        base["bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def stop_rusage() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - base["bytes"]

    return "ru_maxrss increase", start_rusage, stop_rusage


def _stack(layers: int, width: int, device: str) -> nn.Sequential:
    """``layers`` Linears of ``width`` built on meta, then materialised one at a time
    (as a loader would), initialised like ``nn.Linear``."""
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    generator = torch.Generator().manual_seed(0)
    for index, layer in enumerate(model):
        model[index] = layer.to_empty(device=device)
        with torch.no_grad():
            bound = width**-0.5
            for parameter in model[index].parameters():
                values = torch.rand(parameter.shape, generator=generator) * 2 - 1
                parameter.copy_(values * bound)
    return model


def conversion_child(case: dict, device: str) -> dict:
    """``factorize_`` of a materialised stack, plain or streaming: peak bytes, seconds."""
    factorize_(_stack(2, 64, device), case["rank"], progress=False)  # warm-up
    model = _stack(case["layers"], case["width"], device)
    method, start, stop = _peak_meter(device)
    gc.collect()
    start()
    began = time.perf_counter()
    report = factorize_(
        model, case["rank"], streaming=case["streaming"], progress=False, **case["options"]
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    peak = stop()
    return {
        "method": method,
        "peak_bytes": peak,
        "seconds": seconds,
        "layer_bytes": case["width"] ** 2 * 4,
        "model_bytes": case["layers"] * case["width"] ** 2 * 4,
        "kept": report.params_after / report.params_before,
    }


def child(case: dict, device: str) -> dict:
    """Measure one case in this process (call it in a fresh one): bytes, seconds, error."""
    if "streaming" in case:
        return conversion_child(case, device)
    convert = _converter(case["layer"])
    warm_shape, warm_options = WARM_UP_SHAPES[case["layer"]]
    warm_options = {**case["options"], **warm_options}
    convert(_dense(case["layer"], warm_shape, device), case["rank"], **warm_options)
    dense = _dense(case["layer"], case["shape"], device)
    method, start, stop = _peak_meter(device)
    gc.collect()
    with torch.no_grad():
        start()
        began = time.perf_counter()
        layer = convert(dense, case["rank"], **case["options"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        peak = stop()
        weight = dense.weight
        error = float((layer.dense_weight() - weight).norm() / weight.norm())
    factor_bytes = sum(
        p.numel() * p.element_size() for n, p in layer.named_parameters() if n != "bias"
    )
    return {
        "method": method,
        "peak_bytes": peak,
        "seconds": seconds,
        "error": error,
        "dense_bytes": weight.numel() * weight.element_size(),
        "factor_bytes": factor_bytes,
        "rank": str(layer.rank),
    }


def run_case(case: dict, device: str, threads: int, timeout: float = 900.0) -> dict:
    """Run :func:`child` in a fresh interpreter; on failure ``{"failed": reason}``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "benchmarks.bench_memory", "--child", json.dumps(case),
        "--device", device, "--threads", str(threads),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"failed": f"exit {done.returncode}: {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case_label(case: dict) -> str:
    shape = "x".join(map(str, case["shape"]))
    options = ", ".join(
        f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in case["options"].items()
    )
    return f"{case['layer']} {shape}, rank {case['rank']}, {options}"


def measure(cases: Sequence[dict], device: str, threads: int) -> List[Tuple[dict, dict]]:
    """``(case, result)`` for every case, one subprocess each, in order."""
    results = []
    for case in cases:
        result = run_case(case, device, threads)
        print(f"  {_case_label(case)}: {result}", flush=True)
        results.append((case, result))
    return results


def table(results: Sequence[Tuple[dict, dict]], device: str, threads: int) -> Table:
    """One row per case; failed cases say why."""
    methods = sorted({r["method"] for _, r in results if "method" in r})
    out = Table(
        f"Peak extra memory of one `from_dense` call on {device} ({', '.join(methods) or '-'}), "
        f"each case in a fresh subprocess with {threads} thread(s) after a warm-up on a tiny "
        f"layer; includes the returned factors. Time: that single call.",
        ["case", "rank", "dense weight", "factors", "peak increase", "peak / dense weight",
         "from_dense time", "weight error"],
    )  # fmt: skip
    for case, r in results:
        if "failed" in r:
            out.add(_case_label(case), "-", "-", "-", f"failed: {r['failed']}", "-", "-", "-")
            continue
        out.add(
            _case_label(case),
            r["rank"],
            f"{r['dense_bytes'] / MIB:.1f} MiB",
            f"{r['factor_bytes'] / MIB:.1f} MiB",
            f"{r['peak_bytes'] / MIB:.1f} MiB",
            f"{r['peak_bytes'] / r['dense_bytes']:.2f}",
            fmt_time(r["seconds"]),
            f"{r['error']:.4f}",
        )
    return out


def conversion_table(results: Sequence[Tuple[dict, dict]], device: str, threads: int) -> Table:
    """One row per conversion case (plain vs streaming)."""
    methods = sorted({r["method"] for _, r in results if "method" in r})
    out = Table(
        f"Peak extra memory of `factorize_` on {device} ({', '.join(methods) or '-'}) of a stack "
        "of Linears built on meta and materialised layer by layer, each case in a fresh "
        f"subprocess with {threads} thread(s): all layers built, then swapped (plain) vs "
        "swapped one at a time with the dense weight released (`streaming=True`).",
        ["model", "mode", "rank", "kept", "largest layer", "peak increase",
         "peak / largest layer", "time"],
    )  # fmt: skip
    for case, r in results:
        label = f"{case['layers']} x Linear({case['width']}, {case['width']})"
        mode = "streaming" if case["streaming"] else "plain"
        if "failed" in r:
            out.add(label, mode, case["rank"], "-", "-", f"failed: {r['failed']}", "-", "-")
            continue
        out.add(
            label, mode, case["rank"], f"{r['kept']:.3f}", f"{r['layer_bytes'] / MIB:.0f} MiB",
            f"{r['peak_bytes'] / MIB:.1f} MiB", f"{r['peak_bytes'] / r['layer_bytes']:.2f}",
            fmt_time(r["seconds"]),
        )  # fmt: skip
    return out


def section(quick: bool, device: str) -> Section:
    """The tables and, when both SVD paths ran, a randomized-vs-full headline."""
    result = Section("memory", "Peak memory of from_dense on large layers and of factorize_")
    threads = torch.get_num_threads()
    results = measure(QUICK_CASES if quick else CASES, device, threads)
    result.tables.append(table(results, device, threads))
    conversions = [
        (case, run_case(case, device, threads))
        for case in (QUICK_CONVERSIONS if quick else CONVERSIONS)
    ]
    result.tables.append(conversion_table(conversions, device, threads))
    streamed = [r for c, r in conversions if c["streaming"] and "failed" not in r]
    if streamed:
        worst = max(r["peak_bytes"] / r["layer_bytes"] for r in streamed)
        result.headline.append(
            f"factorize_(streaming=True) of {conversions[-1][0]['layers']} Linears: peak extra "
            f"memory {worst:.2f}x the largest layer's dense weight."
        )
    svd: Dict[str, dict] = {
        case["options"]["method"]: r
        for case, r in results
        if case["layer"] == "SVDLinear" and "failed" not in r
    }
    if {"full", "randomized"} <= svd.keys():
        full, randomized = svd["full"], svd["randomized"]
        size = "x".join(map(str, next(c["shape"] for c, _ in results if c["layer"] == "SVDLinear")))
        result.headline.append(
            f"SVDLinear `from_dense` of {size} at rank fraction 0.25: randomized "
            f"{fmt_ratio(full['seconds'] / randomized['seconds'])} faster than the full SVD, "
            f"peak extra memory {randomized['peak_bytes'] / MIB:.0f} MiB vs "
            f"{full['peak_bytes'] / MIB:.0f} MiB, weight error "
            f"{randomized['error'] / full['error']:.4f}x the full SVD's."
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.device)))
        return
    print(section(args.quick, args.device).markdown())


if __name__ == "__main__":
    main()
