"""The layer-by-layer reconstruction search the Hessian / cosine recipes share.

One calibration pass caches samples for every layer (sampling.py); then each layer, in graph order, gets a
problem (problems.py) and an alternating search over its sides (search.py). A recipe says only which
candidate quantizers each side may use (`options`), which objective scores them, and whether bridge blocks
and norm / softmax inputs take part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tqdm import tqdm

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analysed
from hyfx.meta import TAGS
from hyfx.ops import CONV, LINEAR, MATMUL, NORM, SOFTMAX, weight_arg
from hyfx.quant.spec import LayerPolicy, check_bits
from hyfx.quant.targets import check_bits_for_target
from hyfx.search.candidates import Choice, alternate, grid
from hyfx.search.problems import (
    Chain,
    ChainProblem,
    ConvLinearProblem,
    MatmulProblem,
    RowsProblem,
    Side,
    chain_input,
    chain_nodes,
)
from hyfx.search.sampling import Request, Samples, calibration_images, sample_layers

aten = torch.ops.aten
NORM_SUBS = ("softmax", "layer_norm", "batch_norm", "group_norm")

# options(layer name, layer node, side name, side) -> candidate sets for that side (empty: leave it float)
Options = Callable[[str, fx.Node, str, Side], list]


@dataclass
class SearchResult:
    policies: dict[str, LayerPolicy]
    meta: dict = field(default_factory=dict)


def _kind(hg: HybridGraph, layer: str) -> str | None:
    """The request kind for a layer, or None when the search does not handle it."""
    node = hg.node(layer)
    info = node.meta[TAGS]
    if info["kind"] == CONV:
        ok = node.target in (aten.conv2d.default, aten.convolution.default) and weight_arg(node) is not None
        return "conv" if ok else None
    if info["kind"] == LINEAR:
        return "linear" if weight_arg(node) is not None else None
    if info["kind"] == MATMUL:
        return "matmul" if sum(isinstance(a, fx.Node) for a in node.args) == 2 else None
    if info["kind"] in (NORM, SOFTMAX) and info["sub"] in NORM_SUBS and isinstance(node.args[0], fx.Node):
        return "images" if info["sub"] == "group_norm" else "rows"
    return None


def _bridge_chains(hg: HybridGraph) -> dict[str, tuple[Chain, list[str]]]:
    """Bridge layer → (chain over its bridge block, the block's bridge layers), for blocks the search can run."""
    out = {}
    for bridge in hg.bridges:
        nodes = [hg.node(layer) for layer in bridge.layers]
        chain = chain_nodes(nodes[0], nodes[-1])
        if chain is None or len(nodes) < 2:
            continue
        for layer in bridge.layers:
            out[layer] = (Chain(hg.gm, chain), bridge.layers)
    return out


def prepare_search(gm: fx.GraphModule | HybridGraph, calib_loader, w_bits: int, a_bits: int, alpha: float,
                   beta: float, n: int, max_batches: int | None, target: str = "fake"
                   ) -> tuple[HybridGraph, list[torch.Tensor], torch.Tensor]:
    """What every reconstruction recipe starts from: bit-widths checked (for `target` too), the analysed graph,
    the calibration images and the scale-factor grid."""
    check_bits(w_bits)
    check_bits(a_bits)
    check_bits_for_target(target, w_bits, a_bits)
    return analysed(gm), calibration_images(calib_loader, max_batches), grid(alpha, beta, n)


@torch.no_grad()
def run_search(hg: HybridGraph, images: list[torch.Tensor], options: Options, objective, hessian: bool,
               rounds: int = 3, samples: int = 256, bridges: bool = True, norms: bool = False, seed: int = 0,
               coarse: int | None = 12, progress: bool = True) -> SearchResult:
    """Search every conv / linear / matmul (and, with `norms`, softmax and norm inputs) of `hg`.

    `coarse`: grid points scored per option before refining around the best (None: score every candidate).
    """
    kinds = (CONV, LINEAR, MATMUL) + ((NORM, SOFTMAX) if norms else ())
    layers, skipped = [], []
    for layer in hg.layers(kinds):
        (layers if _kind(hg, layer) else skipped).append(layer)
    chains = _bridge_chains(hg) if bridges else {}
    requests = [Request(layer, hg.node(layer), _kind(hg, layer)) for layer in layers]
    for layer, (chain, members) in chains.items():
        if layer == members[0]:
            requests.append(Request(layer, chain.nodes[0], "conv", objective=chain.nodes[-1], key=f"{layer}#bridge"))
    start = time.perf_counter()
    data = sample_layers(hg.gm, requests, images, samples=samples, hessian=hessian, seed=seed, progress=progress)
    sampled = time.perf_counter()
    policies: dict[str, LayerPolicy] = {}
    decided: dict[str, tuple[torch.Tensor | None, dict]] = {}  # for bridge chains: quantized weight, input specs
    bridge_inputs: dict[str, tuple[ConvLinearProblem, torch.Tensor, torch.Tensor]] = {}
    per_layer: dict[str, dict] = {}
    for layer in tqdm(layers, desc="searching scales", disable=not progress, leave=False):
        node = hg.node(layer)
        kind = _kind(hg, layer)
        layer_start = time.perf_counter()
        try:
            problem, order, separable = _problem(hg, layer, node, kind, data, chains, decided, bridge_inputs)
        except HyfxError as exc:
            skipped.append(layer)
            per_layer[layer] = {"skipped": str(exc)}
            continue
        spaces = {side: options(layer, node, side, problem.sides[side]) for side in order}
        order = [side for side in order if spaces[side]]
        if not order:
            continue
        choices = alternate(problem, spaces, order, rounds, objective, separable, coarse)
        policy = LayerPolicy(weight=choices["weight"].spec if "weight" in choices else None,
                             inputs={int(s[5:]): c.spec for s, c in sorted(choices.items()) if s.startswith("input")})
        policies[layer] = policy
        decided[layer] = (choices["weight"].value if "weight" in choices else None, dict(policy.inputs))
        if isinstance(problem, ChainProblem) and layer == chains[layer][1][0]:
            bridge_inputs[chains[layer][1][0]] = (problem.base, choices["weight"].value if "weight" in choices
                                                  else problem.sides["weight"].data,
                                                  choices["input0"].value if "input0" in choices
                                                  else problem.sides["input0"].data)
        per_layer[layer] = _describe(choices, isinstance(problem, ChainProblem))
        per_layer[layer]["seconds"] = round(time.perf_counter() - layer_start, 3)
    meta = {"objective": objective.name, "rounds": rounds, "samples_per_layer": samples, "coarse": coarse,
            "sampling_seconds": round(sampled - start, 2), "search_seconds": round(time.perf_counter() - sampled, 2),
            "bridge_objective": sorted(layer for layer, info in per_layer.items() if info.get("bridge")),
            "skipped": skipped, "layers": per_layer}
    return SearchResult(policies, meta)


def _describe(choices: dict[str, Choice], bridge: bool) -> dict:
    out: dict = {side: {"spec": c.spec.short(), "factor": round(c.factor, 4)} for side, c in choices.items()}
    out["loss"] = float(f"{min(c.loss for c in choices.values()):.6g}")
    if bridge:
        out["bridge"] = True
    return out


def _problem(hg: HybridGraph, layer: str, node: fx.Node, kind: str, data: dict[str, Samples], chains: dict,
             decided: dict, bridge_inputs: dict):
    """(problem, side order, separable sides) for one layer."""
    if kind == "matmul":
        return MatmulProblem(layer, data[layer]), ["input0", "input1"], ()
    if kind in ("rows", "images"):
        return RowsProblem(layer, node, hg.gm, data[layer]), ["input0"], ()
    if layer in chains and (layer == chains[layer][1][0] or chains[layer][1][0] in bridge_inputs):
        chain, members = chains[layer]
        first = members[0]
        block = data[f"{first}#bridge"]
        end = chain.nodes[-1]
        if layer == first:
            base = ConvLinearProblem(layer, node, hg.gm, data[layer], x=block.inputs[0])
        else:
            start_problem, start_weight, start_input = bridge_inputs[first]
            x = chain_input(chain, start_problem, start_weight, start_input, node, decided)
            base = ConvLinearProblem(layer, node, hg.gm, data[layer], x=x)
        return ChainProblem(base, chain, node, end, block), ["weight", "input0"], ()
    return ConvLinearProblem(layer, node, hg.gm, data[layer]), ["weight", "input0"], ("weight",)
