"""The sensitivity table on Ray: (image chunk × layers) tasks on workers that each hold the model and images once.

Every (layer, config) entry of the table is independent of the others, and so is every chunk of images: the serial
loop runs the FP32 graph once per chunk and then each layer's suffix from that chunk's activations. A task is one
chunk (and, only where there are too few chunks to share out evenly, one group of layers), so no FP32 pass is
repeated beyond that split. Tasks run on Ray actors (`hyfx.ray_workers`): each receives the analysed-graph recipe
(`rebuild`, a picklable `hyfx.graph.GraphRecipe`: torch.export graphs do not pickle), the images and the
per-(layer, config) policies once, rebuilds the graph, and then runs any number of tasks. Each task computes exactly
what the serial loop computes for its chunk and layers (same chunk boundaries, same kernels at the same thread
count), so the merged table is the serial one, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph
from hyfx.hardware import BitConfig
from hyfx.quant.spec import LayerPolicy
from hyfx.ray_workers import Worker, run_on_actors

BALANCED_CHUNKS = 4  # chunks per worker from which whole-chunk tasks balance well enough on their own


def split_layers(layers: Sequence[str], tasks: int) -> list[list[str]]:
    """`layers` in `tasks` interleaved groups (neighbouring layers cost alike, so interleaving balances them)."""
    tasks = max(1, min(tasks, len(layers)))
    return [list(layers[i::tasks]) for i in range(tasks)]


def plan_tasks(n_images: int, chunk: int, layers: Sequence[str], workers: int
               ) -> list[tuple[tuple[int, int], list[str]]]:
    """((start, stop) of one chunk of images, its layers) per task. With a few chunks per worker or more, every
    chunk is one task (the pool evens out what is left over); with fewer, each chunk's layers are split into the
    fewest groups that give every worker the same number of tasks, at least two (each group repeats the chunk's
    FP32 pass, a small part of a task; a second task lets the pool move work off a worker that runs slow)."""
    chunks = [(start, min(start + chunk, n_images)) for start in range(0, n_images, chunk)]
    least = -(-2 * workers // len(chunks))
    groups = 1 if len(chunks) >= BALANCED_CHUNKS * workers else next(
        g for g in range(least, least + workers + 1) if (len(chunks) * g) % workers == 0 or g >= len(layers))
    groups = min(groups, len(layers))
    return [(c, group) for c in chunks for group in split_layers(layers, groups)]


class LayerWorker(Worker):
    """One worker's state: the rebuilt graph, the images and the policies, received once."""

    def setup(self, compute: Callable, rebuild: Callable[[], HybridGraph], layers: Sequence[str],
              configs: Sequence[BitConfig], policy_of: dict[tuple[str, str], LayerPolicy], x_all: torch.Tensor,
              chunk: int) -> None:
        self.compute = compute
        self.hg = rebuild()
        missing = sorted(set(layers) - set(self.hg.layers()))
        if missing:
            raise HyfxError(f"the graph a worker rebuilt lacks {len(missing)} layers (e.g. {missing[0]!r}): "
                            "`rebuild` must give the graph the table is built on")
        self.configs, self.policy_of, self.x_all, self.chunk = list(configs), policy_of, x_all, chunk

    def run(self, task: tuple[tuple[int, int], Sequence[str]]) -> tuple[torch.Tensor, dict]:
        (start, stop), layers = task
        return self.compute(self.hg, layers, self.configs, self.policy_of, self.x_all[start:stop], self.chunk,
                            progress=False)


def distributed_layer_logits(compute: Callable, rebuild: Callable[[], HybridGraph] | None, layers: Sequence[str],
                             configs: Sequence[BitConfig], policy_of: dict[tuple[str, str], LayerPolicy],
                             x_all: torch.Tensor, chunk: int, workers: int, address: str | None = None,
                             threads: int = 1, progress: bool = True
                             ) -> tuple[torch.Tensor, dict[tuple[str, str], torch.Tensor]]:
    """`compute` (`hyfx.mixed.sensitivity.layer_logits`, handed in so this module does not import its caller) for
    every layer, on `workers` Ray actors of `threads` threads; the run's timings land in `ray_workers.LAST_RUN`."""
    if rebuild is None:
        raise HyfxError("a distributed sensitivity table needs `rebuild` (how a worker rebuilds the analysed graph)")
    tasks = plan_tasks(len(x_all), chunk, layers, workers)
    results = run_on_actors(LayerWorker, (compute, rebuild, list(layers), list(configs), policy_of, x_all, chunk),
                            tasks, workers, address, threads, desc=f"sensitivity ({workers} workers)", progress=progress)
    fp32: dict[tuple[int, int], torch.Tensor] = {}
    parts: dict[tuple[int, int], dict] = {}
    for (images, _), (out, part) in zip(tasks, results, strict=True):
        fp32.setdefault(images, out)
        parts.setdefault(images, {}).update(part)
    order = sorted(fp32)  # chunks in image order, as the serial loop concatenates them
    logits = {key: torch.cat([parts[c][key] for c in order]) for key in parts[order[0]]}
    return torch.cat([fp32[c] for c in order]), logits
