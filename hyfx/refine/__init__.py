"""Refiners: plan → plan steps that run after any recipe, each measuring on the calibration images.

`hyfx.refine(gm, plan, calib, ...)` composes them in their one sensible order (activation scales, then the
weights' rounding by blocks or by layers, then the bias for the rounding in force); each is also callable alone.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable

import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph
from hyfx.quant.spec import QuantPlan
from hyfx.refine.activation_scales import learn_activation_scales
from hyfx.refine.adaround import adaround
from hyfx.refine.bias_correction import correct_bias
from hyfx.refine.block_reconstruction import reconstruct_blocks


def check_options(rounding_iters: int = 0, block_iters: int = 0) -> None:
    """Refuse combinations no refinement order makes sense of, before any work is done."""
    if rounding_iters and block_iters:
        raise HyfxError("AdaRound and block reconstruction both learn the weights' rounding: ask for one of them")


def refine(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, calib_loader: Iterable, bias_correction: bool = False,
           rounding_iters: int = 0, activation_steps: int = 0, block_iters: int = 0,
           progress: bool = True) -> QuantPlan:
    """`plan` with, when asked, its activation scales learned end to end (`activation_steps` steps), its weights'
    rounding and activation scales reconstructed block by block (BRECQ + QDrop, `block_iters` steps per block) or
    its weights' rounding learned layer by layer (AdaRound, `rounding_iters` steps per layer, for the activations
    in force), and its bias corrected (measured for the rounding in force)."""
    check_options(rounding_iters, block_iters)
    if activation_steps:
        plan = learn_activation_scales(gm, plan, calib_loader, steps=activation_steps, progress=progress)
    if block_iters:
        plan = reconstruct_blocks(gm, plan, calib_loader, iters=block_iters, progress=progress)
    if rounding_iters:
        plan = adaround(gm, plan, calib_loader, iters=rounding_iters, progress=progress)
    return correct_bias(gm, plan, calib_loader) if bias_correction else plan


class _CallableModule(types.ModuleType):
    """`hyfx.refine(...)` composes, `hyfx.refine.adaround(...)` and the others run one refiner."""

    def __call__(self, *args, **kwargs) -> QuantPlan:
        return refine(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["adaround", "check_options", "correct_bias", "learn_activation_scales", "reconstruct_blocks", "refine"]
