"""Recipes: each method of the papers as `analysed graph + calibration data → QuantPlan`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, split_threshold
from hyfx.quant.spec import QuantPlan
from hyfx.recipes.activation_scales import learn_activation_scales
from hyfx.recipes.adaround import adaround
from hyfx.recipes.bias_correction import correct_bias
from hyfx.recipes.block_reconstruction import reconstruct_blocks
from hyfx.recipes.easyquant import easyquant
from hyfx.recipes.efficientquant import efficientquant
from hyfx.recipes.hysquant import hysquant
from hyfx.recipes.minmax import minmax, percentile
from hyfx.recipes.ptq4vit import ptq4vit
from hyfx.recipes.qhyvit import qhyvit

RECIPES: dict[str, Callable] = {
    "easyquant": easyquant,
    "efficientquant": efficientquant,
    "hysquant": hysquant,
    "minmax": minmax,
    "percentile": percentile,
    "ptq4vit": ptq4vit,
    "qhyvit": qhyvit,
}


def get_recipe(name: str) -> Callable:
    if name not in RECIPES:
        raise HyfxError(f"unknown recipe {name!r}: choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def make_plan(name: str, gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, bias_correction: bool = False,
              rounding_iters: int = 0, activation_steps: int = 0, block_iters: int = 0, **options) -> QuantPlan:
    """The plan of recipe `name` (its `options` passed on), then, when asked, its activation scales learned end to
    end (`activation_steps` steps), its weights' rounding and activation scales reconstructed block by block
    (BRECQ + QDrop, `block_iters` steps per block) or its weights' rounding learned layer by layer (AdaRound,
    `rounding_iters` steps per layer, for the activations in force), and its bias corrected (measured for the
    rounding in force)."""
    if rounding_iters and block_iters:
        raise HyfxError("AdaRound and block reconstruction both learn the weights' rounding: ask for one of them")
    plan = get_recipe(name)(gm, calib_loader, **options)
    if isinstance(gm, HybridGraph) and (threshold := split_threshold(gm)) is not None:
        plan.meta["split_outliers"] = threshold  # whoever applies the plan must split the same way
    progress = options.get("progress", True)
    if activation_steps:
        plan = learn_activation_scales(gm, plan, calib_loader, steps=activation_steps, progress=progress)
    if block_iters:
        plan = reconstruct_blocks(gm, plan, calib_loader, iters=block_iters, progress=progress)
    if rounding_iters:
        plan = adaround(gm, plan, calib_loader, iters=rounding_iters, progress=progress)
    return correct_bias(gm, plan, calib_loader) if bias_correction else plan


__all__ = ["RECIPES", "adaround", "correct_bias", "easyquant", "efficientquant", "get_recipe", "hysquant",
           "learn_activation_scales", "make_plan", "minmax", "percentile", "ptq4vit", "qhyvit", "reconstruct_blocks"]
