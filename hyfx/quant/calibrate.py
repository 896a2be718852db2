"""Run calibration batches through a graph, feeding chosen node outputs to observers or collectors."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from tqdm import tqdm


class _Tap(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, taps: dict[str, Callable[[torch.Tensor], None]]):
        super().__init__(gm)
        self.taps = taps

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        tap = self.taps.get(n.name)
        if tap is not None:
            tap(out)
        return out


def batches(loader: Iterable, max_batches: int | None = None) -> Iterable[torch.Tensor]:
    """Images from a loader of (images, labels) pairs or of bare image tensors."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def run_with_taps(gm: fx.GraphModule, taps: dict[str, Callable[[torch.Tensor], None]], loader: Iterable,
                  desc: str = "calibrating", max_batches: int | None = None, progress: bool = True) -> None:
    """Run every batch through `gm`, calling taps[node.name](value) on each tapped node's output."""
    interpreter = _Tap(gm, taps)
    total = None
    if hasattr(loader, "__len__"):
        total = len(loader) if max_batches is None else min(len(loader), max_batches)
    with torch.no_grad():
        for images in tqdm(batches(loader, max_batches), desc=desc, total=total, disable=not progress, leave=False):
            interpreter.run(images)


def collect(gm: fx.GraphModule, node_names: Iterable[str], loader: Iterable, max_batches: int | None = None,
            progress: bool = True) -> dict[str, torch.Tensor]:
    """Outputs of the named nodes over the loader, concatenated along the batch dimension."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in node_names}
    taps = {name: store[name].append for name in store}
    run_with_taps(gm, taps, loader, desc="collecting", max_batches=max_batches, progress=progress)
    return {name: torch.cat(values) for name, values in store.items() if values}
