"""The recipe registry: a method becomes `--recipe NAME` by decorating it, with no other file to edit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.fx as fx

from hyfx.graph import HybridGraph
from hyfx.quant.spec import QuantPlan
from hyfx.registry import Registry

RecipeFn = Callable[..., QuantPlan]  # (graph or HybridGraph, calibration loader, **options) → QuantPlan


@dataclass(frozen=True)
class Recipe:
    """A registered method. `targets`: the targets whose rules it searches within, receiving `target=NAME` (None:
    every registered target); for any other target its plan is made unrestricted and then checked. `options`: the
    recipe-specific options the CLI may hand it (e.g. "edge_bits")."""

    name: str
    fn: RecipeFn
    targets: tuple[str, ...] | None = ()
    options: tuple[str, ...] = ()
    summary: str = ""

    def searches(self, target: str) -> bool:
        """Whether the recipe restricts its own search to `target` (else its plan is only checked against it)."""
        return self.targets is None or target in self.targets

    def __call__(self, gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, **options) -> QuantPlan:
        return self.fn(gm, calib_loader, **options)


RECIPES: Registry[Recipe] = Registry("recipe")


def register(name: str, targets: Iterable[str] | None = (), options: Iterable[str] = ()) -> Callable[[RecipeFn], RecipeFn]:
    """Decorator: make the function a recipe called `name` (see `Recipe` for `targets` and `options`)."""

    def add(fn: RecipeFn) -> RecipeFn:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        RECIPES.add(name, Recipe(name, fn, None if targets is None else tuple(targets), tuple(options), summary))
        return fn

    return add


def get(name: str) -> Recipe:
    return RECIPES.get(name)


def available() -> list[str]:
    return sorted(RECIPES)
