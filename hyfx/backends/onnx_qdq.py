"""Lower a quantized GraphModule to ONNX with QuantizeLinear / DequantizeLinear, and check a target's rules.

Route: every quantize→dequantize pair (and every log2 quantizer) of the quantized graph is replaced by an
identity marker op, `hyfx::onnx_mark(x, index)`, the graph is exported with torch.onnx's dynamo exporter
(which lowers the marker to a `hyfx.Mark` node), and each Mark is then rewritten with the onnx helper into
the standard ops: int weights as initializers + DequantizeLinear (per-axis on the output channel), activations
as QuantizeLinear → DequantizeLinear (per tensor), log2 post-softmax as float ops or a 256-entry table.
Markers survive the exporter's optimiser untouched, so each Q/DQ lands on exactly the tensor the plan named,
and the ONNX node names carry the layer name and role (`stages.2.1.conv_kxk.conv/weight/DequantizeLinear`).

BatchNorm is folded into the preceding convolution before quantization (`fold_bn=True`, what both ONNX
Runtime and TensorRT want): the folded weights get new min-max weight parameters; the exporter returns the
PyTorch graph it lowered (`ExportResult.reference`) so parity is measured against exactly that graph.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxscript
import torch
import torch.fx as fx
from onnx import TensorProto, defs, helper, numpy_helper

from hyfx.backends.onnx_graph import drop_unused_initializers
from hyfx.backends.onnx_layout import fast_transposes
from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analyze_for
from hyfx.meta import BN_FACTORS, EXAMPLE_SHAPE, TAGS
from hyfx.ops import batchnorm_factor, getattr_path
from hyfx.passes.insert_quant import insert_quant
from hyfx.quant.quantizers import dequantize_log2, qd
from hyfx.quant.rounding import flip_offsets
from hyfx.quant.spec import QuantPlan, QuantSpec

log = logging.getLogger(__name__)

aten = torch.ops.aten
OPSET = 19  # per-axis Q/DQ needs 13; float8 Q/DQ (the fp8 log2 mode) needs 19
TARGETS = ("ort", "tensorrt")
LOG2_MODES = ("exact", "table", "uniform", "fp8")
FP8_MAX = 448.0  # largest float8 e4m3fn value
_MARK_DOMAIN = "hyfx"


# ---------------------------------------------------------------------------------------------- rule checks


def check_plan(plan: QuantPlan, target: str) -> None:
    """Raise HyfxError naming the first layer whose spec the target cannot run.

    tensorrt: uniform specs must be 8-bit symmetric (zero point 0), weights per output channel (axis 0),
    activations per tensor. ort: activations per tensor (ONNX Runtime's int8 kernels take one scale), per-channel
    weights symmetric (QLinearConv takes one weight zero point for all channels).
    log2 specs are lowered as float ops (or approximated), so every target accepts them.
    """
    if target not in TARGETS:
        raise HyfxError(f"unknown export target {target!r}: choose one of {', '.join(TARGETS)}")
    for layer, role, spec in plan.specs():
        if spec.kind == "log2":
            continue
        where = f"plan entry {layer} ({role}, {spec.short()})"
        if role != "weight" and spec.granularity != "tensor":
            raise HyfxError(f"{where}: activations must be quantized per tensor for {target}")
        if target == "ort" and role == "weight" and spec.granularity == "channel" and spec.scheme != "symmetric" and \
                (not spec.calibrated or len(set(spec.zero_point)) > 1):
            raise HyfxError(f"{where}: ONNX Runtime's int8 conv takes per-channel weights only with one zero point; "
                            "quantize weights symmetrically (e.g. the recipe's --target ort)")
        if target != "tensorrt":
            continue
        if spec.bits != 8:
            raise HyfxError(f"{where}: TensorRT runs int8 only, not {spec.bits}-bit; use --bits 8")
        if spec.scheme != "symmetric" or (spec.zero_point is not None and any(spec.zero_point)):
            raise HyfxError(f"{where}: TensorRT needs symmetric int8 with zero point 0; "
                            "use a symmetric plan or export with symmetric=True")
        if role == "weight" and (spec.granularity != "channel" or spec.axis != 0):
            raise HyfxError(f"{where}: TensorRT weights must be quantized per output channel (axis 0)")


def _weight_axis(consumer: onnx.NodeProto, input_index: int) -> int | None:
    """The output-channel axis of a weight input, by the consuming op (None when the op has no weight there)."""
    if consumer.op_type == "Conv" and input_index == 1:
        return 0
    if consumer.op_type == "ConvTranspose" and input_index == 1:
        return 1
    if consumer.op_type == "MatMul" and input_index == 1:
        return -1
    if consumer.op_type == "Gemm" and input_index == 1:
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def check_qdq(model: onnx.ModelProto, target: str) -> dict:
    """Check every QuantizeLinear / DequantizeLinear of an exported model against the target's rules.

    Returns counts; raises HyfxError naming the offending node. Weights are recognised as DequantizeLinear
    nodes whose input is an initializer.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise HyfxError(f"model opset {opset} < 13: per-axis QuantizeLinear/DequantizeLinear need opset 13")
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "weights": 0, "activations": 0}
    allowed = {TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT8E4M3FN}
    if target == "tensorrt":
        allowed = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts[node.op_type] += 1
        if len(node.input) < 3 or node.input[2] not in inits:
            raise HyfxError(f"node {node.name}: {node.op_type} needs a constant zero point (its type sets the int type)")
        scale, zp = numpy_helper.to_array(inits[node.input[1]]), inits[node.input[2]]
        zp_values = numpy_helper.to_array(zp).astype(np.float64)
        if zp.data_type not in allowed:
            raise HyfxError(f"node {node.name}: {TensorProto.DataType.Name(zp.data_type)} quantization is not allowed "
                            f"for {target} (allowed: {', '.join(TensorProto.DataType.Name(t) for t in sorted(allowed))})")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise HyfxError(f"node {node.name}: scale must be positive and finite")
        if target == "tensorrt" and np.any(zp_values != 0):
            raise HyfxError(f"node {node.name}: zero point {zp_values.reshape(-1)[np.flatnonzero(zp_values)[0]]:g} "
                            "is not 0; TensorRT needs symmetric int8")
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
        if is_weight:
            counts["weights"] += 1
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            rank = len(inits[node.input[0]].dims)
            for consumer, index in consumers.get(node.output[0], []):
                expected = _weight_axis(consumer, index)
                if expected is None:
                    continue
                if scale.size > 1 and axis % rank != expected % rank:
                    raise HyfxError(f"node {node.name}: per-channel weight axis {axis} is not the output-channel "
                                    f"axis {expected % rank} of {consumer.op_type} {consumer.name}")
                if target == "ort" and zp_values.size > 1 and np.any(zp_values != zp_values.reshape(-1)[0]):
                    raise HyfxError(f"node {node.name}: per-channel weight zero points differ; ONNX Runtime's "
                                    f"{consumer.op_type} needs one zero point for all channels")
                if target == "tensorrt" and scale.size == 1 and inits[node.input[0]].dims[expected] > 1:
                    raise HyfxError(f"node {node.name}: TensorRT weights must be quantized per output channel")
        elif node.op_type == "QuantizeLinear":
            counts["activations"] += 1
            if scale.size != 1:
                raise HyfxError(f"node {node.name}: activations must be quantized per tensor (scale has {scale.size})")
    return counts


