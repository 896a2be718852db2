"""PTQ4ViT (Yuan et al., 2022): twin uniform quantization and a Hessian-guided scale search.

Symmetric uniform quantization everywhere (conv weights per output channel, linear weights and activations per
tensor, as the reference configuration), with scales searched alternately for weights and activations against
the Hessian-guided output error (the same objective and gradients as Q-HyViT; grid [alpha, beta] = [0, 1.2],
n = 100, a zero factor left out). Two kinds of activation get twin uniform quantizers (two ranges of b-1 bits):
  post-softmax (attention probabilities into a matmul): R2 = [0, 1] with Δ_R2 = 1/(2^(b-1)-1) fixed and
    Δ_R1 = Δ_R2 / 2^k, k searched in 0..19 (the power-of-two relation the paper requires);
  post-GELU (the input of a linear fed by GELU, or SiLU, the GELU of MobileViT's MLPs): R1 covers the negative
    tail, Δ_R1 = |min| / 2^(b-1) fixed; Δ_R2 = factor × max / (2^(b-1)-1) searched on the grid.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

from hyfx.graph import HybridGraph
from hyfx.meta import TAGS
from hyfx.ops import ACT, CONV, LINEAR, RESHAPE, SOFTMAX, source_through
from hyfx.quant.spec import QuantPlan, QuantSpec
from hyfx.recipes.registry import register
from hyfx.search.candidates import HessianObjective, TwinCandidates, UniformCandidates
from hyfx.search.layerwise import prepare_search, run_search
from hyfx.search.problems import Side, uniform_spec

SOFTMAX_SPLITS = 20
GELU_LIKE = ("gelu", "silu")


def _passes_values(node: fx.Node) -> bool:
    """Reshapes and (inference-time) dropout hand their input on unchanged."""
    return node.meta.get(TAGS, {}).get("kind") == RESHAPE or "dropout" in str(node.target)


def producer(node: fx.Node, index: int) -> fx.Node | None:
    """The node that computes input `index` of `node`, looking through reshapes and dropout."""
    src = node.args[index] if index < len(node.args) else None
    if not isinstance(src, fx.Node):
        return None
    found = source_through(src, _passes_values)
    return None if _passes_values(found) else found


def softmax_producer(node: fx.Node, index: int) -> fx.Node | None:
    """The softmax that computes input `index` of `node` (through reshapes and dropout), or None."""
    src = producer(node, index)
    return src if src is not None and src.meta.get(TAGS, {}).get("kind") == SOFTMAX else None


def _twin_kind(node: fx.Node, index: int) -> str | None:
    src = producer(node, index)
    info = src.meta.get(TAGS, {}) if src is not None else {}
    if info.get("kind") == SOFTMAX:
        return "softmax"
    if info.get("kind") == ACT and info.get("sub") in GELU_LIKE and node.meta[TAGS]["kind"] == LINEAR:
        return "gelu"
    return None


def twin_softmax_candidates(bits: int) -> TwinCandidates:
    m = 2 ** (bits - 1) - 1
    ks = torch.arange(SOFTMAX_SPLITS, dtype=torch.float32)
    delta2 = torch.full_like(ks, 1.0 / m)
    return TwinCandidates(QuantSpec(bits=bits, kind="twin", scheme="asymmetric"),
                          torch.stack((delta2 / 2**ks, delta2), 1), 2.0 ** -ks)


def twin_gelu_candidates(bits: int, lo: float, hi: float, factors: torch.Tensor) -> TwinCandidates:
    m = 2 ** (bits - 1) - 1
    delta1 = torch.full_like(factors, max(-lo, 0.0) / (m + 1))
    delta2 = factors * max(hi, 0.0) / m
    return TwinCandidates(QuantSpec(bits=bits, kind="twin", scheme="symmetric"), torch.stack((delta1, delta2), 1),
                          factors)


@register("ptq4vit")
def ptq4vit(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
            alpha: float = 0.0, beta: float = 1.2, n: int = 100, rounds: int = 3, samples: int = 256, twin: bool = True,
            coarse: int | None = 12, seed: int = 0, max_batches: int | None = None, progress: bool = True) -> QuantPlan:
    hg, images, factors = prepare_search(gm, calib_loader, w_bits, a_bits, alpha, beta, n, max_batches)
    twins: dict[str, str] = {}

    def options(layer: str, node: fx.Node, side_name: str, side: Side) -> list:
        if side_name == "weight":
            gran = "channel" if node.meta[TAGS]["kind"] == CONV else "tensor"
            return [UniformCandidates(uniform_spec(w_bits, gran, "symmetric", 0), side.lo, side.hi, factors)]
        index = int(side_name[5:])
        kind = _twin_kind(node, index) if twin else None
        if kind is not None:
            twins[f"{layer}.input{index}"] = kind
            if kind == "softmax":
                return [twin_softmax_candidates(a_bits)]
            return [twin_gelu_candidates(a_bits, float(side.lo.min()), float(side.hi.max()), factors)]
        return [UniformCandidates(uniform_spec(a_bits, "tensor", "symmetric", 0), side.lo, side.hi, factors)]

    result = run_search(hg, images, options, HessianObjective(), hessian=True, rounds=rounds, samples=samples,
                        bridges=False, norms=False, seed=seed, coarse=coarse, progress=progress)
    plan = QuantPlan(recipe="ptq4vit", layers=result.policies, meta={
        "w_bits": w_bits, "a_bits": a_bits, "alpha": alpha, "beta": beta, "n": n, "twin": dict(sorted(twins.items())),
        "calibration": {"n_images": sum(len(x) for x in images)}, **result.meta})
    return plan
