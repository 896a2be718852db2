"""The sensitivity table on Ray: (image chunk × layers) tasks on workers that each hold the model and images once.

Every (layer, config) entry of the table is independent of the others, and so is every chunk of images: the serial
loop runs the FP32 graph once per chunk and then each layer's suffix from that chunk's activations. A task is one
chunk (and, only where there are too few chunks to share out evenly, one group of layers), so no FP32 pass is
repeated beyond that split. Tasks run on Ray actors: an actor is built once per worker, receives the analysed-graph
recipe (`rebuild`, a picklable callable: torch.export graphs do not pickle), the images and the per-(layer, config)
policies through Ray's object store, rebuilds the graph, pins its torch threads, and then runs any number of tasks.
Each task computes exactly what the serial loop computes for its chunk and layers (same chunk boundaries, same
kernels at the same thread count), so the merged table is the serial one, bit for bit. Without an address a local
Ray is started in-process with `workers` CPUs and shut down afterwards; with one, the work goes to that cluster.
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

BALANCED_CHUNKS = 4  # chunks per worker from which whole-chunk tasks balance well enough on their own
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


def plan_tasks(n_images: int, chunk: int, layers: Sequence[str], workers: int
               ) -> list[tuple[tuple[int, int], list[str]]]:
    """((start, stop) of one chunk of images, its layers) per task. With a few chunks per worker or more, every
    chunk is one task (the pool evens out what is left over); with fewer, each chunk's layers are split into the
    fewest groups that give every worker the same number of tasks (each group repeats the chunk's FP32 pass)."""
    chunks = [(start, min(start + chunk, n_images)) for start in range(0, n_images, chunk)]
    groups = 1 if len(chunks) >= BALANCED_CHUNKS * workers else next(
        g for g in range(1, workers + 1) if (len(chunks) * g) % workers == 0 or g == len(layers))
    return [(c, group) for c in chunks for group in split_layers(layers, groups)]


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

    def run(self, images: tuple[int, int], layers: Sequence[str]) -> tuple[tuple[int, int], torch.Tensor, dict, float]:
        start = time.perf_counter()
        fp32, logits = self.compute(self.hg, layers, self.configs, self.policy_of, self.x_all[images[0]:images[1]],
                                    self.chunk, progress=False)
        return images, fp32, logits, time.perf_counter() - start


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
        tasks = plan_tasks(len(x_all), chunk, layers, workers)
        fp32: dict[tuple[int, int], torch.Tensor] = {}
        parts: dict[tuple[int, int], dict] = {}
        task_seconds = []
        from ray.util import ActorPool
        from tqdm import tqdm

        # the pool hands each task to the next idle actor: a slower machine of a cluster simply runs fewer
        results = ActorPool(actors).map_unordered(lambda a, task: a.run.remote(*task), tasks)
        for images, out, part, seconds in tqdm(results, total=len(tasks), desc=f"sensitivity ({workers} workers)",
                                               disable=not progress, leave=False):
            fp32.setdefault(images, out)
            parts.setdefault(images, {}).update(part)
            task_seconds.append(seconds)
        LAST_RUN.clear()
        LAST_RUN.update(workers=workers, threads=threads, tasks=len(tasks), task_seconds=task_seconds,
                        setup_seconds=ray.get([a.__ray_call__.remote(lambda self: self.setup_seconds) for a in actors]),
                        wall_seconds=time.perf_counter() - wall)
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    order = sorted(fp32)  # chunks in image order, as the serial loop concatenates them
    logits = {key: torch.cat([parts[c][key] for c in order]) for key in parts[order[0]]}
    return torch.cat([fp32[c] for c in order]), logits
