"""Recipes: each method of the papers as `analysed graph + calibration data → QuantPlan`."""

from __future__ import annotations

from collections.abc import Callable

from hyfx.errors import HyfxError
from hyfx.recipes.bias_correction import correct_bias
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


__all__ = ["RECIPES", "correct_bias", "easyquant", "efficientquant", "get_recipe", "hysquant", "minmax", "percentile", "ptq4vit",
           "qhyvit"]