# ---------------------------------------------------------------------------------------------- BN folding


def _is_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (aten.conv2d.default, aten.conv1d.default)


def fold_batchnorm(gm: fx.GraphModule, keep: set[str] = frozenset()) -> tuple[fx.GraphModule, list[str]]:
    """A copy of `gm` with each eval-mode BatchNorm that directly follows a convolution folded into its weights.

    Returns the new graph and the layer names of the convolutions whose weights changed. BN nodes whose
    layer name is in `keep` (a plan quantizes them) stay. The per-output-channel factor each folded weight
    was multiplied by is kept in `gm.meta[BN_FACTORS]` (layer → tensor), for `folded_plan`.
    """
    gm = copy.deepcopy(gm)
    folded = []
    factors: dict[str, torch.Tensor] = gm.meta.setdefault(BN_FACTORS, {})
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target is not aten.batch_norm.default:
            continue
        conv = bn.args[0]
        if (not isinstance(conv, fx.Node) or not _is_conv(conv) or len(conv.users) != 1 or bn.args[5]
                or bn.meta.get(TAGS, {}).get("name") in keep):
            continue
        weight_node = conv.args[1]
        bias_node = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
        if weight_node.op != "get_attr" or (bias_node is not None and bias_node.op != "get_attr"):
            continue
        if any(isinstance(a, fx.Node) and a.op != "get_attr" for a in bn.args[1:5]):
            continue
        beta, mean = [getattr_path(gm, a.target).detach() if isinstance(a, fx.Node) else None for a in bn.args[2:4]]
        weight = getattr_path(gm, weight_node.target).detach()
        bias = getattr_path(gm, bias_node.target).detach() if bias_node is not None else torch.zeros(weight.shape[0])
        factor = batchnorm_factor(gm, bn)
        new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
        new_bias = (bias - mean) * factor + (beta if beta is not None else 0.0)
        prefix = "_hyfx_folded_" + conv.name
        gm.register_buffer(prefix + "_weight", new_weight.contiguous())
        gm.register_buffer(prefix + "_bias", new_bias.contiguous())
        with gm.graph.inserting_before(conv):
            w_attr = gm.graph.get_attr(prefix + "_weight")
            b_attr = gm.graph.get_attr(prefix + "_bias")
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[1], args[2] = w_attr, b_attr
        conv.args = tuple(args)
        conv.kwargs = {k: v for k, v in conv.kwargs.items() if k != "bias"}
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        folded.append(conv.meta.get(TAGS, {}).get("name", conv.name))
        factors[folded[-1]] = factor.clone()
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, folded


