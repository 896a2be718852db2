"""Rewrite each hyfx.Mark node of an exported model into the standard ONNX ops of its quant point.

int weights become initializers + DequantizeLinear (per-axis on the output channel), activations
QuantizeLinear → DequantizeLinear (per tensor), log2 post-softmax quantizers float ops, a 256-entry table, or an
approximation (`LOG2_MODES`). The ONNX node names carry the layer name and role
(`stages.2.1.conv_kxk.conv/weight/DequantizeLinear`). `log2_mode_graph` is each log2 mode in PyTorch.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from hyfx.backends.onnx_graph import drop_unused_initializers, fold_pads_into_convs, fold_weight_transposes, split_gemm_bias
from hyfx.backends.onnx_marks import MARK_DOMAIN, QuantPoint
from hyfx.quant.quantizers import dequantize_log2, qd

OPSET = 19  # per-axis Q/DQ needs 13; float8 Q/DQ (the fp8 log2 mode) needs 19
LOG2_MODES = ("exact", "table", "uniform", "fp8")
FP8_MAX = 448.0  # largest float8 e4m3fn value


class _Builder:
    """Collects new nodes and initializers while the Mark nodes of a graph are rewritten."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_inits: list[TensorProto] = []
        self.names: set[str] = set(self.inits) | {n.name for n in self.graph.node}

    def unique(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, name: str, array: np.ndarray, dtype: int | None = None) -> str:
        name = self.unique(name)
        if dtype is None:
            tensor = numpy_helper.from_array(np.asarray(array), name)
        else:
            tensor = helper.make_tensor(name, dtype, list(np.shape(array)), np.asarray(array).reshape(-1).tolist())
        self.new_inits.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], output: str | None, name: str, **attrs) -> onnx.NodeProto:
        output = output or self.unique(name + "_out")
        return helper.make_node(op, inputs, [output], name=self.unique(name), **attrs)


def _weight_nodes(b: _Builder, point: QuantPoint, src: str, out: str, name: str) -> list[onnx.NodeProto]:
    """int weight initializer (quantized here, as PyTorch does) → DequantizeLinear."""
    weight = torch.from_numpy(numpy_helper.to_array(b.inits[src]).copy())
    scale, zp = torch.from_numpy(point.scale), torch.from_numpy(point.zero_point)
    dtype = torch.int8 if point.signed else torch.uint8
    if point.axis is not None:
        q = qd.quantize_per_channel(weight, scale, zp, point.axis, point.qmin, point.qmax, dtype)
    else:
        q = qd.quantize_per_tensor(weight, float(scale[0]), int(zp[0]), point.qmin, point.qmax, dtype)
    np_dtype = np.int8 if point.signed else np.uint8
    q_name = b.const(f"{src}_quantized", q.numpy().astype(np_dtype))
    scale_name, zp_name = _scale_zp(b, point, name)
    attrs = {"axis": point.axis} if point.axis is not None else {}
    return [b.node("DequantizeLinear", [q_name, scale_name, zp_name], out, f"{name}/DequantizeLinear", **attrs)]


def _scale_zp(b: _Builder, point: QuantPoint, name: str) -> tuple[str, str]:
    if point.axis is None:
        scale = b.const(f"{name}/scale", np.array(point.scale[0], np.float32))
        zp = b.const(f"{name}/zero_point", np.array(point.zero_point[0]).astype(np.int8 if point.signed else np.uint8))
    else:
        scale = b.const(f"{name}/scale", point.scale.astype(np.float32))
        zp = b.const(f"{name}/zero_point", point.zero_point.astype(np.int8 if point.signed else np.uint8))
    return scale, zp


def _activation_nodes(b: _Builder, point: QuantPoint, src: str, out: str, name: str) -> list[onnx.NodeProto]:
    """QuantizeLinear → DequantizeLinear; a Clip first when the grid is narrower than the int8 type (bits < 8)."""
    nodes = []
    full = (-128, 127) if point.signed else (0, 255)
    if (point.qmin, point.qmax) != full and point.bits < 8:
        zp, scale = float(point.zero_point[0]), float(point.scale[0])
        lo = b.const(f"{name}/clip_min", np.array((point.qmin - zp) * scale, np.float32))
        hi = b.const(f"{name}/clip_max", np.array((point.qmax - zp) * scale, np.float32))
        clip = b.node("Clip", [src, lo, hi], None, f"{name}/Clip")
        nodes.append(clip)
        src = clip.output[0]
    scale, zp = _scale_zp(b, point, name)
    q = b.node("QuantizeLinear", [src, scale, zp], None, f"{name}/QuantizeLinear")
    dq = b.node("DequantizeLinear", [q.output[0], scale, zp], out, f"{name}/DequantizeLinear")
    return [*nodes, q, dq]


def log2_table(point: QuantPoint) -> np.ndarray:
    """Dequantized value of every log2 code, computed with the PyTorch quantizer's own math."""
    codes = torch.arange(point.qmax + 1, dtype=torch.float32)
    return dequantize_log2(codes, float(point.scale[0]), int(point.zero_point[0]), point.eps).numpy()


