"""hyfx: post-training quantization for CNN–Transformer hybrid vision models."""

from __future__ import annotations

import torch.fx as fx

from hyfx import recipes
from hyfx.capture import capture
from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analyze
from hyfx.passes.insert_quant import insert_quant
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec, load_plan, save_plan

__version__ = "0.1.0"


def quantize(gm: fx.GraphModule | HybridGraph, plan: QuantPlan) -> fx.GraphModule:
    """The quantized model: `gm` analysed (attention decomposed, tagged) with the plan's quantizers inserted."""
    hg = gm if isinstance(gm, HybridGraph) else analyze(gm)
    return insert_quant(hg.gm, plan)


__all__ = ["HybridGraph", "HyfxError", "LayerPolicy", "QuantPlan", "QuantSpec", "analyze", "capture", "load_plan",
           "quantize", "recipes", "save_plan"]