def folded_weight_spec(spec: QuantSpec, factor: torch.Tensor) -> QuantSpec | None:
    """The spec that quantizes a folded weight w·k (k per output channel) to exactly k times `spec`'s
    quantization of w, or None where there is none (uncalibrated, asymmetric or non-uniform specs).

    Symmetric rounding commutes with a per-channel factor: round(w·k / (s·|k|)) = sign(k)·round(w / s).
    """
    if spec.kind != "uniform" or spec.scheme != "symmetric" or not spec.calibrated or \
            (spec.granularity == "channel" and (spec.axis != 0 or len(spec.scale) != factor.numel())):
        return None
    scale = torch.tensor(spec.scale, dtype=torch.float64).expand(factor.numel())
    k = factor.detach().double().abs()
    folded = torch.where(k > 0, scale * k, scale)  # a zeroed channel quantizes to 0 with any scale
    return QuantSpec(bits=spec.bits, granularity="channel", scheme="symmetric", axis=0).with_params(
        folded.tolist(), [0] * factor.numel())


def folded_plan(plan: QuantPlan, folded_layers: list[str], factors: dict[str, torch.Tensor] | None = None
                ) -> tuple[QuantPlan, list[str]]:
    """The plan for the BatchNorm-folded graph: a symmetric calibrated weight spec is carried over exactly
    (`folded_weight_spec`, with the fold `factors`); any other weight spec of a folded convolution is
    uncalibrated (min-max again on the folded weights) and its layer listed as redone. Bias corrections are
    scaled with the BatchNorm; a redone weight's correction, measured for the old rounding, is dropped, and so
    is its learned rounding (a carried one follows the sign of the fold)."""
    plan = copy.deepcopy(plan)
    factors = factors or {}
    redone = []
    for layer in folded_layers:
        policy = plan.layers.get(layer)
        if policy is None or policy.weight is None:
            continue
        carried = folded_weight_spec(policy.weight, factors[layer]) if layer in factors else None
        # per-channel min-max of w·k is k times that of w: the same rounding, so its bias correction holds too
        same_rounding = carried is not None or (layer in factors and not policy.weight.calibrated
                                                and policy.weight.granularity == "channel")
        if policy.bias_correction is not None:  # BN scales the conv output, the correction with it
            policy.bias_correction = tuple((torch.tensor(policy.bias_correction, dtype=torch.float64)
                                            * factors[layer].double()).tolist()) if same_rounding else None
        if carried is not None:
            if policy.weight_rounding is not None:  # symmetric: the same codes, negated where k < 0
                policy.weight_rounding = flip_offsets(policy.weight_rounding, factors[layer], layer)
            policy.weight = carried
            continue
        if policy.weight.calibrated:
            redone.append(layer)
        policy.weight = policy.weight.uncalibrated()
        policy.weight_rounding = None  # learned for the scales just replaced
    return plan, redone


