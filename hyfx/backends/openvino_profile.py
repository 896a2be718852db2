"""Where an OpenVINO model spends its time: the CPU plugin's per-layer performance counters.

The execution graph (`openvino.runtime_precisions`) says which kernels were chosen; the counters say what each
one costs, so a slow int8 model can be traced to the layers that dominate (float layers between int8 ones,
reorders, layers left in f32) instead of guessed at.
"""

from __future__ import annotations

import collections
import re
import statistics
from dataclasses import asdict, dataclass

import numpy as np
import openvino as ov

from hyfx.backends.openvino import DEFAULT_THREADS, INT8, compile_model

# exec_type ends in the kernel's precision: brgconv_avx512_amx_I8, jit_avx512_FP32, brgemm_avx512_amx_bf16, ...
_PRECISION = re.compile(r"_(i8|u8|bf16|f16|f32|fp32|fp16|i32)$", re.IGNORECASE)


@dataclass(frozen=True)
class LayerTime:
    name: str
    node_type: str  # Convolution, FullyConnected, Reorder, Eltwise, Subgraph, ...
    exec_type: str  # the kernel OpenVINO picked
    precision: str  # the kernel's precision (i8 / u8: an int8 kernel), "" where the name does not say
    ms: float  # median over the profiled runs

    def to_dict(self) -> dict:
        return asdict(self)


def kernel_precision(exec_type: str) -> str:
    """`brgconv_avx512_amx_I8` → "i8"; FP32 → "f32"; "" when the kernel name carries no precision."""
    m = _PRECISION.search(exec_type)
    if not m:
        return ""
    p = m.group(1).lower()
    return {"fp32": "f32", "fp16": "f16"}.get(p, p)


def layer_times(model: ov.Model, images: np.ndarray, precision: str = "default", threads: int = DEFAULT_THREADS,
                runs: int = 20, warmup: int = 5) -> list[LayerTime]:
    """Per executed layer, the median real time over `runs` inferences of `images` (profiling on)."""
    compiled = compile_model(model, precision, threads, profiling=True)
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer({0: images})
    samples: dict[str, list[float]] = collections.defaultdict(list)
    kinds: dict[str, tuple[str, str]] = {}
    for _ in range(runs):
        request.infer({0: images})
        for info in request.get_profiling_info():
            if info.status == ov.ProfilingInfo.Status.EXECUTED:
                samples[info.node_name].append(info.real_time.total_seconds() * 1000)
                kinds[info.node_name] = (info.node_type, info.exec_type)
    return [LayerTime(name, *kinds[name], kernel_precision(kinds[name][1]), statistics.median(values))
            for name, values in samples.items()]


def summary(times: list[LayerTime], top: int = 10) -> dict:
    """Total ms; ms and layer count per (layer type, kernel precision); the `top` slowest layers."""
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for t in times:
        groups[f"{t.node_type} {t.precision or '-'}"].append(t.ms)
    total = sum(t.ms for t in times)
    by_kind = {k: {"ms": round(sum(v), 3), "layers": len(v), "share": round(sum(v) / total, 3) if total else 0.0}
               for k, v in sorted(groups.items(), key=lambda kv: -sum(kv[1]))}
    int8 = sum(t.ms for t in times if t.precision in INT8)
    slowest = sorted(times, key=lambda t: -t.ms)[:top]
    return {"total_ms": round(total, 3), "int8_ms_share": round(int8 / total, 3) if total else 0.0,
            "by_kind": by_kind, "slowest": [t.to_dict() | {"ms": round(t.ms, 3)} for t in slowest]}
