"""Interleaved timing: every candidate is measured in each round, medians are compared.

Machines are shared and noisy; running the candidates round-robin makes slow phases
hit all of them, and medians ignore outliers. Ratios are only ever formed between
numbers measured in the same call of :func:`interleaved_medians`.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _calls_per_block(fn: Callable[[], object], device: str, min_block_s: float) -> int:
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(min_block_s / once))


def interleaved_medians(
    candidates: Dict[str, Callable[[], object]],
    *,
    rounds: int = 15,
    min_block_s: float = 0.02,
    device: str = "cpu",
) -> Dict[str, float]:
    """Median seconds per call of each candidate over ``rounds`` interleaved rounds.

    Each round times one block per candidate; a block repeats the call enough times
    to last about ``min_block_s`` (at least once), so tiny calls are not dominated
    by timer resolution.
    """
    with torch.no_grad():
        blocks = {
            name: _calls_per_block(fn, device, min_block_s) for name, fn in candidates.items()
        }
        samples: Dict[str, list] = {name: [] for name in candidates}
        for _ in range(rounds):
            for name, fn in candidates.items():
                n = blocks[name]
                _sync(device)
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                _sync(device)
                samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_info(device: str = "cpu") -> str:
    """One line describing where the numbers were measured."""
    info = (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    if device.startswith("cuda"):
        info += f", {torch.cuda.get_device_name()}"
    return info


def cpu_model() -> str:
    """The CPU's marketing name (``model name`` in ``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_details(device: str = "cpu") -> Dict[str, str]:
    """Everything a results table needs to say where it was measured, as strings.

    Keys: ``cpu``, ``cores`` (logical CPUs, and how many this process may use),
    ``torch``, ``python``, ``threads`` (``torch.get_num_threads()``) and ``device``
    (``cpu`` or the CUDA device's name).
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable)",
        "torch": torch.__version__,
        "python": platform.python_version() + f" ({sys.platform})",
        "threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); ``None`` off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
