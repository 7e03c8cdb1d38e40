"""Measured schedules: time a kernel's candidate schedules once, run the fastest after.

Several kernels can run one layer in more than one order (a Tucker linear as a chain
of small GEMMs or by building its weight first, a low-rank linear input first or
weight first, ...). By default a deterministic cost model chooses. Like
``torch.backends.cudnn.benchmark``, :func:`set_measured_schedules` (or the
:func:`measured_schedules` context manager) makes each kernel time its candidates the
first time it meets a (schedule key, device, dtype, batch-size bucket) and run the
fastest from then on. Only candidates the cost model keeps (within
:data:`CANDIDATE_RATIO` of its best) are timed. Timing runs without autograd, on the
real operands, and costs a few calls of each candidate once per bucket; choices live
in a bounded, thread-safe cache (:data:`default_schedule_cache`). Under
``torch.compile`` and ``torch.export`` nothing is timed: the cost model decides.

Measured choices depend on the machine and its load, so two runs can pick different
schedules and differ by floating-point rounding; leave the switch off where bitwise
reproducibility matters.

Examples:
    >>> import torch
    >>> from factorized_layers import TuckerLinear
    >>> layer = TuckerLinear(384, 1536, rank=(12, 9, 7, 8, 8, 6),
    ...                      in_shape=(8, 8, 6), out_shape=(16, 12, 8))
    >>> with measured_schedules():
    ...     y = layer(torch.randn(64, 384))   # times the candidates once, then runs
    >>> y.shape
    torch.Size([64, 1536])
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import threading
import time
from typing import Any, Callable, Hashable, Iterator, Mapping, NamedTuple

import torch

__all__ = [
    "CANDIDATE_RATIO",
    "batch_bucket",
    "ScheduleCache",
    "ScheduleCacheInfo",
    "choose_schedule",
    "default_schedule_cache",
    "interleaved_medians",
    "measured_schedules",
    "measured_schedules_enabled",
    "measuring",
    "set_measured_schedules",
]

CANDIDATE_RATIO = 4.0
"""A schedule is timed only if its modelled cost is within this factor of the best."""

_ROUNDS = 7
"""Interleaved timing rounds per candidate (after one warm-up call); the median decides."""

_MIN_ROUND_SECONDS = 2e-3
"""A round repeats a faster call until it lasts about this long (timer resolution)."""

_state = threading.local()
_global = {"enabled": False}


def set_measured_schedules(enabled: bool) -> None:
    """Turn measured schedules on or off for the whole process (default off)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _global["enabled"] = enabled


def measured_schedules_enabled() -> bool:
    """Whether kernels time their schedules now (a :func:`measured_schedules` block in
    this thread wins over :func:`set_measured_schedules`)."""
    local = getattr(_state, "enabled", None)
    return _global["enabled"] if local is None else local


