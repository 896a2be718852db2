"""Run calibration batches through a graph, feeding chosen node outputs to observers or collectors."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from tqdm import tqdm

from hyfx.meta import TAGS
from hyfx.quant.observers import make_observer, spec_from_range
from hyfx.quant.spec import QuantPlan


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


def calibrate_activations(gm: fx.GraphModule, plan: QuantPlan, loader: Iterable, observer: str = "minmax",
                          max_batches: int | None = None, progress: bool = True) -> QuantPlan:
    """Fill every uncalibrated activation spec from ranges observed on the float graph `gm` (analysed: its nodes
    carry the tags whose names the plan uses; pass a HybridGraph's `.gm`)."""
    nodes = {n.meta[TAGS]["name"]: n for n in gm.graph.nodes if TAGS in n.meta}
    observers: dict[str, object] = {}  # producer node name → observer
    wanted: list[tuple[str, str, int | None, str]] = []  # (layer, role, input index, producer)
    for layer, policy in plan.layers.items():
        node = nodes[layer]
        for idx, spec in policy.inputs.items():
            if not spec.calibrated:
                producer = node.args[idx].name
                observers.setdefault(f"{producer}/{spec.kind}", make_observer(spec, observer))
                wanted.append((layer, "input", idx, f"{producer}/{spec.kind}"))
        if policy.output is not None and not policy.output.calibrated:
            observers.setdefault(f"{node.name}/{policy.output.kind}", make_observer(policy.output, observer))
            wanted.append((layer, "output", None, f"{node.name}/{policy.output.kind}"))
    if not wanted:
        return plan
    taps: dict[str, list] = {}
    for key, obs in observers.items():
        taps.setdefault(key.split("/")[0], []).append(obs.update)
    run_with_taps(gm, {name: fan_out(fns) for name, fns in taps.items()}, loader, max_batches=max_batches,
                  progress=progress)
    for layer, role, idx, key in wanted:
        lo, hi = observers[key].range()
        policy = plan.layers[layer]
        if role == "input":
            policy.inputs[idx] = spec_from_range(policy.inputs[idx], lo, hi)
        else:
            policy.output = spec_from_range(policy.output, lo, hi)
    plan.meta.setdefault("calibration", {})["observer"] = observer
    return plan


def fan_out(fns):
    """One tap that calls every function in `fns` on the value (several observers on one node)."""
    def call(value):
        for fn in fns:
            fn(value)

    return call
