"""Measured schedules (issue #19): the fastest candidate is chosen once per bucket and
cached; nothing is timed unless asked, while compiling or exporting; every schedule a
layer can pick computes the same function (oracle: the dense layer)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from factorized_layers import TuckerLinear, measured_schedules, set_measured_schedules
from factorized_layers.layers.base import input_problem
from factorized_layers.schedule import (
    ScheduleCache,
    batch_bucket,
    choose_schedule,
    default_schedule_cache,
    measured_schedules_enabled,
)
from factorized_layers.testing import assert_close_to_reference

from .module_db import MODULE_CASES

X = torch.zeros(4, 3)


def _never():
    raise AssertionError("this candidate must not run")


def _sleeping(seconds, calls):
    def run():
        calls.append(seconds)
        time.sleep(seconds)

    return run


def test_off_by_default_and_the_default_runs_without_timing():
    assert not measured_schedules_enabled()
    cache = ScheduleCache()
    chosen = choose_schedule(
        "k", "key", "a", {"a": _never, "b": _never}, {"a": 1, "b": 1}, X, 4, cache
    )
    assert chosen == "a" and cache.info().measurements == 0


def test_the_fastest_candidate_wins_once_per_bucket_and_is_cached():
    cache, calls = ScheduleCache(), []
    candidates = {"slow": _sleeping(0.004, calls), "fast": _sleeping(0.0, calls)}
    modelled = {"slow": 1.0, "fast": 1.0}
    with measured_schedules():
        assert choose_schedule("k", "key", "slow", candidates, modelled, X, 40, cache) == "fast"
        assert calls.count(0.004) == 9  # warm-up, one call to size rounds, seven rounds
        timed = len(calls)
        for batch in (33, 64):  # the same bucket: no new timing
            assert choose_schedule("k", "key", "slow", candidates, modelled, X, batch, cache)
        assert len(calls) == timed
        choose_schedule("k", "key", "slow", candidates, modelled, X, 65, cache)
    assert len(calls) > timed and calls.count(0.004) == 18
    info = cache.info()
    assert (info.measurements, info.hits, info.currsize) == (2, 2, 2)
    key, chosen, timings = cache.choices()[0]
    assert key == ("k", "key", X.device, X.dtype, 64) and chosen == "fast"
    assert timings["slow"] > timings["fast"]


def test_candidates_the_cost_model_rules_out_are_never_timed():
    cache, calls = ScheduleCache(), []
    candidates = {"a": _sleeping(0.0, calls), "b": _sleeping(0.0, calls), "c": _never}
    with measured_schedules():
        chosen = choose_schedule(
            "k", "key", "a", candidates, {"a": 1.0, "b": 2.0, "c": 100.0}, X, 4, cache
        )
    assert chosen in ("a", "b") and set(calls) == {0.0}


def test_the_cache_is_bounded_and_the_switch_is_validated():
    cache = ScheduleCache(maxsize=2)
    with measured_schedules():
        for key in range(5):
            candidates = {"a": lambda: None, "b": lambda: None}
            choose_schedule("k", key, "a", candidates, {"a": 1, "b": 1}, X, 4, cache)
    assert cache.info().currsize == 2 and cache.info().measurements == 5
    with pytest.raises(ValueError, match="maxsize must be a positive integer, got 0"):
        ScheduleCache(maxsize=0)
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        set_measured_schedules(1)
    assert [batch_bucket(b) for b in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]


def test_the_context_manager_is_per_thread_and_the_global_switch_is_not():
    seen = {}

    def other():
        seen["other"] = measured_schedules_enabled()

    with measured_schedules():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert measured_schedules_enabled()
    assert seen["other"] is False
    set_measured_schedules(True)
    try:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert seen["other"] is True
        with measured_schedules(False):
            assert not measured_schedules_enabled()
    finally:
        set_measured_schedules(False)


@pytest.mark.parametrize("case", MODULE_CASES, ids=str)
def test_measured_schedules_compute_the_same_function(case, monkeypatch):
    import factorized_layers.schedule as schedule

    monkeypatch.setattr(schedule, "_ROUNDS", 1)  # which one wins does not matter here
    monkeypatch.setattr(schedule, "_MIN_ROUND_SECONDS", 0.0)
    torch.manual_seed(0)
    dense = case.make_dense(device="cpu", dtype=torch.float32)
    layer = case.layer_cls.from_dense(dense, case.rank, **case.options)
    default_schedule_cache.clear()
    with measured_schedules():
        shapes = {(batch,) + tuple(case.input_shape[1:]) for batch in (1, 7, 300)}
        inputs = [case.info.make_input(shape, "cpu", torch.float32) for shape in shapes]
        # Batch sizes where the first dimension is one (not channels of an unbatched map).
        inputs = [x for x in inputs if input_problem(layer, x) is None] or [case.input()]
        for x in inputs:
            expected = case.info.reference_fn(layer, x)
            assert_close_to_reference(layer(x), expected, terms=case.reduction_terms)
            assert_close_to_reference(layer(x), expected, terms=case.reduction_terms)


def test_nothing_is_timed_while_compiling():
    torch.manual_seed(0)
    layer = TuckerLinear(384, 1536, rank=(12, 9, 7, 8, 8, 6),
                         in_shape=(8, 8, 6), out_shape=(16, 12, 8))  # fmt: skip
    default_schedule_cache.clear()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    x = torch.randn(64, 384)
    with measured_schedules():
        out = compiled(x)
    assert default_schedule_cache.info().measurements == 0
    torch.testing.assert_close(out, layer(x), rtol=1e-4, atol=1e-5)
