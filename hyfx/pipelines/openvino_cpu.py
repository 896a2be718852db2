"""OpenVINO int8 CPU compile: a plan lowered to OpenVINO with int8 only where this CPU runs it faster.

OpenVINO fuses each FakeQuantize pair around a Convolution / MatMul into an int8 kernel, but what that buys
depends on the CPU: without VNNI its int8 kernels gain little over FP32, and the quantize and layout reorders
around an int8 layer can cost more than the kernel saves, so the all-int8 model can be slower than the FP32 one
(benchmarks/results/deployed_int8_avx2.md). As `compile_cpu` does for ONNX Runtime:
1. each quantizable layer's int8 island (Q in, int8 op, Q out) is timed against its FP32 op at its shape, in
   OpenVINO (`layer_table`);
2. for each threshold, the layers whose island speedup reaches it stay int8, the others lose their quantizers
   (they run float, so they are also exact); each candidate is lowered from one export and compiled;
3. the candidates are timed whole in one interleaved loop at the deployment's threads and precision; the
   fastest wins, the one with more int8 layers where two are within `TIE` (`fastest_with_most_int8`).
Quantizers no int8 kernel consumes (log2 post-softmax codes, norms) stay as the plan has them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch.fx as fx

from hyfx.backends import onnx_qdq
from hyfx.backends import openvino as hov
from hyfx.backends.ort_layers import LayerTiming, layer_islands
from hyfx.cpu import cpu_info
from hyfx.graph import HybridGraph, analyze_for
from hyfx.meta import EXAMPLE_SHAPE
from hyfx.pipelines.ort_cpu import THRESHOLDS, fastest_with_most_int8, int8_choices
from hyfx.pipelines.ort_cpu_plan import int8_candidates
from hyfx.quant.spec import QuantPlan
from hyfx.timing import median, time_interleaved

ALL_FLOAT = float("inf")  # the candidate with every quantizable layer left float


@dataclass
class OpenVinoCpuInfo:
    vnni: bool
    precision: str  # what OpenVINO ran the float parts in
    int8_layers: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)  # quantizable, left float (int8 not faster here)
    latency: dict[str, dict] = field(default_factory=dict)  # the layer table (µs, one thread)
    tuning: list[dict] = field(default_factory=list)  # whole-model timings of the candidates
    threshold: float | None = None  # the chosen minimum island speedup; None: every such layer float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OpenVinoCpuResult:
    export: hov.OpenVinoExport
    plan: QuantPlan  # the plan as deployed: the layers left float carry no quantizers
    info: OpenVinoCpuInfo


def _json(threshold: float) -> float | None:
    return None if threshold == ALL_FLOAT else threshold


def layer_table(hg: HybridGraph, layers: Iterable[str], weight_bits: int, precision: str = "default",
                runs: int = 40) -> dict[str, LayerTiming]:
    """Each layer alone in OpenVINO (one thread) at its real shape: FP32 op vs its int8 island, wall time medians
    (OpenVINO runs a request on its own threads, so the caller's CPU time does not see it)."""
    table = {}
    for layer, kind, shape, fp32, int8, feeds in layer_islands(hg, layers, 1, weight_bits):
        calls = {}
        for key, model in (("fp32", fp32), ("int8", int8)):
            request = hov.compile_model(hov.read_onnx(model), precision, threads=1).create_infer_request()
            inputs = dict(enumerate(feeds))
            calls[key] = lambda request=request, inputs=inputs: request.infer(inputs)
        times = time_interleaved(calls, runs=runs, warmup=3)
        table[layer] = LayerTiming(layer, kind, shape, median(times["fp32"]) * 1e6, median(times["int8"]) * 1e6)
    return table


def keep_layers(plan: QuantPlan, candidates: Iterable[str], chosen: Iterable[str]) -> QuantPlan:
    """`plan` without the policies of the candidates not `chosen` (those layers run float)."""
    drop = set(candidates) - set(chosen)
    kept = QuantPlan(plan.recipe, {k: v for k, v in plan.layers.items() if k not in drop}, plan.model, plan.target,
                     dict(plan.meta))
    if drop:
        kept.meta["float_layers"] = {"layers": len(drop), "why": "int8 not faster on this CPU (compile_openvino)"}
    return kept


def compile_openvino(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, precision: str = "default",
                     threads: int = hov.DEFAULT_THREADS, thresholds: Iterable[float] = THRESHOLDS, runs: int = 40,
                     log2_mode: str = "exact") -> OpenVinoCpuResult:
    """`plan` → the fastest OpenVINO model of it on this CPU (see the module docstring). Weights are first narrowed
    to what this CPU's int8 kernels multiply exactly (`weights_for_this_cpu`), as `hyfx.export` does."""
    narrowed_plan, narrowed = hov.weights_for_this_cpu(plan)
    hg = analyze_for(gm, narrowed_plan)
    candidates = int8_candidates(hg, narrowed_plan)
    bits = narrowed_plan.meta.get("narrowed_weights", {}).get("bits", 8)
    table = layer_table(hg, candidates, bits, precision)
    exported = onnx_qdq.export(hg, narrowed_plan, None, target="openvino", log2_mode=log2_mode)

    variants = {t: (keep_layers(narrowed_plan, candidates, chosen), chosen)
                for t, chosen in int8_choices(candidates, table, [*sorted(set(thresholds)), ALL_FLOAT]).items()}
    lowered = {t: onnx_qdq.lower_subset(exported, {(layer, role) for layer, role, _ in vplan.specs()})
               for t, (vplan, _) in variants.items()}
    compiled = {t: hov.compile_model(hov.read_onnx(model), precision, threads) for t, model in lowered.items()}
    shape = hg.gm.meta[EXAMPLE_SHAPE]
    x = np.random.default_rng(0).standard_normal((1, *shape[1:])).astype(np.float32)
    requests = {t: c.create_infer_request() for t, c in compiled.items()}
    # a pause between calls: OpenVINO's threads must not carry one candidate's work into the next one's time
    timings = time_interleaved({t: (lambda r=r: r.infer({0: x})) for t, r in requests.items()}, runs=runs,
                               warmup=3, pause=0.005)
    best = fastest_with_most_int8(timings, {t: len(chosen) for t, (_, chosen) in variants.items()})
    vplan, chosen = variants[best]
    info = OpenVinoCpuInfo(
        cpu_info().vnni, hov.inference_precision(compiled[best]), chosen,
        [layer for layer in candidates if layer not in chosen],
        {k: v.to_dict() for k, v in table.items()},
        [{"threshold": _json(t), "int8_layers": len(variants[t][1]), "ms": round(median(v) * 1000, 3)}
         for t, v in timings.items()], _json(best))
    qdq = onnx_qdq.export_subset(hg, exported, narrowed_plan, vplan, info.float_layers, lowered[best])
    return OpenVinoCpuResult(hov.OpenVinoExport(hov.read_onnx(qdq.model), qdq, narrowed), vplan, info)
