"""Backends: lower a quantized graph to ONNX QDQ, ONNX Runtime int8 on CPU, TensorRT, or a torch.compile callable.

Lowering only: a backend takes a graph and a plan and never chooses one (recipes, refiners and autotuning live
upstream, in hyfx.recipes, hyfx.refine and hyfx.pipelines). Imported lazily by `hyfx.export` / `hyfx.backend`
(onnx, onnxscript and onnxruntime are slow to import).
"""
