"""OpenVINO on CPU: hyfx's ONNX QDQ model read by OpenVINO and saved as IR (.xml + .bin).

OpenVINO turns each QuantizeLinear → DequantizeLinear pair into a FakeQuantize, and its low-precision
transformations fuse the FakeQuantize on a Convolution's / MatMul's inputs and weights into an int8 kernel
(u8 activations where the zero point is not 0, i8 where it is; i8 symmetric weights), dequantizing after it.
What really runs int8 is read from the compiled model's execution graph (`runtime_precisions`), not assumed.

Precision: on CPUs with AVX-512 BF16 or AMX, OpenVINO's default inference precision is bf16, so an "FP32" model
runs in bf16 unless `INFERENCE_PRECISION_HINT=f32` is set; every compile here names the precision it asked for
(`"default"` or `"f32"`) and `inference_precision` says what the runtime chose.
"""

from __future__ import annotations

import collections
import copy
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import torch
import torch.fx as fx

from hyfx.backends import onnx_qdq
from hyfx.backends.onnx_qdq import ExportResult
from hyfx.errors import HyfxError
from hyfx.evaluate import Parity, runtime_parity
from hyfx.files import atomic_path
from hyfx.graph import HybridGraph
from hyfx.quant.spec import QuantPlan
from hyfx.quant.targets import cpu_weight_bits

PRECISIONS = ("default", "f32")  # default: what the CPU prefers (bf16 with AVX-512 BF16 / AMX), f32: forced
DEFAULT_THREADS = 2
INT8 = ("u8", "i8")  # the precisions of OpenVINO's int8 kernels
_COMPUTE = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


@functools.cache
def core() -> ov.Core:
    return ov.Core()


@dataclass
class OpenVinoExport:
    """The OpenVINO model and the ONNX QDQ export it was read from (its PyTorch reference graph and report)."""

    model: ov.Model
    qdq: ExportResult
    narrowed: list[str] = field(default_factory=list)  # layers whose weights were narrowed for this CPU

    @property
    def report(self):
        return self.qdq.report

    @property
    def reference(self) -> fx.GraphModule:
        return self.qdq.reference

    def save(self, path: str | Path) -> Path:
        """Write the IR: `path` (.xml) and the weights beside it (.bin), in full precision."""
        path = Path(path)
        if path.suffix != ".xml":
            raise HyfxError(f"an OpenVINO IR is written as .xml + .bin: name the output {path.with_suffix('.xml')}")
        with atomic_path(path) as xml_tmp:  # the .xml lands last, so a readable .xml always has its .bin
            bin_tmp = xml_tmp.with_suffix(".bin")  # OpenVINO reads the weights from the .xml's stem
            try:
                ov.save_model(self.model, str(xml_tmp), compress_to_fp16=False)
                bin_tmp.replace(path.with_suffix(".bin"))
            finally:
                bin_tmp.unlink(missing_ok=True)
        return path


def read_onnx(model: onnx.ModelProto) -> ov.Model:
    return core().read_model(model.SerializeToString())


def weights_for_this_cpu(plan: QuantPlan, bits: int | None = None) -> tuple[QuantPlan, list[str]]:
    """(`plan` with every symmetric weight wider than `bits` narrowed to `bits` over the same range, the layers
    narrowed). `bits` defaults to what OpenVINO's CPU int8 kernels multiply exactly here (`cpu_weight_bits`): without
    VNNI they use VPMADDUBSW, whose 16-bit pair sums saturate for 8-bit weights (measured on an AVX2-only CPU:
    76.6% top-1 agreement of OpenVINO with the PyTorch reference at 8 bits, 98.4% at 7). Narrowing drops a layer's
    bias correction and learned rounding, made for the wider grid."""
    bits = cpu_weight_bits() if bits is None else bits
    plan = copy.deepcopy(plan)
    narrowed = []
    for layer, policy in sorted(plan.layers.items()):
        spec = policy.weight
        if spec is None or spec.kind != "uniform" or spec.scheme != "symmetric" or spec.bits <= bits:
            continue
        new = replace(spec, bits=bits)
        if spec.calibrated:
            new = new.with_params([s * spec.qmax / new.qmax for s in spec.scale], spec.zero_point)
        policy.set_weight(new)
        narrowed.append(layer)
    if narrowed:
        plan.meta["narrowed_weights"] = {"bits": bits, "layers": len(narrowed), "why": "CPU without VNNI"}
    return plan, narrowed


