"""The sensitivity table on Ray: layers spread over workers that each hold the model and images once.

Every (layer, config) entry of the table is independent of the others, so the layers are split into tasks and
run on Ray actors. An actor is built once per worker: it receives the analysed-graph recipe (`rebuild`, a picklable
callable: fx graphs themselves do not pickle), the images and the per-(layer, config) policies through Ray's object
store, rebuilds the graph, pins its torch threads, and then runs any number of layer tasks on them. Each task
computes exactly what the serial loop computes for its layers (same chunks, same kernels at the same thread
count), so the merged table is the serial one, bit for bit. Without an address a local Ray is started in-process
with `workers` CPUs and shut down afterwards; with one, the work goes to that cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph
from hyfx.hardware import BitConfig
from hyfx.quant.spec import LayerPolicy

TASKS_PER_WORKER = 4  # small tasks balance uneven layers; each costs one FP32 pass over the images
LAST_RUN: dict = {}  # timings of the latest distributed run (workers, tasks, setup and task seconds, wall seconds)


def require_ray():
    try:
        import ray
    except ImportError:
        raise HyfxError("--workers / --ray-address run on Ray, which is not installed: "
                        "pip install -e \".[distributed]\"") from None
    return ray


@dataclass(frozen=True)
class GraphRecipe:
    """How a worker rebuilds the analysed graph: capture `model` on an input of `shape` and analyse it as the
    driver did (`split_outliers`). Capture is deterministic, so every worker gets the driver's graph."""

    model: torch.nn.Module
    shape: tuple[int, ...]
    split_outliers: float | None = None

    def __call__(self) -> HybridGraph:
        from hyfx.capture import capture
        from hyfx.graph import analyze

        return analyze(capture(self.model.eval(), torch.zeros(self.shape)), self.split_outliers)


def split_layers(layers: Sequence[str], tasks: int) -> list[list[str]]:
    """`layers` in `tasks` interleaved groups (neighbouring layers cost alike, so interleaving balances them)."""
    tasks = max(1, min(tasks, len(layers)))
    return [list(layers[i::tasks]) for i in range(tasks)]


class LayerWorker:
    """One worker's state: the rebuilt graph, the images and the policies, received once."""

    def __init__(self, compute: Callable, rebuild: Callable[[], HybridGraph], layers: Sequence[str],
                 configs: Sequence[BitConfig], policy_of: dict[tuple[str, str], LayerPolicy], x_all: torch.Tensor,
                 chunk: int, threads: int):
        torch.set_num_threads(threads)
        self.compute = compute
        start = time.perf_counter()
        self.hg = rebuild()
        missing = sorted(set(layers) - set(self.hg.layers()))
        if missing:
            raise HyfxError(f"the graph a worker rebuilt lacks {len(missing)} layers (e.g. {missing[0]!r}): "
                            "`rebuild` must give the graph the table is built on")
        self.configs, self.policy_of, self.x_all, self.chunk = list(configs), policy_of, x_all, chunk
        self.setup_seconds = time.perf_counter() - start

    def run(self, layers: Sequence[str]) -> tuple[torch.Tensor, dict, float]:
        start = time.perf_counter()
        fp32, logits = self.compute(self.hg, layers, self.configs, self.policy_of, self.x_all, self.chunk,
                                    progress=False)
        return fp32, logits, time.perf_counter() - start


def distributed_layer_logits(compute: Callable, rebuild: Callable[[], HybridGraph] | None, layers: Sequence[str],
                             configs: Sequence[BitConfig], policy_of: dict[tuple[str, str], LayerPolicy],
                             x_all: torch.Tensor, chunk: int, workers: int, address: str | None = None,
                             threads: int = 1, progress: bool = True
                             ) -> tuple[torch.Tensor, dict[tuple[str, str], torch.Tensor]]:
    """`compute` (`hyfx.mixed.sensitivity.layer_logits`, handed in so this module does not import its caller) for
    every layer, on `workers` Ray actors of `threads` threads; the run's timings land in `LAST_RUN`."""
    ray = require_ray()
    if rebuild is None:
        raise HyfxError("a distributed sensitivity table needs `rebuild` (how a worker rebuilds the analysed graph)")
    if workers < 1:
        raise HyfxError(f"--workers {workers}: give at least one worker")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers * threads, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    wall = time.perf_counter()
    try:
        actor = ray.remote(num_cpus=threads)(LayerWorker)
        shared = [ray.put(v) for v in (compute, rebuild, list(layers), list(configs), policy_of, x_all)]
        actors = [actor.remote(*shared, chunk, threads) for _ in range(workers)]
        groups = split_layers(layers, workers * TASKS_PER_WORKER)
        pending = {actors[i % workers].run.remote(group): group for i, group in enumerate(groups)}
        fp32, logits, task_seconds = None, {}, []
        from tqdm import tqdm

        with tqdm(total=len(layers), desc=f"sensitivity ({workers} workers)", disable=not progress, leave=False) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                group = pending.pop(done[0])
                out, part, seconds = ray.get(done[0])
                fp32 = out if fp32 is None else fp32
                logits.update(part)
                task_seconds.append(seconds)
                bar.update(len(group))
        LAST_RUN.clear()
        LAST_RUN.update(workers=workers, threads=threads, tasks=len(groups), task_seconds=task_seconds,
                        setup_seconds=ray.get([a.__ray_call__.remote(lambda self: self.setup_seconds) for a in actors]),
                        wall_seconds=time.perf_counter() - wall)
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    return fp32, logits
