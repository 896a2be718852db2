"""`hyfx.backend(...)`: the torch.compile backend whose plans come from `make_plan` (recipe + refiners)."""

from __future__ import annotations

from collections.abc import Iterable

from hyfx import recipes
from hyfx.backends.compile import HyfxBackend
from hyfx.graph import HybridGraph
from hyfx.pipelines.plan import make_plan
from hyfx.quant.spec import QuantPlan


def backend(recipe: str = "minmax", calib: Iterable | None = None, plan: QuantPlan | None = None,
            **options) -> HyfxBackend:
    """A torch.compile backend that runs the model quantized by `recipe` (calibrated on `calib`) or by `plan`.

    `calib` is a loader of (images, labels) or of image batches; without it the example batch dynamo traced
    with is the calibration set (enough to run, too little for good ranges). `options` go to `make_plan`
    (the recipe's options and the refiners').
    """
    if plan is not None:
        return HyfxBackend(lambda hg, example: plan, plan)
    recipes.get(recipe)  # an unknown recipe fails at backend creation, not inside dynamo
    options = {"progress": False, **options}

    def plan_for(hg: HybridGraph, example: list) -> QuantPlan:
        return make_plan(recipe, hg, calib if calib is not None else example, **options)

    return HyfxBackend(plan_for)
