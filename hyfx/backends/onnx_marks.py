"""Mark each quantizer of a quantized graph so the ONNX exporter keeps it where the plan put it.

Every quantize→dequantize pair (and every log2 quantizer) is replaced by an identity marker op,
`hyfx::onnx_mark(x, index)`, which torch.onnx's dynamo exporter lowers to a `hyfx.Mark` node (`mark_to_onnx`).
Markers survive the exporter's optimiser untouched; `QuantPoint` records what each one quantizes, for the
lowering to standard ops (`hyfx.backends.onnx_lower`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import onnxscript
import torch
import torch.fx as fx
from onnx import defs

from hyfx.errors import HyfxError
from hyfx.meta import TAGS
from hyfx.ops import getattr_path
from hyfx.quant.quantizers import qd

MARK_DOMAIN = "hyfx"


@torch.library.custom_op("hyfx::onnx_mark", mutates_args=())
def onnx_mark(x: torch.Tensor, index: int) -> torch.Tensor:
    """Identity that the ONNX exporter keeps as a `hyfx.Mark` node: where quant point `index` goes."""
    return x.clone()


@onnx_mark.register_fake
def _(x, index):
    return torch.empty_like(x)


_MARK_SCHEMA = defs.OpSchema(
    "Mark", MARK_DOMAIN, 1,
    inputs=[defs.OpSchema.FormalParameter("x", "T")],
    outputs=[defs.OpSchema.FormalParameter("y", "T")],
    type_constraints=[("T", ["tensor(float)"], "float tensors")],
    attributes=[defs.OpSchema.Attribute("index", defs.OpSchema.AttrType.INT, "quant point index")],
)
_MARK_OP = onnxscript.values.Op(onnxscript.values.Opset(MARK_DOMAIN, 1), "Mark", _MARK_SCHEMA)


def mark_to_onnx(x, index: int):
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
