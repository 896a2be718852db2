"""Independent tasks on Ray actors that each receive what the tasks share once: the one way hyfx runs on Ray.

A worker class is made a Ray actor per worker; its constructor gets the shared objects (put in Ray's object store
once, so each machine holds one copy however many tasks it runs) and the torch thread count to pin, and keeps what
it builds from them (a rebuilt graph, decoded images). Tasks go to whichever actor is idle (`ActorPool`), so a slow
machine of a cluster simply runs fewer. Without an address a local Ray is started in-process with `workers × threads`
CPUs and shut down afterwards; with one, the work goes to that cluster. Ray is the `distributed` extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from hyfx.errors import HyfxError

LAST_RUN: dict = {}  # the latest run_on_actors: workers, threads, tasks, per-task and per-actor set-up seconds


def require_ray():
    try:
        import ray
    except ImportError:
        raise HyfxError("--workers / --ray-address run on Ray, which is not installed: "
                        "pip install -e \".[distributed]\"") from None
    return ray


def check_workers(workers: int) -> None:
    if workers < 1:
        raise HyfxError(f"--workers {workers}: give 1 or more")


@contextmanager
def ray_session(workers: int, threads: int = 1, address: str | None = None) -> Iterator:
    """Ray, initialised here when it is not yet (a local Ray of `workers × threads` CPUs, or the cluster at
    `address`) and then shut down again on leaving."""
    ray = require_ray()
    check_workers(workers)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers * threads, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class Worker:
    """Base of the actor classes: pins torch's threads, then `setup(*shared)`; `run(task)` does one task."""

    def __init__(self, *shared, threads: int = 1):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        self.setup(*shared)
        self.setup_seconds = time.perf_counter() - start

    def setup(self, *shared) -> None:
        raise NotImplementedError

    def run(self, task):
        raise NotImplementedError


def run_on_actors(worker: type[Worker], shared: Sequence, tasks: Sequence, workers: int, address: str | None = None,
                  threads: int = 1, desc: str = "tasks", progress: bool = True,
                  on_result: Callable[[object, object], None] | None = None) -> list:
    """Every task's `worker.run(task)` on `workers` actors of `threads` threads; results in the order of `tasks`
    (`on_result(task, result)` sees each as it arrives). Timings of the run land in `LAST_RUN`."""
    from tqdm import tqdm

    with ray_session(workers, threads, address) as ray:
        from ray.util import ActorPool

        wall = time.perf_counter()
        refs = [ray.put(v) for v in shared]
        actor = ray.remote(num_cpus=threads)(worker)
        actors = [actor.remote(*refs, threads=threads) for _ in range(workers)]
        try:
            results: dict[int, object] = {}
            task_seconds = []
            pool = ActorPool(actors).map_unordered(lambda a, item: a.__ray_call__.remote(_timed_run, item),
                                                   list(enumerate(tasks)))
            for i, result, seconds in tqdm(pool, total=len(tasks), desc=desc, disable=not progress, leave=False):
                results[i] = result
                task_seconds.append(seconds)
                if on_result is not None:
                    on_result(tasks[i], result)
            setup = ray.get([a.__ray_call__.remote(lambda self: self.setup_seconds) for a in actors])
        finally:
            for a in actors:
                ray.kill(a)
        LAST_RUN.clear()
        LAST_RUN.update(workers=workers, threads=threads, tasks=len(tasks), task_seconds=task_seconds,
                        setup_seconds=setup, wall_seconds=time.perf_counter() - wall)
    return [results[i] for i in range(len(tasks))]


def _timed_run(self: Worker, item: tuple[int, object]) -> tuple[int, object, float]:
    start = time.perf_counter()
    index, task = item
    return index, self.run(task), time.perf_counter() - start
