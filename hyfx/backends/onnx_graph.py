"""ONNX graph clean-ups after the QDQ lowering, and housekeeping shared with the ORT layout rewrite.

Each rewrites a model in place into the form ONNX Runtime's int8 fusions expect, exactly (same outputs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Removes (in place) the initializers no node reads and no graph output names."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def fold_weight_transposes(model: onnx.ModelProto) -> None:
    """DQ(int weight) → Transpose becomes DQ(transposed int weight): ONNX Runtime fuses DQ straight into MatMul.

    The exporter writes a 3-D Linear as MatMul(x, Transpose(W)); with the weight behind a DequantizeLinear the
    Transpose would run on every call and hide the weight from the int8 MatMul fusion.
    """
    graph = model.graph
    inits, producers, users = graph_index(graph)
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


def graph_index(graph: onnx.GraphProto) -> tuple[dict, dict, dict[str, int]]:
    """(initializers by name, producing node by output name, number of uses by value name)."""
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    return {t.name: t for t in graph.initializer}, {o: n for n in graph.node for o in n.output}, uses


def fold_pads_into_convs(model: onnx.ModelProto) -> None:
    """Pad(0) → Q → DQ → Conv becomes Q → DQ → Conv with the padding in the Conv's pads.

    TF-style 'same' padding (timm's *_tf_* / lite0 models) is an explicit Pad before the Conv; with the Conv's
    input quantizer in between, ORT can neither fold the Pad into the Conv nor keep the data int8 through it.
    Exact: zero is exactly representable (its code is the zero point), so quantizing then padding with the
    zero point equals padding with 0 then quantizing.
    """
    graph = model.graph
    inits, producers, uses = graph_index(graph)
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


def split_gemm_bias(model: onnx.ModelProto) -> None:
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
