"""Recipes: each method of the papers as `analysed graph + calibration data → QuantPlan`."""

from __future__ import annotations

from collections.abc import Callable

from hyfx.errors import HyfxError
from hyfx.recipes.efficientquant import efficientquant
from hyfx.recipes.minmax import minmax, percentile

RECIPES: dict[str, Callable] = {
    "efficientquant": efficientquant,
    "minmax": minmax,
    "percentile": percentile,
}


def get_recipe(name: str) -> Callable:
    if name not in RECIPES:
        raise HyfxError(f"unknown recipe {name!r}: choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


__all__ = ["RECIPES", "efficientquant", "get_recipe", "minmax", "percentile"]
