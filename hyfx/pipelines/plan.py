"""Recipe, then refiners: the plan `hyfx quantize`, the benchmarks and the torch.compile backend all make."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch.fx as fx

from hyfx import recipes, refine
from hyfx.graph import HybridGraph, analyze_for, split_threshold
from hyfx.quant.spec import QuantPlan
from hyfx.quant.targets import check_bits_for_target, check_plan_target


def make_plan(name: str, gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, target: str = "fake",
              bias_correction: bool = False, rounding_iters: int = 0, activation_steps: int = 0, block_iters: int = 0,
              **options) -> QuantPlan:
    """The plan of recipe `name` for `target` (its `options` passed on), refined as `hyfx.refine.refine` says.

    A recipe that searches within `target` gets it; any other recipe's plan is checked against the target's rules
    (one-line HyfxError at the first spec it cannot run). Records the target, the outlier split the graph was
    analysed with and the seconds it took (recipe and refiners)."""
    start = time.perf_counter()
    refine.check_options(rounding_iters, block_iters)
    recipe = recipes.get(name)
    check_bits_for_target(target, options.get("w_bits", 8), options.get("a_bits", 8))
    if recipe.searches(target):
        options["target"] = target
    plan = recipe(gm, calib_loader, **options)
    if isinstance(gm, HybridGraph) and (threshold := split_threshold(gm)) is not None:
        plan.meta["split_outliers"] = threshold  # whoever applies the plan must split the same way
    gm = analyze_for(gm, plan)  # the refiners see the graph as the plan applies to it (reparameterized, if it is)
    plan = refine.refine(gm, plan, calib_loader, bias_correction=bias_correction, rounding_iters=rounding_iters,
                         activation_steps=activation_steps, block_iters=block_iters,
                         progress=options.get("progress", True))
    check_plan_target(plan, target)
    plan.meta["plan_seconds"] = round(time.perf_counter() - start, 2)
    return plan
