"""ONNX Runtime int8 CPU compile: recipe plan → region plan → QDQ lowering → the fastest model, by timing.

The int8 lowering (`cpu_plan` in `hyfx.pipelines.ort_cpu_plan`, `compile_cpu`) turns a recipe's plan into a model
ONNX Runtime runs fast here:
- Q/DQ sit where ORT fuses them into int8 kernels: DQ(x), DQ(w) → Conv → Q becomes QLinearConv, so int8
  convolutions also get an output quantizer; DQ → MatMul / Gemm becomes MatMulIntegerToFloat / QGemm with a
  float output, so a linear or attention matmul gets one only when all its consumers are int8.
- Between int8 layers the data stays uint8: SiLU is split into sigmoid (QLinearSigmoid, a lookup table) and
  mul (QLinearMul), CNN residual adds (QLinearAdd), concats and clamps (folded into the conv) join the int8
  region when all their inputs are int8. Norms, softmax, GELU and the transformer residual stream stay FP32
  with no Q/DQ chatter around reshape / transpose / unfold chains (each tensor has one set of parameters, so
  ORT elides the Q→DQ pairs and moves data-movement ops onto the uint8 side). Those chains are rewritten as
  transposes ORT runs fast on uint8 too (`onnx_layout.fast_transposes`, part of every `target="ort"` export):
  MobileViT's unfold / fold had cost more on uint8 than the int8 layers saved.
- BatchNorm is folded into the convolutions first; weight scales are taken on the folded weights.
- Without AVX-VNNI, MLAS's u8s8 and s8s8 kernels multiply with VPMADDUBSW, whose 16-bit pair sums saturate
  for 8-bit weights (measured here: whole-range output errors on a 1x1 conv, u8u8 exact but ~20% slower);
  7-bit weights (|w| ≤ 63) cannot saturate (255·63·2 < 2^15) and keep the fast u8s8 kernel: the default there.
  Depthwise convolutions run a direct kernel with 32-bit sums and keep 8-bit weights (`cpu_weight_bits`).
- A recipe's searched specs are lowered as searched: symmetric weights (through BatchNorm folding, exactly),
  activation ranges, and symmetric int8 activations as uint8 with zero point 128 (no s8s8 kernels or
  conversions); a ReLU-like op's searched output range is fitted inside its clamp, which ORT then folds away.
- Which layers run int8: the layer latency table (`hyfx.backends.ort_layers`) times each layer's int8 island
  against FP32 at its shape; `compile_cpu` keeps the layers above a speedup threshold and picks the threshold
  by timing whole candidate models (layout changes between int8 NHWC and FP32 NCHWc convs cost more than a
  table entry shows).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch.fx as fx

from hyfx.backends import onnx_qdq
from hyfx.backends.ort import session, time_sessions
from hyfx.backends.ort_layers import LayerTiming, layer_latency_table
from hyfx.cpu import cpu_info
from hyfx.graph import HybridGraph
from hyfx.meta import EXAMPLE_SHAPE, TAGS
from hyfx.pipelines.ort_cpu_plan import cpu_plan, int8_candidates, region_plan
from hyfx.quant.spec import QuantPlan
from hyfx.timing import median


@dataclass
class CpuPlanInfo:
    weight_bits: int
    vnni: bool
    int8_layers: list[str] = field(default_factory=list)  # conv / linear / matmul run by int8 kernels
    int8_ops: list[str] = field(default_factory=list)  # sigmoid / mul / add / cat / clamp kept int8 between them
    fp32_layers: list[str] = field(default_factory=list)  # quantizable, left FP32 (int8 not faster)
    latency: dict[str, dict] = field(default_factory=dict)  # the layer latency table
    tuning: list[dict] = field(default_factory=list)  # whole-model timings of the candidate int8 sets
    threshold: float | None = None  # the chosen minimum island speedup
    uint8_weight_layers: list[str] = field(default_factory=list)  # 8-bit weights run by u8u8 kernels (no VNNI)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CpuResult:
    export: onnx_qdq.ExportResult
    plan: QuantPlan
    info: CpuPlanInfo


THRESHOLDS = (0.0, 0.8, 0.95, 1.05, 1.2)
TIE = 0.03  # candidates whose median time is within 3% of the fastest count as equally fast


def fastest_with_most_int8(timings: dict[float, list[float]], int8_layers: dict[float, int], tie: float = TIE) -> float:
    """The threshold whose model runs fastest; among those within `tie` of it, the one with the most int8 layers.

    Where int8 gains little (CPUs without VNNI) candidates differ by less than the run-to-run noise, and the plain
    fastest flips between all-int8 and mostly-FP32 models from one run to the next; equal speed then goes to the
    smaller model, whose int8 weights take a quarter of the bytes.
    """
    medians = {t: median(v) for t, v in timings.items()}
    fastest = min(medians.values())
    return max((t for t, m in medians.items() if m <= fastest * (1 + tie)), key=lambda t: (int8_layers[t], -medians[t]))


def int8_choices(candidates: list[str], table: dict[str, LayerTiming], thresholds: Iterable[float]
                 ) -> dict[float, list[str]]:
    """{threshold: the candidates that stay int8} for each threshold giving a new set: a layer stays int8 where its
    island's speedup reaches the threshold (or it has no table entry)."""
    choices: dict[float, list[str]] = {}
    for t in thresholds:
        chosen = [layer for layer in candidates if layer not in table or table[layer].speedup >= t]
        if chosen not in choices.values():
            choices[t] = chosen
    return choices


