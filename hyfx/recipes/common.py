"""What every recipe shares: analysing the captured graph and calibrating activation specs."""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from hyfx.graph import HybridGraph, analyze
from hyfx.quant.calibrate import run_with_taps
from hyfx.quant.observers import make_observer, spec_from_range
from hyfx.quant.spec import QuantPlan


def analysed(gm: fx.GraphModule | HybridGraph) -> HybridGraph:
    return gm if isinstance(gm, HybridGraph) else analyze(gm)


def calibrate_activations(hg: HybridGraph, plan: QuantPlan, loader: Iterable, observer: str = "minmax",
                          max_batches: int | None = None, progress: bool = True) -> QuantPlan:
    """Fill every uncalibrated activation spec from ranges observed on the float graph."""
    observers: dict[str, object] = {}  # producer node name → observer
    wanted: list[tuple[str, str, int | None, str]] = []  # (layer, role, input index, producer)
    for layer, policy in plan.layers.items():
        node = hg.node(layer)
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
    run_with_taps(hg.gm, {name: _fan_out(fns) for name, fns in taps.items()}, loader, max_batches=max_batches,
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


def _fan_out(fns):
    def call(value):
        for fn in fns:
            fn(value)

    return call