@contextlib.contextmanager
def measured_schedules(enabled: bool = True) -> Iterator[None]:
    """Measure schedules (or, with ``enabled=False``, do not) inside the block, in this
    thread."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous = getattr(_state, "enabled", None)
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


class ScheduleCacheInfo(NamedTuple):
    hits: int
    measurements: int
    maxsize: int
    currsize: int


class ScheduleCache:
    """Bounded, thread-safe LRU map from a measurement key to the chosen schedule name.

    Args:
        maxsize: Most choices kept; the least recently used one is evicted first.
    """

    def __init__(self, maxsize: int = 4096) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive integer, got {maxsize!r}")
        self.maxsize = maxsize
        self._choices: collections.OrderedDict = collections.OrderedDict()
        self._timings: dict = {}
        self._lock = threading.Lock()
        self._hits = self._measurements = 0

    def get(self, key: Hashable) -> str | None:
        with self._lock:
            name = self._choices.get(key)
            if name is not None:
                self._choices.move_to_end(key)
                self._hits += 1
            return name

    def put(self, key: Hashable, name: str, timings: Mapping[str, float]) -> None:
        with self._lock:
            self._measurements += 1
            self._choices[key] = name
            self._choices.move_to_end(key)
            self._timings[key] = dict(timings)
            while len(self._choices) > self.maxsize:
                evicted, _ = self._choices.popitem(last=False)
                self._timings.pop(evicted, None)

    def choices(self) -> list:
        """``[(key, chosen name, {candidate: median seconds})]``, least recent first."""
        with self._lock:
            return [(key, name, dict(self._timings[key])) for key, name in self._choices.items()]

    def info(self) -> ScheduleCacheInfo:
        with self._lock:
            return ScheduleCacheInfo(
                self._hits, self._measurements, self.maxsize, len(self._choices)
            )

    def clear(self) -> None:
        with self._lock:
            self._choices.clear()
            self._timings.clear()
            self._hits = self._measurements = 0


default_schedule_cache = ScheduleCache()
"""The process-wide cache of measured choices."""


def batch_bucket(batch: int) -> int:
    """The power of two at or above ``batch``: choices are shared within a bucket."""
    return 1 if batch <= 1 else 1 << (int(batch) - 1).bit_length()


def measuring() -> bool:
    """Whether a kernel should time its schedules now (never while compiling or
    exporting: ``is_compiling`` short-circuits before dynamo sees the thread state)."""
    return (
        not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and measured_schedules_enabled()
    )


def choose_schedule(
    kernel: str,
    key: Hashable,
    default: str,
    candidates: Mapping[str, Callable[[], Any]],
    modelled: Mapping[str, float],
    operand: torch.Tensor,
    batch: int,
    cache: ScheduleCache | None = None,
) -> str:
    """The schedule to run: ``default`` (the cost model's), or, when measuring, the fastest.

    Args:
        kernel: Name of the kernel (part of the cache key).
        key: What fixes the candidates' costs besides device, dtype and batch size
            (e.g. the layer's plan).
        default: The cost model's choice, a key of ``candidates``.
        candidates: Schedule name -> a call that runs it on the real operands.
        modelled: Schedule name -> modelled cost (any unit); only candidates within
            :data:`CANDIDATE_RATIO` of the cheapest are timed.
        operand: The input (its device and dtype are part of the key).
        batch: Rows of the input; choices are shared within :func:`batch_bucket`.
        cache: Where choices are kept (default :data:`default_schedule_cache`).

    Returns:
        A key of ``candidates``.
    """
    if not measuring():
        return default
    cheapest = min(modelled.values())
    kept = [name for name in candidates if modelled[name] <= CANDIDATE_RATIO * cheapest]
    if default not in kept:
        kept.append(default)
    if len(kept) < 2:
        return default
    cache = default_schedule_cache if cache is None else cache
    full_key = (kernel, key, operand.device, operand.dtype, batch_bucket(batch))
    chosen = cache.get(full_key)
    if chosen is not None:
        return chosen
    timings = interleaved_medians({name: candidates[name] for name in kept}, operand.device)
    chosen = min(timings, key=timings.__getitem__)
    cache.put(full_key, chosen, timings)
    return chosen


def interleaved_medians(
    runs: Mapping[str, Callable[[], Any]],
    device: torch.device,
    rounds: int | None = None,
    min_round_seconds: float | None = None,
) -> dict:
    """Median seconds per call of each run over ``rounds`` interleaved rounds (no grad).

    Interleaving spreads a load change on a shared machine over every candidate; a
    round repeats a call that takes less than ``min_round_seconds`` (at most 1000 times).
    ``None``: :data:`_ROUNDS` and :data:`_MIN_ROUND_SECONDS`.
    """
    rounds = _ROUNDS if rounds is None else rounds
    min_round_seconds = _MIN_ROUND_SECONDS if min_round_seconds is None else min_round_seconds

    def timed(run: Callable[[], Any], calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    with torch.no_grad():
        calls = {}
        for name, run in runs.items():
            run()  # warm-up: allocator, plans, caches
            once = max(timed(run, 1), 1e-7)
            calls[name] = max(1, min(1000, int(min_round_seconds / once)))
        samples: dict = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                samples[name].append(timed(run, calls[name]))
    return {name: statistics.median(values) for name, values in samples.items()}
