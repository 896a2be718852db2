"""Q-HyViT (Lee et al., 2023/2024): hybrid reconstruction with bridge-block-aware scale, granularity and scheme search.

Per layer, the objective is the Hessian-guided output error E[ΔOᵀ diag((∂L/∂O)²) ΔO] (PTQ4ViT's metric, with the
gradients of one backward pass per calibration batch on the FP32 graph; see sampling.py for the loss). Inside a
bridge block (the convs that feed a transformer) the output is the whole bridge block's, with the block's
earlier layers already quantized. Each weight and each activation input of a conv / linear / matmul searches
  scale:       factor × min-max scale, factor on a linear grid [alpha, beta] of n points,
  granularity: per channel or per tensor (layer),
  scheme:      symmetric (signed, zero point 0) or asymmetric (unsigned, zero point),
weights and activations alternating for `rounds` rounds. The target restricts the space: TensorRT has no
zero point (symmetric int8, per-tensor activations), ONNX Runtime takes asymmetric uint8 activations per tensor
and symmetric per-channel weights, searched at the weight bits its CPU kernels run here (7 without VNNI except
depthwise convs and transformer / bridge layers: see hyfx.quant.targets), so the int8 lowering runs the
searched weights as they are.
`full=True` also quantizes the inputs of softmax, LayerNorm, GroupNorm and BatchNorm (full quantization).
`edge_bits` gives the first and last weighted layers (stem conv, classifier: HybridGraph.edge_layers) that many
bits for their weights and inputs, the convention of the low-bit PTQ literature (BRECQ, QDrop, PD-Quant keep
them at 8 bits); the default quantizes them like every other layer. The plan records the layers it applied to.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from hyfx.graph import HybridGraph
from hyfx.ops import MATMUL, is_depthwise
from hyfx.quant.spec import QuantPlan
from hyfx.quant.targets import GRANULARITIES, SCHEMES, Target, check_bits_for_target, get_target
from hyfx.recipes.registry import register
from hyfx.search.candidates import HessianObjective, UniformCandidates
from hyfx.search.layerwise import prepare_search, run_search
from hyfx.search.problems import Side, uniform_spec


def search_space(w_bits: int, a_bits: int, rules: Target, search_granularity: bool = True,
                 search_scheme: bool = True) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """(granularities, schemes) for weights and activations; the simplest first, so ties keep it.

    Without the granularity search, weights are per channel and activations per tensor; without the scheme
    search, both are symmetric (Q-HyViT's ablation baseline: scale search only).
    """
    w_gran = GRANULARITIES if search_granularity else ("channel",)
    a_gran = GRANULARITIES if search_granularity else ("tensor",)
    schemes = SCHEMES if search_scheme else ("symmetric",)
    space = {
        "weight": (tuple(g for g in w_gran if g in rules.weight_granularities),
                   tuple(s for s in schemes if s in rules.weight_schemes)),
        "input": (tuple(g for g in a_gran if g in rules.act_granularities),
                  tuple(s for s in schemes if s in rules.act_schemes)),
    }
    if rules.name == "ort":  # the CPU lowering runs s8 weights (u8s8 kernels); it would redo asymmetric ones
        space["weight"] = (space["weight"][0], ("symmetric",))
    for role, (grans, schemes_) in space.items():
        if not grans or not schemes_:  # a restricted target leaves its one allowed choice
            allowed = rules.weight_granularities if role == "weight" else rules.act_granularities
            allowed_s = rules.weight_schemes if role == "weight" else rules.act_schemes
            space[role] = (grans or allowed[:1], schemes_ or allowed_s[:1])
    return space


@register("qhyvit", targets=None, options=("edge_bits",))
def qhyvit(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
           target: str = "fake", full: bool = False, alpha: float = 0.01, beta: float = 1.2, n: int = 100,
           rounds: int = 3, samples: int = 256, search_granularity: bool = True, search_scheme: bool = True,
           bridge: bool = True, coarse: int | None = 12, edge_bits: int | None = None, seed: int = 0,
           max_batches: int | None = None, progress: bool = True) -> QuantPlan:
    """Q-HyViT plan for `target` ("fake", "ort" or "tensorrt"); `samples` rows per layer feed the search."""
    hg, images, factors = prepare_search(gm, calib_loader, w_bits, a_bits, alpha, beta, n, max_batches, target)
    rules = get_target(target)
    space = search_space(w_bits, a_bits, rules, search_granularity, search_scheme)

    exact = set(hg.exact_weight_layers()) if rules.cpu_weight_bits else set()
    edges: set[str] = set()
    if edge_bits is not None:
        check_bits_for_target(target, edge_bits, edge_bits)
        edges = set(hg.edge_layers())

    def weight_bits_for(exact: bool, bits: int = w_bits) -> int:  # the bits the target's kernels run
        return rules.weight_bits(bits, exact)

    def options(layer: str, node: fx.Node, side_name: str, side: Side) -> list:
        role = "weight" if side_name == "weight" else "input"
        grans, schemes = space[role]
        if role == "input" and rules.zero_point_free_matmul and float(side.lo.min()) < 0 \
                and hg.tags(layer)["kind"] == MATMUL:
            schemes = ("symmetric",)
        if side.axis is None or side.channels < 2:
            grans = ("tensor",)
        bits = edge_bits if layer in edges else (w_bits if role == "weight" else a_bits)
        if role == "weight":
            bits = weight_bits_for(layer in exact or is_depthwise(node, hg.gm), bits)
        return [UniformCandidates(uniform_spec(bits, g, s, side.graph_axis), side.lo, side.hi, factors)
                for g in grans for s in schemes if role != "weight" or rules.allows_weight(g, s)]

    result = run_search(hg, images, options, HessianObjective(), hessian=True, rounds=rounds, samples=samples,
                        bridges=bridge, norms=full, seed=seed, coarse=coarse, progress=progress)
    plan = QuantPlan(recipe="qhyvit", layers=result.policies, target=target, meta={
        "w_bits": w_bits, "a_bits": a_bits, "full": full, "alpha": alpha, "beta": beta, "n": n,
        "searched_weight_bits": {"gemm": weight_bits_for(False), "depthwise and exact": weight_bits_for(True)},
        "search_granularity": search_granularity, "search_scheme": search_scheme, "bridge": bridge,
        "edge_bits": edge_bits, "edge_layers": sorted(edges),
        "space": {role: {"granularity": list(g), "scheme": list(s)} for role, (g, s) in space.items()},
        "calibration": {"n_images": sum(len(x) for x in images)},
        "hessian_loss": "cross-entropy against the FP32 top-1 (empirical Fisher; see hyfx.search.sampling)",
        **result.meta})
    return plan