def symmetric_plan(plan: QuantPlan) -> QuantPlan:
    """The plan with asymmetric uniform specs made symmetric int8 over the same calibrated range (TensorRT).

    An asymmetric activation covering [lo, hi] becomes symmetric with scale max(|lo|, |hi|)/127; weights are
    re-derived per output channel from the weights themselves. log2 specs are kept.
    """
    plan = copy.deepcopy(plan)
    for policy in plan.layers.values():
        if policy.weight is not None and policy.weight.kind == "uniform":
            policy.set_weight(QuantSpec(bits=8, granularity="channel", scheme="symmetric", axis=0))
        for idx, spec in list(policy.inputs.items()):
            policy.inputs[idx] = _symmetric_activation(spec)
        if policy.output is not None:
            policy.output = _symmetric_activation(policy.output)
    plan.target = "tensorrt"
    return plan


def _symmetric_activation(spec: QuantSpec) -> QuantSpec:
    if spec.kind != "uniform" or (spec.scheme == "symmetric" and spec.bits == 8):
        return spec
    new = QuantSpec(bits=8, granularity="tensor", scheme="symmetric")
    if not spec.calibrated:
        return new
    lo = (spec.qmin - spec.zero_point[0]) * spec.scale[0]
    hi = (spec.qmax - spec.zero_point[0]) * spec.scale[0]
    return new.with_params([max(abs(lo), abs(hi), 1e-8) / new.qmax], [0])


# ---------------------------------------------------------------------------------------------- markers


@torch.library.custom_op("hyfx::onnx_mark", mutates_args=())
def onnx_mark(x: torch.Tensor, index: int) -> torch.Tensor:
    """Identity that the ONNX exporter keeps as a `hyfx.Mark` node: where quant point `index` goes."""
    return x.clone()


@onnx_mark.register_fake
def _(x, index):
    return torch.empty_like(x)


_MARK_SCHEMA = defs.OpSchema(
    "Mark", _MARK_DOMAIN, 1,
    inputs=[defs.OpSchema.FormalParameter("x", "T")],
    outputs=[defs.OpSchema.FormalParameter("y", "T")],
    type_constraints=[("T", ["tensor(float)"], "float tensors")],
    attributes=[defs.OpSchema.Attribute("index", defs.OpSchema.AttrType.INT, "quant point index")],
)
_MARK_OP = onnxscript.values.Op(onnxscript.values.Opset(_MARK_DOMAIN, 1), "Mark", _MARK_SCHEMA)


def _mark_to_onnx(x, index: int):
    return _MARK_OP(x, index=index)


