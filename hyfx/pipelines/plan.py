"""Recipe, then refiners: the plan `hyfx quantize`, the benchmarks and the torch.compile backend all make."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch.fx as fx

from hyfx import recipes, refine
from hyfx.graph import HybridGraph, split_threshold
from hyfx.quant.spec import QuantPlan


def make_plan(name: str, gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, bias_correction: bool = False,
              rounding_iters: int = 0, activation_steps: int = 0, block_iters: int = 0, **options) -> QuantPlan:
    """The plan of recipe `name` (its `options` passed on), refined as `hyfx.refine.refine` says; records the
    outlier split the graph was analysed with and the seconds it took (recipe and refiners)."""
    start = time.perf_counter()
    refine.check_options(rounding_iters, block_iters)
    plan = recipes.get(name)(gm, calib_loader, **options)
    if isinstance(gm, HybridGraph) and (threshold := split_threshold(gm)) is not None:
        plan.meta["split_outliers"] = threshold  # whoever applies the plan must split the same way
    plan = refine.refine(gm, plan, calib_loader, bias_correction=bias_correction, rounding_iters=rounding_iters,
                         activation_steps=activation_steps, block_iters=block_iters,
                         progress=options.get("progress", True))
    plan.meta["plan_seconds"] = round(time.perf_counter() - start, 2)
    return plan
