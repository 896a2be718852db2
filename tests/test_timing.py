"""The one timing loop: every configuration called in turn, warm-up untimed, a pause where asked."""

from __future__ import annotations

import time

from hyfx.timing import alone_over_interleaved, median_time, time_interleaved


def test_calls_run_in_turn_after_their_warmup():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = time_interleaved(calls, runs=3, warmup=2)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_a_fake_clock_measures_what_it_is_told():
    ticks = iter(range(100))
    times = time_interleaved({"x": lambda: None}, runs=4, warmup=0, clock=lambda: next(ticks))
    assert times["x"] == [1, 1, 1, 1]


def test_pause_and_alone_ratio():
    calls = {"sleep": lambda: time.sleep(0.002)}
    start = time.perf_counter()
    times = time_interleaved(calls, runs=5, warmup=0, pause=0.01)
    assert time.perf_counter() - start >= 5 * 0.012
    assert 0.3 < alone_over_interleaved(calls, times, runs=5)["sleep"] < 3
    assert median_time(calls["sleep"], repeats=3, warmup=0) >= 0.002