@dataclass
class QuantPoint:
    """One quantizer of the quantized graph, as ONNX will run it."""

    layer: str
    role: str  # weight | input{i} | output
    kind: str  # uniform | log2
    scale: np.ndarray  # float32, shape (channels,) or (1,)
    zero_point: np.ndarray  # int64
    qmin: int
    qmax: int
    axis: int | None = None  # per-channel axis, None per tensor
    signed: bool = True
    bits: int = 8
    eps: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["scale"] = self.scale.tolist() if self.scale.size <= 4 else f"{self.scale.size} channels"
        out["zero_point"] = self.zero_point.tolist() if self.zero_point.size <= 4 else f"{self.zero_point.size} channels"
        return out


_Q_TARGETS = (qd.quantize_per_tensor.default, qd.quantize_per_channel.default)
_DQ_TARGETS = (qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default)


def _value(gm: fx.GraphModule, arg) -> np.ndarray:
    if isinstance(arg, fx.Node):
        return getattr_path(gm, arg.target).detach().cpu().numpy()
    return np.asarray(arg)


def marked_graph(qgm: fx.GraphModule) -> tuple[fx.GraphModule, list[QuantPoint]]:
    """A copy of a quantized graph with each Q→DQ pair and each log2 quantizer replaced by `onnx_mark`."""
    gm = copy.deepcopy(qgm)
    graph = gm.graph
    points: list[QuantPoint] = []
    for node in list(graph.nodes):
        info = node.meta.get(TAGS, {})
        if node.op != "call_function":
            continue
        if node.target is torch.ops.hyfx.log2_fake_quant.default:
            src, delta, zero_point, bits, eps = node.args
            point = QuantPoint(info.get("quantizes", node.name), info.get("role", "output"), "log2",
                               np.array([delta], np.float64), np.array([zero_point], np.int64), 0, 2**bits - 1,
                               None, False, bits, float(eps))
            replaced = node
        elif node.target in _Q_TARGETS:
            users = list(node.users)
            if len(users) != 1 or users[0].target not in _DQ_TARGETS:
                raise HyfxError(f"quantize node {node.name} is not followed by one dequantize: cannot lower it to ONNX")
            dq = users[0]
            per_channel = node.target is qd.quantize_per_channel.default
            if per_channel:
                src, scale, zp, axis, qmin, qmax, dtype = node.args
            else:
                src, scale, zp, qmin, qmax, dtype = node.args
                axis = None
            point = QuantPoint(info.get("quantizes", node.name), info.get("role", "input0"), "uniform",
                               _value(gm, scale).astype(np.float32).reshape(-1),
                               _value(gm, zp).astype(np.int64).reshape(-1), int(qmin), int(qmax), axis,
                               dtype == torch.int8, _bits(int(qmin), int(qmax)))
            replaced = dq
        else:
            continue
        with graph.inserting_after(replaced):
            mark = graph.call_function(torch.ops.hyfx.onnx_mark.default, (src, len(points)))
        mark.meta[TAGS] = dict(info)
        if "val" in replaced.meta:
            mark.meta["val"] = replaced.meta["val"]
        replaced.replace_all_uses_with(mark)
        points.append(point)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm, points


def _bits(qmin: int, qmax: int) -> int:
    return int(round(math.log2(qmax - qmin + 1)))


# ---------------------------------------------------------------------------------------------- ONNX rewriting


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


def _q_dtype(point: QuantPoint) -> int:
    return TensorProto.INT8 if point.signed else TensorProto.UINT8


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
        if node.domain != _MARK_DOMAIN:
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
    _fold_weight_transposes(model)
    _fold_pads_into_convs(model)
    _split_gemm_bias(model)
    drop_unused_initializers(model)
    return model