def _log2_nodes(b: _Builder, point: QuantPoint, src: str, out: str, name: str, mode: str,
                signed_uniform: bool) -> list[onnx.NodeProto]:
    delta, zp, eps = float(point.scale[0]), float(point.zero_point[0]), point.eps
    if mode == "uniform":
        # post-softmax values lie in [0, 1]: one uniform int8 grid over that range
        qmax = 127 if signed_uniform else 255
        uni = QuantPoint(point.layer, point.role, "uniform", np.array([1.0 / qmax], np.float32), np.array([0]),
                         -127 if signed_uniform else 0, qmax, None, signed_uniform, 8)
        return _activation_nodes(b, uni, src, out, name)
    if mode == "fp8":
        scale = b.const(f"{name}/scale", np.array(1.0 / FP8_MAX, np.float32))
        zero = b.const(f"{name}/zero_point", np.zeros((), np.float32), TensorProto.FLOAT8E4M3FN)
        q = b.node("QuantizeLinear", [src, scale, zero], None, f"{name}/QuantizeLinear")
        return [q, b.node("DequantizeLinear", [q.output[0], scale, zero], out, f"{name}/DequantizeLinear")]
    # code = clip(round(log2(x + eps) / delta) + zp, 0, 2^b - 1), with log2(v) = ln(v) / ln 2
    nodes = [b.node("Add", [src, b.const(f"{name}/eps", np.array(eps, np.float32))], None, f"{name}/Add_eps")]
    nodes.append(b.node("Log", [nodes[-1].output[0]], None, f"{name}/Log"))
    nodes.append(b.node("Div", [nodes[-1].output[0], b.const(f"{name}/ln2_delta", np.array(math.log(2) * delta, np.float32))],
                        None, f"{name}/Div"))
    nodes.append(b.node("Round", [nodes[-1].output[0]], None, f"{name}/Round"))
    nodes.append(b.node("Add", [nodes[-1].output[0], b.const(f"{name}/zero_point", np.array(zp, np.float32))], None,
                        f"{name}/Add_zero_point"))
    nodes.append(b.node("Clip", [nodes[-1].output[0], b.const(f"{name}/code_min", np.array(0, np.float32)),
                                 b.const(f"{name}/code_max", np.array(point.qmax, np.float32))], None, f"{name}/Clip"))
    code = nodes[-1].output[0]
    if mode == "table":
        nodes.append(b.node("Cast", [code], None, f"{name}/Cast", to=TensorProto.INT64))
        table = b.const(f"{name}/table", log2_table(point).astype(np.float32))
        nodes.append(b.node("Gather", [table, nodes[-1].output[0]], out, f"{name}/Gather", axis=0))
        return nodes
    # value = max(2^((code - zp) * delta) - eps, 0)
    nodes.append(b.node("Sub", [code, b.const(f"{name}/zp_f", np.array(zp, np.float32))], None, f"{name}/Sub_zero_point"))
    nodes.append(b.node("Mul", [nodes[-1].output[0], b.const(f"{name}/delta", np.array(delta, np.float32))], None,
                        f"{name}/Mul_delta"))
    nodes.append(b.node("Pow", [b.const(f"{name}/two", np.array(2.0, np.float32)), nodes[-1].output[0]], None, f"{name}/Pow"))
    nodes.append(b.node("Sub", [nodes[-1].output[0], b.const(f"{name}/eps2", np.array(eps, np.float32))], None,
                        f"{name}/Sub_eps"))
    nodes.append(b.node("Relu", [nodes[-1].output[0]], out, f"{name}/Relu"))
    return nodes


def lower_marks(model: onnx.ModelProto, points: list[QuantPoint], log2_mode: str = "exact",
                signed_uniform: bool = False, skip: set[int] = frozenset()) -> onnx.ModelProto:
    """Replace each hyfx.Mark node by the standard ONNX ops of its quant point (in place; returns the model).

    Marks whose index is in `skip` become Identity (ONNX Runtime removes them): that quantizer is left out.
    """
    b = _Builder(model)
    out_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.domain != MARK_DOMAIN:
            out_nodes.append(node)
            continue
        index = next(a.i for a in node.attribute if a.name == "index")
        point = points[index]
        src, out = node.input[0], node.output[0]
        name = f"{point.layer}/{point.role}"
        if index in skip:
            out_nodes.append(b.node("Identity", [src], out, f"{name}/Identity"))
        elif point.kind == "log2":
            out_nodes += _log2_nodes(b, point, src, out, name, log2_mode, signed_uniform)
        elif point.role == "weight" and src in b.inits:
            out_nodes += _weight_nodes(b, point, src, out, name)
        else:
            out_nodes += _activation_nodes(b, point, src, out, name)
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    model.graph.initializer.extend(b.new_inits)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", OPSET)])
    fold_weight_transposes(model)
    fold_pads_into_convs(model)
    split_gemm_bias(model)
    drop_unused_initializers(model)
    return model


def log2_mode_graph(reference: fx.GraphModule, mode: str, signed_uniform: bool = False) -> fx.GraphModule:
    """The reference graph with its log2 quantizers replaced by what `mode` lowers them to, in PyTorch.

    Lets the export report measure each mode's accuracy without exporting once per mode.
    """
    gm = copy.deepcopy(reference)
    if mode in ("exact", "table"):
        return gm
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.hyfx.log2_fake_quant.default:
            node.target = _uniform_unit_fake_quant if mode == "uniform" else _fp8_unit_fake_quant
            node.args = (node.args[0], signed_uniform) if mode == "uniform" else (node.args[0],)
    gm.recompile()
    return gm


def _uniform_unit_fake_quant(x: torch.Tensor, signed: bool = False) -> torch.Tensor:
    qmax = 127 if signed else 255
    return torch.clamp(torch.round(x * qmax), 0, qmax) / qmax


def _fp8_unit_fake_quant(x: torch.Tensor) -> torch.Tensor:
    return (x * FP8_MAX).to(torch.float8_e4m3fn).float() / FP8_MAX