def compile_cpu(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, calib_loader: Iterable, path: str | Path | None = None,
                log2_mode: str = "exact", weight_bits: int | None = None, batch: int = 1,
                thresholds: Iterable[float] = THRESHOLDS, runs: int = 15, max_batches: int | None = None,
                exact_weights: Iterable[str] | None = None) -> CpuResult:
    """Recipe plan → the fastest ORT int8 model this CPU runs (see the module docstring).

    `exact_weights`: layers whose weights stay 8-bit on a CPU without VNNI (default: `HybridGraph.exact_weight_layers`,
    the transformer blocks and bridges; `[]` for all-7-bit weights, the fastest and least accurate).

    1. Every layer the recipe quantizes is planned int8 and calibrated (`cpu_plan`), and exported once.
    2. The layer latency table times each layer's int8 island against FP32 at its shape and `batch`.
    3. For each threshold t, the layers whose island speedup is ≥ t stay int8 (with the ops grown between
       them); each candidate is lowered from the one export and timed whole in ORT (one thread, thread CPU
       time, interleaved); the fastest wins, the one with more int8 layers where two are within `TIE`.
       Whole-model timing decides because layout changes between int8 (NHWC) and FP32 (NCHWc) convolutions
       cost more than any single layer's table entry shows.
    """
    full, hg, bits = cpu_plan(gm, plan, calib_loader, weight_bits=weight_bits, max_batches=max_batches,
                              exact_weights=exact_weights)
    candidates = int8_candidates(hg, plan)
    table = layer_latency_table(hg, candidates, batch=batch, weight_bits=bits)
    exported = onnx_qdq.export(hg, full, None, target="ort", log2_mode=log2_mode)
    info = CpuPlanInfo(bits, cpu_info().vnni, latency={k: v.to_dict() for k, v in table.items()})
    variants: dict[float, tuple[QuantPlan, onnx.ModelProto, list[str]]] = {}
    for t, chosen in int8_choices(candidates, table, sorted(set(thresholds))).items():
        vplan, _ = region_plan(hg, plan, chosen, bits, specs=full)
        keep = {(layer, role) for layer, role, _ in vplan.specs()}
        model = onnx_qdq.lower_subset(exported, keep)
        variants[t] = (vplan, model, chosen)
    shape = hg.gm.meta[EXAMPLE_SHAPE]
    inputs = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    sessions = {t: session(model, threads=1) for t, (_, model, _) in variants.items()}
    timings = time_sessions(sessions, inputs, runs=runs, warmup=2, clock=time.thread_time)
    best = fastest_with_most_int8(timings, {t: len(chosen) for t, (_, _, chosen) in variants.items()})
    info.tuning = [{"threshold": t, "int8_layers": len(variants[t][2]), "cpu_ms": round(median(v) * 1000, 3)}
                   for t, v in timings.items()]
    info.threshold = best
    vplan, model, chosen = variants[best]
    info.int8_layers = chosen
    info.uint8_weight_layers = [layer for layer in full.meta["ort"]["uint8_weights"] if layer in chosen]
    info.fp32_layers = [layer for layer in candidates if layer not in chosen]
    _, int8 = region_plan(hg, plan, chosen, bits, specs=full)
    info.int8_ops = sorted(n.meta[TAGS]["name"] for n, role in int8.items() if role != "layer")
    result = onnx_qdq.export_subset(hg, exported, full, vplan, info.fp32_layers, model)
    if path is not None:
        result.save(path)
    return CpuResult(result, vplan, info)