def _fold_weight_transposes(model: onnx.ModelProto) -> None:
    """DQ(int weight) → Transpose becomes DQ(transposed int weight): ONNX Runtime fuses DQ straight into MatMul.

    The exporter writes a 3-D Linear as MatMul(x, Transpose(W)); with the weight behind a DequantizeLinear the
    Transpose would run on every call and hide the weight from the int8 MatMul fusion.
    """
    graph = model.graph
    inits, producers, users = _graph_index(graph)
    drop = set()
    for node in graph.node:
        if node.op_type != "Transpose":
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or users.get(dq.output[0]) != 1:
            continue
        perm = list(next(a.ints for a in node.attribute if a.name == "perm"))
        weight = numpy_helper.to_array(inits[dq.input[0]])
        transposed = numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), dq.input[0] + "_t")
        graph.initializer.append(transposed)
        axis_attr = next((a for a in dq.attribute if a.name == "axis"), None)
        if axis_attr is not None:
            axis_attr.i = perm.index(axis_attr.i % weight.ndim)
        dq.input[0] = transposed.name
        dq.output[0] = node.output[0]
        drop.add(id(node))
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)


def _graph_index(graph: onnx.GraphProto) -> tuple[dict, dict, dict[str, int]]:
    """(initializers by name, producing node by output name, number of uses by value name)."""
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    return {t.name: t for t in graph.initializer}, {o: n for n in graph.node for o in n.output}, uses


def _fold_pads_into_convs(model: onnx.ModelProto) -> None:
    """Pad(0) → Q → DQ → Conv becomes Q → DQ → Conv with the padding in the Conv's pads.

    TF-style 'same' padding (timm's *_tf_* / lite0 models) is an explicit Pad before the Conv; with the Conv's
    input quantizer in between, ORT can neither fold the Pad into the Conv nor keep the data int8 through it.
    Exact: zero is exactly representable (its code is the zero point), so quantizing then padding with the
    zero point equals padding with 0 then quantizing.
    """
    graph = model.graph
    inits, producers, uses = _graph_index(graph)
    drop, stale = set(), set()
    for conv in graph.node:
        if conv.op_type != "Conv":
            continue
        dq = producers.get(conv.input[0])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        pad = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if pad is None or pad.op_type != "Pad" or uses.get(pad.output[0]) != 1 or uses.get(q.output[0]) != 1 \
                or uses.get(dq.output[0]) != 1 or len(pad.input) < 2 or pad.input[1] not in inits:
            continue
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        value = numpy_helper.to_array(inits[pad.input[2]]) if len(pad.input) > 2 and pad.input[2] in inits else 0.0
        pads = numpy_helper.to_array(inits[pad.input[1]]).astype(np.int64)
        rank = len(pads) // 2
        if mode != "constant" or np.any(value != 0) or len(pad.input) > 3 or np.any(pads < 0) \
                or np.any(pads[:2]) or np.any(pads[rank:rank + 2]):
            continue
        attr = next((a for a in conv.attribute if a.name == "pads"), None)
        if any(a.name == "auto_pad" and a.s not in (b"NOTSET", b"") for a in conv.attribute):
            continue
        spatial = rank - 2
        current = list(attr.ints) if attr is not None else [0] * (2 * spatial)
        merged = [current[i] + int(pads[2 + i]) for i in range(spatial)] + \
                 [current[spatial + i] + int(pads[rank + 2 + i]) for i in range(spatial)]
        if attr is None:
            conv.attribute.append(helper.make_attribute("pads", merged))
        else:
            del attr.ints[:]
            attr.ints.extend(merged)
        q.input[0] = pad.input[0]
        drop.add(id(pad))
        stale.update((q.output[0], dq.output[0]))  # their recorded shapes were the padded ones
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    infos = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _split_gemm_bias(model: onnx.ModelProto) -> None:
    """DQ(x), DQ(w) → Gemm(+ float bias) with a float output becomes Gemm → Add(bias).

    ONNX Runtime fuses DQ → Gemm into QGemm with a float output only without a bias (checked with ORT 1.32);
    otherwise the weight's DequantizeLinear runs on every call. The Add keeps the result exact.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out_nodes = []
    for node in graph.node:
        out_nodes.append(node)
        if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
            continue
        if any(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input[:2]):
            continue
        if any(c.op_type == "QuantizeLinear" for c in consumers.get(node.output[0], [])):
            continue
        if any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
            continue
        bias, out = node.input[2], node.output[0]
        del node.input[2]
        node.output[0] = out + "_nobias"
        out_nodes.append(helper.make_node("Add", [node.output[0], bias], [out], name=node.name + "/bias"))
    del graph.node[:]
    graph.node.extend(out_nodes)


# ---------------------------------------------------------------------------------------------- export


def export_graph(gm: fx.GraphModule, example: torch.Tensor, dynamic_batch: bool = True) -> onnx.ModelProto:
    """ONNX of a (marked) GraphModule via torch.onnx's dynamo exporter, batch dimension dynamic when it can be."""
    gm = gm.eval()
    table = {torch.ops.hyfx.onnx_mark.default: _mark_to_onnx}
    kwargs = dict(dynamo=True, custom_translation_table=table, opset_version=OPSET, optimize=True, verbose=False,
                  input_names=["input"], output_names=["logits"])
    if dynamic_batch:
        try:
            program = torch.onnx.export(gm, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                        **kwargs)
            return program.model_proto
        except Exception as exc:  # noqa: BLE001 - a graph with a fixed batch still exports statically
            log.info("dynamic-batch ONNX export failed (%s); exporting with a static batch", type(exc).__name__)
    return torch.onnx.export(gm, (example,), **kwargs).model_proto


