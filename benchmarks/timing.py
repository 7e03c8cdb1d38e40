"""Interleaved timing: every candidate is measured in each round, medians are compared.

Machines are shared and noisy; running the candidates round-robin makes slow phases
hit all of them, and medians ignore outliers. Ratios are only ever formed between
numbers measured in the same call of :func:`interleaved_medians`.
"""

from __future__ import annotations

import platform
import statistics
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
