"""Reliability in one run: what tests/reliability tried and survived, and a training soak.

Run: ``python -m benchmarks.bench_reliability [--quick]``.

1. ``pytest tests/reliability`` runs in a subprocess (hypothesis's ``ci`` profile) with
   ``FACTORIZED_LAYERS_TALLY`` set, so every check records itself as tried and, when it
   held, as survived: faults injected at every swap, decomposition, linear-algebra call
   and calibration hook; bad run-time inputs; hostile and damaged checkpoints; results
   from 8 threads at once. ``--quick`` skips this (the test suite runs the package).
2. The soak: the demo's digits CNN converted by ``factorize_`` (CP convolutions, Tucker
   linears) trains for 10,000 Adam
   steps on batches whose size cycles through 1, 8, 17, 32 and 64 (a new shape is a new
   contraction plan), with a ``save_factorized``/``load_factorized`` round trip every
   2,000 steps. Resident memory (``VmRSS``), live Python objects, the contraction
   cache and the hooks are read every 1,000 steps; growth is counted from step 1,000
   (after warm-up) to the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import (
    CPConv2d,
    TuckerLinear,
    factorize_,
    load_factorized,
    save_factorized,
)
from factorized_layers.contract import default_cache
from factorized_layers.demo import build_cnn

from .report import Section, Table, fmt_time
from .timing import machine_info, status_kib

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZES = (32, 1, 64, 8, 17)
# CP convolutions and Tucker linears: depthwise-convolution kernels and planned
# contractions (the cached kind) both run.
LAYERS = {nn.Conv2d: CPConv2d, nn.Linear: TuckerLinear}
FULL = {"steps": 10_000, "every": 1_000, "checkpoint_every": 2_000}
QUICK = {"steps": 200, "every": 100, "checkpoint_every": 100}


def tally_tests() -> Dict[str, object]:
    """Run tests/reliability once and return its tally (see tests/reliability/tally.py)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tally.json")
        env = dict(os.environ, FACTORIZED_LAYERS_TALLY=path, HYPOTHESIS_PROFILE="ci")
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if not os.path.exists(path):
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"tests/reliability wrote no tally: {' | '.join(tail)}")
        with open(path) as handle:
            tally = json.load(handle)
    tally["seconds"] = seconds
    tally["summary"] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return tally


def _hooks(model: nn.Module) -> int:
    return sum(
        len(getattr(module, attr))
        for module in model.modules()
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks")
    )


def soak(steps: int, every: int, checkpoint_every: int, seed: int = 0) -> Dict[str, object]:
    """Train the converted digits CNN for ``steps`` steps; read memory every ``every``."""
    torch.manual_seed(seed)
    model = build_cnn(16)
    factorize_(model, 0.5, layers=LAYERS, progress=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    readings: List[Dict[str, float]] = []
    hooks = _hooks(model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "soak.pt")
        for step in range(1, steps + 1):
            batch = BATCH_SIZES[step % len(BATCH_SIZES)]
            x = torch.randn(batch, 1, 8, 8, generator=generator)
            y = torch.randint(0, 10, (batch,), generator=generator)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % checkpoint_every == 0:
                save_factorized(model, path)
                fresh = load_factorized(build_cnn(16), path)
                with torch.no_grad():
                    if not torch.equal(fresh(x), model(x)):
                        raise RuntimeError(f"checkpoint round trip changed outputs at step {step}")
                del fresh
            if step % every == 0:
                gc.collect()
                readings.append(
                    {
                        "step": step,
                        "rss_mib": (status_kib("VmRSS") or 0) / 1024,
                        "objects": len(gc.get_objects()),
                        "cache": default_cache.info().currsize,
                        "hooks": _hooks(model),
                        "loss": loss.item(),
                    }
                )
    seconds = time.perf_counter() - start
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("the soak produced non-finite parameters")
    first, last = readings[0], readings[-1]
    return {
        "steps": steps,
        "seconds": seconds,
        "readings": readings,
        "hooks_before": hooks,
        "rss_growth_mib": last["rss_mib"] - first["rss_mib"],
        "object_growth": last["objects"] - first["objects"],
        "cache_max": max(r["cache"] for r in readings),
        "cache_bound": default_cache.info().maxsize,
    }


def section(quick: bool, device: str) -> Section:
    """The reliability table (tests' tally) and the soak table, from one run."""
    result = Section("reliability", "Reliability: faults, bad inputs, checkpoints, threads, soak")
    if device != "cpu":
        result.skipped = "the reliability run is CPU-only (the tests and the soak run on CPU)"
        return result
    cfg = QUICK if quick else FULL
    if quick:
        result.notes.append(
            "--quick: tests/reliability not run here (the test suite runs it); soak shortened."
        )
    else:
        tally = tally_tests()
        table = Table(
            "What `pytest tests/reliability` tried and what held, from one run "
            f"({fmt_time(tally['seconds'])}, hypothesis `ci` profile; pytest exit status "
            f"{tally['exitstatus']}: {tally['summary']}). A fault survived when the model "
            "was bit-identical afterwards (types, parameters, buffers, requires_grad, hooks, "
            "training flags); a bad input or hostile checkpoint was refused cleanly when it "
            "raised ValueError/TypeError naming the layer or entry, of bounded length, and "
            "changed nothing.",
            ["check", "tried", "held"],
        )
        for category in sorted(tally["tried"]):
            tried, held = tally["tried"][category], tally["survived"].get(category, 0)
            table.add(category, tried, held)
        result.tables.append(table)
        total = sum(tally["tried"].values())
        held = sum(tally["survived"].values())
        result.headline.append(
            f"Reliability: {held} of {total} injected faults, bad inputs, hostile checkpoints "
            "and concurrent results held (nothing lost)."
        )
    measured = soak(cfg["steps"], cfg["every"], cfg["checkpoint_every"])
    soak_table = Table(
        "Soak: the demo's digits CNN (width 16) converted by factorize_(0.5) (CPConv2d, "
        f"TuckerLinear) trained for "
        f"{measured['steps']} Adam steps ({fmt_time(measured['seconds'])}), batch sizes "
        f"cycling {BATCH_SIZES}, a checkpoint round trip every {cfg['checkpoint_every']} "
        "steps; memory read after gc every "
        f"{cfg['every']} steps. Hooks on the model before training: "
        f"{measured['hooks_before']}; contraction cache bound {measured['cache_bound']}.",
        ["step", "RSS (MiB)", "live Python objects", "cached contractions", "hooks", "loss"],
    )
    for r in measured["readings"]:
        soak_table.add(
            r["step"], f"{r['rss_mib']:.1f}", r["objects"], r["cache"], r["hooks"],
            f"{r['loss']:.3f}",
        )  # fmt: skip
    result.tables.append(soak_table)
    result.notes.append(
        f"Soak growth from step {cfg['every']} to {measured['steps']}: RSS "
        f"{measured['rss_growth_mib']:+.1f} MiB, live objects {measured['object_growth']:+d}, "
        f"at most {measured['cache_max']} cached contractions."
    )
    if not quick:
        result.headline.append(
            f"Soak: {measured['steps']} training steps of a converted CNN grew RSS by "
            f"{measured['rss_growth_mib']:+.1f} MiB after warm-up."
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no test run, 200-step soak")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(machine_info(args.device))
    print(section(args.quick, args.device).markdown())


if __name__ == "__main__":
    main()
