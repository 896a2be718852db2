"""Recipes: each method of the papers as `analysed graph + calibration data → QuantPlan`, one file each.

A method registers itself with `@register(name, targets=..., options=...)`; importing this package imports every
method module, so `get(name)` / `available()` see them all. Refining a plan (bias correction, AdaRound, ...) is
`hyfx.refine`; recipe + refiners is `hyfx.pipelines.make_plan`.
"""

from __future__ import annotations

from hyfx.recipes.easyquant import easyquant
from hyfx.recipes.efficientquant import efficientquant
from hyfx.recipes.hyq import hyq
from hyfx.recipes.hysquant import hysquant
from hyfx.recipes.minmax import minmax, percentile
from hyfx.recipes.ptq4vit import ptq4vit
from hyfx.recipes.qhyvit import qhyvit
from hyfx.recipes.registry import Recipe, available, get, register
from hyfx.recipes.repqvit import repqvit

__all__ = ["Recipe", "available", "easyquant", "efficientquant", "get", "hyq", "hysquant", "minmax", "percentile", "ptq4vit",
           "qhyvit", "register", "repqvit"]
