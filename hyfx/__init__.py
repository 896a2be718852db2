"""hyfx: post-training quantization for CNN–Transformer hybrid vision models."""

from __future__ import annotations

import torch.fx as fx

from hyfx import recipes
from hyfx.capture import capture
from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analyze, analyze_for
from hyfx.passes.insert_quant import insert_quant
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec, load_plan, save_plan

__version__ = "0.1.0"


def quantize(gm: fx.GraphModule | HybridGraph, plan: QuantPlan) -> fx.GraphModule:
    """The quantized model: `gm` analysed (attention decomposed, tagged) with the plan's quantizers inserted."""
    return insert_quant(analyze_for(gm, plan).gm, plan)


def export(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, path=None, target: str = "ort", **options):
    """Lower `gm` quantized by `plan` to ONNX QuantizeLinear/DequantizeLinear for "ort" or "tensorrt".

    See hyfx.backends.onnx_qdq.export; returns an ExportResult (model, PyTorch reference graph, report).
    """
    from hyfx.backends.onnx_qdq import export as _export

    return _export(gm, plan, path, target=target, **options)


def backend(recipe: str = "minmax", calib=None, plan: QuantPlan | None = None, **options):
    """A torch.compile backend that quantizes the captured graph: torch.compile(model, backend=hyfx.backend(...))."""
    from hyfx.backends.compile import backend as _backend

    return _backend(recipe, calib, plan, **options)


__all__ = ["HybridGraph", "HyfxError", "LayerPolicy", "QuantPlan", "QuantSpec", "analyze", "backend", "capture", "export",
           "load_plan", "quantize", "recipes", "save_plan"]
