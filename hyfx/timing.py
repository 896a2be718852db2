"""The one timing loop: every latency hyfx reports or decides on is measured here.

Configurations compared with each other are timed in one loop, run by run in turn, so background load on a
shared machine hits them alike; results are per-run times from which medians and ratios to a baseline timed
in the same loop are taken. `pause` sleeps between calls, for runtimes whose thread pools keep spinning after a
call and would steal the cores from the next one timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def time_interleaved(calls: Mapping[str, Callable[[], object]], runs: int = 30, warmup: int = 5, pause: float = 0.0,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Per-run seconds of each call: `warmup` untimed runs of each, then `runs` rounds calling each once in turn.

    `clock=time.thread_time` measures the calling thread's CPU time instead: only meaningful for one-thread
    work, but blind to other processes competing for the cores.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            if pause:
                time.sleep(pause)
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` untimed runs, in seconds."""
    return median(time_interleaved({"fn": fn}, runs=repeats, warmup=warmup)["fn"])


def alone_over_interleaved(calls: Mapping[str, Callable[[], object]], interleaved: Mapping[str, list[float]],
                           runs: int = 30, warmup: int = 5, pause: float = 0.01) -> dict[str, float]:
    """Per call, its median timed alone (a `pause` between runs) over its median in `interleaved`: 1.0 says the shared
    loop did not distort it; well below 1 says something in the loop (a spinning thread pool, another runtime's
    threads) slowed it there."""
    return {name: median(time_interleaved({name: fn}, runs=runs, warmup=warmup, pause=pause)[name])
            / median(interleaved[name]) for name, fn in calls.items()}
