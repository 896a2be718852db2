"""HySquant (the recipe): per-layer bit-widths under hardware budgets, from the calibration images alone.

The engine (sensitivity table, cost model, ILP, measured feedback, Pareto fronts) is `hyfx.mixed`; `hyfx search`
drives it with labelled images and a validation set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch.fx as fx

from hyfx.graph import HybridGraph
from hyfx.hardware import DEFAULT_CONFIGS, BitConfig
from hyfx.mixed import Budget, run_hysquant
from hyfx.quant.spec import QuantPlan
from hyfx.recipes.registry import register


@register("hysquant")
def hysquant(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
             budgets: Sequence[Budget | str] = ("bytes=0.75x",), configs: Sequence[BitConfig] | None = None,
             device: str = "cpu", max_iter: int = 5, progress: bool = True, **options) -> QuantPlan:
    """Recipe form: mixed W/A bits (at most w_bits / a_bits) under `budgets`, from the calibration images alone.

    Without labelled images the table holds KL only and accuracy budgets are unavailable; `hyfx search`
    (or run_hysquant) adds top-1 figures and a validation set.
    """
    configs = [c for c in (configs or DEFAULT_CONFIGS) if c.w_bits <= w_bits and c.a_bits <= a_bits]
    if not configs:
        configs = [BitConfig(w_bits, a_bits)]
    return run_hysquant(gm, calib_loader, budgets, configs=configs, device=device, max_iter=max_iter,
                        progress=progress, **options).plan
