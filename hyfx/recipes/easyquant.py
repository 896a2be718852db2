"""EasyQuant (Wu et al., 2020): per-layer scale search maximising the cosine similarity of the layer output.

Symmetric quantization: weights per output channel (each channel's scale maximises the cosine similarity of
that channel's output), activations per tensor; weights and activations are searched alternately. Scales are
factor × min-max scale with the factor on a linear grid [alpha, beta] = [0.5, 1.2], n = 100 (the setting of
Q-HyViT's appendix).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from hyfx.graph import HybridGraph
from hyfx.meta import TAGS
from hyfx.ops import CONV, LINEAR
from hyfx.quant.spec import QuantPlan
from hyfx.recipes.registry import register
from hyfx.search.candidates import CosineObjective, UniformCandidates
from hyfx.search.layerwise import prepare_search, run_search
from hyfx.search.problems import Side, uniform_spec


@register("easyquant")
def easyquant(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
              alpha: float = 0.5, beta: float = 1.2, n: int = 100, rounds: int = 3, samples: int = 256,
              act_scheme: str = "symmetric", coarse: int | None = 12, seed: int = 0, max_batches: int | None = None,
              progress: bool = True) -> QuantPlan:
    hg, images, factors = prepare_search(gm, calib_loader, w_bits, a_bits, alpha, beta, n, max_batches)

    def options(layer: str, node: fx.Node, side_name: str, side: Side) -> list:
        if side_name == "weight":
            if node.meta[TAGS]["kind"] not in (CONV, LINEAR):
                return []
            return [UniformCandidates(uniform_spec(w_bits, "channel", "symmetric", 0), side.lo, side.hi, factors)]
        return [UniformCandidates(uniform_spec(a_bits, "tensor", act_scheme, 0), side.lo, side.hi, factors)]

    result = run_search(hg, images, options, CosineObjective(), hessian=False, rounds=rounds, samples=samples,
                        bridges=False, norms=False, seed=seed, coarse=coarse, progress=progress)
    plan = QuantPlan(recipe="easyquant", layers=result.policies, meta={
        "w_bits": w_bits, "a_bits": a_bits, "alpha": alpha, "beta": beta, "n": n, "act_scheme": act_scheme,
        "calibration": {"n_images": sum(len(x) for x in images)}, **result.meta})
    return plan
