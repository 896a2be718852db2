"""hyfx: post-training quantization for CNN–Transformer hybrid vision models."""

from __future__ import annotations

import importlib

import torch.fx as fx

from hyfx import recipes, refine
from hyfx.capture import capture
from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analyze, analyze_for, quantize
from hyfx.pipelines.plan import make_plan
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec, load_plan, save_plan
from hyfx.quant.targets import Target, available_targets, get_target, register_target

__version__ = "0.1.0"


def export(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, path=None, target: str = "ort", **options):
    """Lower `gm` quantized by `plan` for `target` with the lowering its Target names ("ort", "tensorrt": ONNX QDQ,
    hyfx.backends.onnx_qdq.export, which returns an ExportResult: model, PyTorch reference graph, report)."""
    lowering = get_target(target).lowering
    if lowering is None:
        raise HyfxError(f"target {target!r} has no lowering (plans for it run as PyTorch fake quantization): "
                        f"use hyfx.quantize, or export for one of "
                        f"{', '.join(t for t in available_targets() if get_target(t).lowering)}")
    module, _, function = lowering.partition(":")
    return getattr(importlib.import_module(module), function)(gm, plan, path, target=target, **options)


def backend(recipe: str = "minmax", calib=None, plan: QuantPlan | None = None, **options):
    """A torch.compile backend that quantizes the captured graph: torch.compile(model, backend=hyfx.backend(...))."""
    from hyfx.pipelines.compile import backend as _backend

    return _backend(recipe, calib, plan, **options)


__all__ = ["HybridGraph", "HyfxError", "LayerPolicy", "QuantPlan", "QuantSpec", "Target", "analyze", "analyze_for",
           "available_targets", "backend", "capture", "export", "get_target", "load_plan", "make_plan", "quantize",
           "recipes", "refine", "register_target", "save_plan"]
