"""EfficientQuant (Saha & Xu, 2025): structure-aware PTQ for CNN–Transformer hybrids.

Following the paper's Algorithm 1, layers are split by type (Conv2d → CNN; attention → Transformer):
convolutions get uniform 8-bit asymmetric min-max weights (weight-only), and the post-softmax
activations of the attention get log2 quantization with ε = 1e-5:
    A = log2(x + ε),  Δ_log = (A_max − A_min)/(2^b − 1),  Z_a = round(−A_min/Δ_log),
    q = clamp(round(A/Δ_log) + Z_a, 0, 2^b − 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from hyfx.graph import HybridGraph, analysed
from hyfx.ops import CONV, LINEAR, SOFTMAX
from hyfx.quant.calibrate import calibrate_activations
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec, check_bits
from hyfx.recipes.registry import register


@register("efficientquant")
def efficientquant(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
                   eps: float = 1e-5, weight_granularity: str = "tensor", transformer_weights: bool = False,
                   max_batches: int | None = None, progress: bool = True) -> QuantPlan:
    """Uniform asymmetric min-max conv weights; log2 post-softmax activations.

    `transformer_weights=True` also quantizes the Linear weights of Transformer blocks (uniform, same bits),
    which the paper leaves to the log2 treatment of the attention only.
    """
    check_bits(w_bits)
    check_bits(a_bits)
    hg = analysed(gm)
    plan = QuantPlan(recipe="efficientquant", meta={"w_bits": w_bits, "a_bits": a_bits, "eps": eps,
                                                    "transformer_weights": transformer_weights})
    weight = QuantSpec(bits=w_bits, granularity=weight_granularity, scheme="asymmetric")
    for layer in hg.layers((CONV,)):
        plan.set(layer, LayerPolicy(weight=weight))
    if transformer_weights:
        for layer in hg.layers((LINEAR,)):
            if hg.tags(layer)["region"] == "transformer":
                plan.set(layer, LayerPolicy(weight=weight))
    softmax = QuantSpec(bits=a_bits, kind="log2", eps=eps, scheme="asymmetric")
    for layer in hg.layers((SOFTMAX,)):
        plan.set(layer, LayerPolicy(output=softmax))
    return calibrate_activations(hg.gm, plan, calib_loader, max_batches=max_batches, progress=progress)
