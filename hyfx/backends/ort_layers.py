"""Single-layer micro-benchmark in ONNX Runtime: each conv / linear / matmul alone at its real shape, FP32 vs int8.

The int8 model of a layer is its island as the QDQ lowering writes it between FP32 neighbours (Q in, int8 op,
DQ out), so a layer whose island is slower than its FP32 op is better left in FP32 (`hyfx.pipelines.ort_cpu`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import onnx
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from hyfx.backends.onnx_lower import OPSET
from hyfx.backends.ort import session
from hyfx.graph import HybridGraph
from hyfx.meta import TAGS
from hyfx.ops import CONV, MATMUL, getattr_path, node_shape
from hyfx.timing import median, time_interleaved


@dataclass
class LayerTiming:
    layer: str
    kind: str
    shape: str
    fp32_us: float
    int8_us: float

    @property
    def speedup(self) -> float:
        return self.fp32_us / self.int8_us if self.int8_us else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": round(self.speedup, 3)}


def _tensor_info(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _qdq(prefix: str, src: str, scale: float, zero_point: int, signed: bool) -> tuple[list, list, str]:
    dtype = TensorProto.INT8 if signed else TensorProto.UINT8
    inits = [numpy_helper.from_array(np.array(scale, np.float32), prefix + "_s"),
             helper.make_tensor(prefix + "_z", dtype, [], [zero_point])]
    nodes = [helper.make_node("QuantizeLinear", [src, prefix + "_s", prefix + "_z"], [prefix + "_q"]),
             helper.make_node("DequantizeLinear", [prefix + "_q", prefix + "_s", prefix + "_z"], [prefix + "_d"])]
    return nodes, inits, prefix + "_d"


def _weight_dq(weight: np.ndarray, axis: int, qmax: int) -> tuple[list, list, str]:
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    scale = np.maximum(np.abs(moved).max(1), 1e-8) / qmax
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale.astype(np.float32), "ws"),
             numpy_helper.from_array(np.zeros(len(scale), np.int8), "wz")]
    return [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis)], inits, "wd"


def _layer_models(gm: fx.GraphModule, node: fx.Node, kind: str, batch: int, weight_qmax: int
                  ) -> tuple[onnx.ModelProto, onnx.ModelProto, list[np.ndarray], str]:
    """(FP32 model, int8-island model, inputs, shape text) for one conv / linear / matmul node at `batch`."""
    rng = np.random.default_rng(0)
    shapes = [node_shape(a) if isinstance(a, fx.Node) else None for a in node.args[:2]]
    if shapes[0] is None:
        raise ValueError(f"{node.name}: no recorded input shape")
    x_shape = (batch, *shapes[0][1:])
    if kind == MATMUL:
        b_shape = (batch, *shapes[1][1:]) if shapes[1] is not None and len(shapes[1]) == len(shapes[0]) else shapes[1]
        feeds = [rng.random(x_shape, dtype=np.float32), rng.standard_normal(b_shape).astype(np.float32)]
        inputs = [_tensor_info("x", x_shape), _tensor_info("b", b_shape)]
        fp32 = [helper.make_node("MatMul", ["x", "b"], ["y"])]
        n1, i1, xd = _qdq("a", "x", 1 / 255, 0, False)
        n2, i2, bd = _qdq("c", "b", 4 / 255, 128, False)
        int8 = [*n1, *n2, helper.make_node("MatMul", [xd, bd], ["y"])]
        return (_model(fp32, inputs, []), _model(int8, inputs, i1 + i2), feeds,
                f"{tuple(x_shape)}@{tuple(b_shape)}")
    weight = getattr_path(gm, node.args[1].target).detach().float().numpy()
    weight_shape = weight.shape
    feeds = [rng.random(x_shape, dtype=np.float32)]
    inputs = [_tensor_info("x", x_shape)]
    n1, i1, xd = _qdq("a", "x", 1 / 255, 0, False)
    if kind == CONV:
        stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]):])
        nd = len(weight_shape) - 2
        attrs = dict(strides=_ints(stride, nd), dilations=_ints(dilation, nd), group=int(groups))
        if isinstance(padding, str):
            attrs["auto_pad"] = "SAME_UPPER" if padding == "same" else "VALID"
        else:
            attrs["pads"] = _ints(padding, nd) * 2
        wn, wi, wd = _weight_dq(weight, 0, weight_qmax)
        fp32 = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
        n3, i3, _ = _qdq("o", "y0", 8 / 255, 128, False)
        int8 = [*n1, *wn, helper.make_node("Conv", [xd, wd], ["y0"], **attrs), *n3,
                helper.make_node("Identity", ["o_d"], ["y"])]
        return (_model(fp32, inputs, [numpy_helper.from_array(weight, "w")]), _model(int8, inputs, i1 + wi + i3), feeds,
                f"{tuple(x_shape)} w{tuple(weight_shape)} g{groups}")
    # linear: y = x W^T, as the exporter writes it (MatMul on the transposed weight)
    weight_t = np.ascontiguousarray(weight.T)
    wn, wi, wd = _weight_dq(weight_t, 1, weight_qmax)
    fp32 = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    int8 = [*n1, *wn, helper.make_node("MatMul", [xd, wd], ["y"])]
    return (_model(fp32, inputs, [numpy_helper.from_array(weight_t, "w")]), _model(int8, inputs, i1 + wi), feeds,
            f"{tuple(x_shape)} w{tuple(weight_shape)}")


def _ints(value, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    return [int(v) for v in value]


def _model(nodes: list, inputs: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layer", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def layer_islands(hg: HybridGraph, layers: Iterable[str], batch: int = 1, weight_bits: int = 7
                  ) -> Iterator[tuple[str, str, str, onnx.ModelProto, onnx.ModelProto, list[np.ndarray]]]:
    """(layer, kind, shape text, FP32 model, int8-island model, inputs) for each layer that has a recorded shape."""
    qmax = 2 ** (weight_bits - 1) - 1
    for layer in layers:
        node = hg.node(layer)
        kind = node.meta[TAGS]["kind"]
        try:
            fp32, int8, feeds, shape = _layer_models(hg.gm, node, kind, batch, qmax)
        except (ValueError, TypeError, IndexError):
            continue
        yield layer, kind, shape, fp32, int8, feeds


def layer_latency_table(hg: HybridGraph, layers: Iterable[str], batch: int = 1, weight_bits: int = 7,
                        runs: int = 40) -> dict[str, LayerTiming]:
    """Each layer alone in ORT at its real shape and `batch`: FP32 op vs its int8 island (Q in, int8 op, DQ out).

    The island is what the lowering produces for a layer between FP32 neighbours, so a layer whose island is
    slower than its FP32 op is better left in FP32. Timed single-threaded in thread CPU time, which other
    processes on a shared machine do not inflate (wall time of a 2-thread session does).
    """
    table = {}
    for layer, kind, shape, fp32, int8, feeds in layer_islands(hg, layers, batch, weight_bits):
        sessions = {"fp32": session(fp32, 1), "int8": session(int8, 1)}
        calls = {k: partial(s.run, None, dict(zip([i.name for i in s.get_inputs()], feeds, strict=False)))
                 for k, s in sessions.items()}
        times = time_interleaved(calls, runs=runs, warmup=3, clock=time.thread_time)
        table[layer] = LayerTiming(layer, kind, shape, median(times["fp32"]) * 1e6, median(times["int8"]) * 1e6)
    return table