@dataclass
class ExportReport:
    target: str
    log2_mode: str
    opset: int
    quant_points: int
    counts: dict
    folded_bn: list[str] = field(default_factory=list)
    reweighted: list[str] = field(default_factory=list)  # folded convs whose calibrated weight scales were redone
    model_bytes: int = 0
    log2_layers: int = 0
    layout_rewrites: int = 0  # Reshape / Transpose chains rewritten into transposes ORT runs fast (onnx_layout)
    log2_modes: dict = field(default_factory=dict)  # mode → accuracy figures, when measured
    parity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"{self.quant_points} quantizers → {self.counts.get('QuantizeLinear', 0)} QuantizeLinear, "
                f"{self.counts.get('DequantizeLinear', 0)} DequantizeLinear ({self.counts.get('weights', 0)} weights), "
                f"opset {self.opset}, target {self.target}, {self.model_bytes / 1e6:.2f} MB")
        if self.folded_bn:
            text += f"; {len(self.folded_bn)} BatchNorms folded"
        if self.log2_layers:
            text += f"; {self.log2_layers} log2 post-softmax quantizers lowered as '{self.log2_mode}'"
        if self.layout_rewrites:
            text += f"; {self.layout_rewrites} reshape / transpose chains rewritten for ORT"
        return text


@dataclass
class ExportResult:
    model: onnx.ModelProto
    reference: fx.GraphModule  # the PyTorch graph the ONNX model computes (BN folded, plan applied)
    points: list[QuantPoint]
    report: ExportReport
    marked: onnx.ModelProto | None = None  # the exporter's model with Mark nodes, for re-lowering

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        onnx.save(self.model, str(path))
        return path

    def with_log2_mode(self, mode: str) -> ExportResult:
        """The same export with the log2 quantizers lowered another way (no second torch.onnx export)."""
        if mode not in LOG2_MODES:
            raise HyfxError(f"unknown log2 mode {mode!r}: choose one of {', '.join(LOG2_MODES)}")
        if self.marked is None:
            raise HyfxError("this export kept no marked model to re-lower: export again with the other log2 mode")
        model, _ = _finish(copy.deepcopy(self.marked), self.points, mode, self.report.target)
        report = replace(self.report, log2_mode=mode, counts=check_qdq(model, self.report.target),
                         model_bytes=model.ByteSize())
        return ExportResult(model, self.reference, self.points, report, self.marked)


