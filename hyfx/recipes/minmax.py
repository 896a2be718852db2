"""Min-max W{b}A{b} uniform quantization of every conv, linear and matmul: the first baseline."""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from hyfx.graph import HybridGraph, analysed
from hyfx.ops import CONV, LINEAR, MATMUL, NORM, SOFTMAX
from hyfx.quant.calibrate import calibrate_activations
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec, check_bits
from hyfx.recipes.registry import register


@register("minmax")
def minmax(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
           weight_granularity: str = "channel", observer: str = "minmax", max_batches: int | None = None,
           full: bool = False, progress: bool = True) -> QuantPlan:
    """Symmetric weights (per channel by default) and asymmetric per-tensor inputs, ranges from min-max.

    `full=True` also quantizes the inputs of softmax and of every norm (the full-quantization baseline).
    """
    check_bits(w_bits)
    check_bits(a_bits)
    hg = analysed(gm)
    plan = QuantPlan(recipe="percentile" if observer == "percentile" else "minmax",
                     meta={"w_bits": w_bits, "a_bits": a_bits, "full": full})
    weight = QuantSpec(bits=w_bits, granularity=weight_granularity, scheme="symmetric")
    act = QuantSpec(bits=a_bits, granularity="tensor", scheme="asymmetric")
    for layer in hg.layers((CONV, LINEAR, MATMUL)):
        kind = hg.tags(layer)["kind"]
        if kind == MATMUL:
            plan.set(layer, LayerPolicy(inputs={0: act, 1: act}))
        else:
            plan.set(layer, LayerPolicy(weight=weight, inputs={0: act}))
    if full:
        for layer in hg.layers((NORM, SOFTMAX)):
            plan.set(layer, LayerPolicy(inputs={0: act}))
    return calibrate_activations(hg.gm, plan, calib_loader, observer=observer, max_batches=max_batches,
                                 progress=progress)


@register("percentile")
def percentile(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
               **options) -> QuantPlan:
    """As minmax, with activation ranges clipped to the 0.01 / 99.99 percentiles."""
    return minmax(gm, calib_loader, w_bits, a_bits, observer="percentile", **options)