def export(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, path: str | Path | None = None,
           target: str = "openvino", log2_mode: str = "exact", fold_bn: bool = True,
           symmetric: bool = False, cpu_weights: bool = True) -> OpenVinoExport:
    """Lower `gm` quantized by `plan` to OpenVINO: the ONNX QDQ export for `target`'s rules (checked on the plan,
    then on the ONNX model), read by OpenVINO; written as IR to `path` (.xml) when given. `cpu_weights`: weights
    narrowed first to what this CPU's int8 kernels multiply exactly (`weights_for_this_cpu`; the reference graph
    is the narrowed plan's)."""
    narrowed: list[str] = []
    if cpu_weights:
        plan, narrowed = weights_for_this_cpu(plan)
    qdq = onnx_qdq.export(gm, plan, None, target=target, log2_mode=log2_mode, fold_bn=fold_bn, symmetric=symmetric)
    result = OpenVinoExport(read_onnx(qdq.model), qdq, narrowed)
    if path is not None:
        result.save(path)
    return result


def compile_model(model: ov.Model | str | Path, precision: str = "default",
                  threads: int = DEFAULT_THREADS, profiling: bool = False) -> ov.CompiledModel:
    """The model compiled for this CPU with `threads` inference threads, at `precision` ("default" or "f32");
    `profiling` turns on the per-layer performance counters (`hyfx.backends.openvino_profile`)."""
    if precision not in PRECISIONS:
        raise HyfxError(f"unknown OpenVINO precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if profiling:
        config["PERF_COUNT"] = "YES"
    if precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return core().compile_model(model if isinstance(model, ov.Model) else str(model), "CPU", config)


def inference_precision(compiled: ov.CompiledModel) -> str:
    """The floating-point precision the runtime chose for the float parts of the model (f32, bf16, f16)."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def run(compiled: ov.CompiledModel, images: torch.Tensor) -> np.ndarray:
    return compiled(images.numpy())[0]


def runner(compiled: ov.CompiledModel):
    """`images → logits` on one reusable infer request (what `hyfx.evaluate.predict` / `compare` call)."""
    request = compiled.create_infer_request()

    def call(images: torch.Tensor) -> torch.Tensor:
        request.infer({0: images.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return call


def runtime_precisions(compiled: ov.CompiledModel) -> dict[str, dict[str, int]]:
    """Per compute-layer type of the execution graph (Convolution, FullyConnected, MatMul, ...), how many run in
    each precision (u8 / i8: int8 kernels; f32, bf16: float)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in _COMPUTE:
            counts[kind][info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"] += 1
    return {kind: dict(c) for kind, c in sorted(counts.items())}


def int8_fraction(precisions: dict[str, dict[str, int]]) -> float:
    """The share of compute layers that run an int8 kernel."""
    total = sum(sum(c.values()) for c in precisions.values())
    int8 = sum(n for c in precisions.values() for p, n in c.items() if p in INT8)
    return int8 / total if total else 0.0


def parity(compiled: ov.CompiledModel, reference: torch.nn.Module | torch.Tensor, loader: Iterable,
           fp32: torch.nn.Module | torch.Tensor | None = None) -> Parity:
    """The compiled model in OpenVINO against `reference` (the PyTorch quantized graph) on the same images."""
    return runtime_parity(runner(compiled), reference, loader, fp32, runtime=f"OpenVINO ({inference_precision(compiled)})")