def _finish(marked: onnx.ModelProto, points: list[QuantPoint], log2_mode: str, target: str,
            skip: set[int] = frozenset()) -> tuple[onnx.ModelProto, int]:
    """The lowered, checked model and the number of Reshape / Transpose chains rewritten for ORT."""
    model = lower_marks(marked, points, log2_mode, signed_uniform=target == "tensorrt", skip=skip)
    rewritten = 0
    if target == "ort":
        model, rewritten = fast_transposes(model)
    check_qdq(model, target)
    onnx.checker.check_model(model, full_check=False)
    return model, rewritten


def lower_subset(result: ExportResult, keep: set[tuple[str, str]]) -> onnx.ModelProto:
    """The exported model with only the quantizers named in `keep` ((layer, role) pairs): one torch.onnx
    export serves every subset of a plan's quantizers (ONNX Runtime's int8 tuning times several)."""
    if result.marked is None:
        raise HyfxError("this export kept no marked model to re-lower")
    skip = {i for i, p in enumerate(result.points) if (p.layer, p.role) not in keep}
    return _finish(copy.deepcopy(result.marked), result.points, result.report.log2_mode, result.report.target, skip)[0]


def prepare(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, fold_bn: bool = True
            ) -> tuple[fx.GraphModule, QuantPlan, list[str], list[str]]:
    """(quantized reference graph, plan as applied, folded conv layers, convs whose weight scales were redone)."""
    hg = analyze_for(gm, plan)
    graph, folded = hg.gm, []
    if fold_bn:
        graph, folded = fold_batchnorm(hg.gm, keep=set(plan.layers))
    applied, redone = folded_plan(plan, folded, graph.meta.get(BN_FACTORS))
    return insert_quant(graph, applied), applied, folded, redone


def export(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, path: str | Path | None = None, target: str = "ort",
           log2_mode: str = "exact", fold_bn: bool = True, symmetric: bool = False) -> ExportResult:
    """Lower `gm` quantized by `plan` to an ONNX QDQ model for `target` ("ort" or "tensorrt").

    The plan is checked against the target's rules first (HyfxError names the layer) and the ONNX model after
    (names the node), then validated by onnx.checker. `symmetric=True` converts an asymmetric plan for TensorRT.
    log2_mode: "exact" (Log/Div/Round/Clip/Pow, the PyTorch quantizer op for op), "table" (codes → 256-entry
    Gather), "uniform" (int8 QDQ over [0, 1]: fast, approximate), "fp8" (float8 e4m3 QDQ, for GPUs that have it).
    """
    if log2_mode not in LOG2_MODES:
        raise HyfxError(f"unknown log2 mode {log2_mode!r}: choose one of {', '.join(LOG2_MODES)}")
    if symmetric:
        plan = symmetric_plan(plan)
    check_plan(plan, target)
    hg = analyze_for(gm, plan)
    shape = hg.gm.meta.get(EXAMPLE_SHAPE)
    if shape is None:
        raise HyfxError("graph has no recorded example input shape: capture the model with hyfx.capture")
    reference, applied, folded, redone = prepare(hg, plan, fold_bn)
    marked, points = marked_graph(reference)
    example = torch.randn(max(2, shape[0]), *shape[1:])
    exported = export_graph(marked, example)
    model, rewritten = _finish(copy.deepcopy(exported), points, log2_mode, target)
    report = ExportReport(target, log2_mode, OPSET, len(points), check_qdq(model, target), folded, redone,
                          model.ByteSize(), sum(p.kind == "log2" for p in points), layout_rewrites=rewritten)
    result = ExportResult(model, reference, points, report, exported)
    if path is not None:
        result.save(path)
    return result


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

