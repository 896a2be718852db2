"""A target's rules checked on an export: on the plan before lowering, on the ONNX QDQ model after.

The rules are the Target's (`hyfx.quant.targets`): `Target.export_violation` for each spec of the plan, and the
same facts (zero-point types, zero points 0, one zero point per per-channel weight, per-channel weights) for each
QuantizeLinear / DequantizeLinear of the model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from hyfx.errors import HyfxError
from hyfx.quant.spec import QuantPlan
from hyfx.quant.targets import Target, available_targets, get_target


def export_targets() -> tuple[str, ...]:
    """The registered targets the ONNX QDQ exporter lowers for: every target with a lowering (each starts from it)."""
    return tuple(name for name in available_targets() if get_target(name).lowering is not None)


def check_plan(plan: QuantPlan, target: str) -> None:
    """Raise HyfxError naming the first layer whose spec the target cannot run (`Target.export_violation`).

    tensorrt: uniform specs must be 8-bit symmetric (zero point 0), weights per output channel (axis 0),
    activations per tensor. ort: activations per tensor (ONNX Runtime's int8 kernels take one scale), per-channel
    weights symmetric (QLinearConv takes one weight zero point for all channels).
    log2 specs are lowered as float ops (or approximated), so every target accepts them.
    """
    targets = export_targets()
    if target not in targets:
        raise HyfxError(f"unknown export target {target!r}: choose one of {', '.join(targets)}")
    rules = get_target(target)
    for layer, role, spec in plan.specs():
        why = rules.export_violation(spec, role)
        if why is not None:
            raise HyfxError(f"plan entry {layer} ({role}, {spec.short()}): {why}")


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
    nodes whose input is an initializer. A name no target has gets only the rules every QDQ model obeys.
    """
    rules = get_target(target) if target in available_targets() else Target(target)
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
    allowed = {TensorProto.DataType.Value(name) for name in rules.export_types}
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
        if rules.zero_point_free and np.any(zp_values != 0):
            raise HyfxError(f"node {node.name}: zero point {zp_values.reshape(-1)[np.flatnonzero(zp_values)[0]]:g} "
                            f"is not 0; {rules.display} needs symmetric int8")
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
                if rules.shared_channel_zero_point and zp_values.size > 1 and \
                        np.any(zp_values != zp_values.reshape(-1)[0]):
                    raise HyfxError(f"node {node.name}: per-channel weight zero points differ; {rules.display}'s "
                                    f"{consumer.op_type} needs one zero point for all channels")
                if rules.per_channel_weights and scale.size == 1 and inits[node.input[0]].dims[expected] > 1:
                    raise HyfxError(f"node {node.name}: {rules.display} weights must be quantized per output channel")
        elif node.op_type == "QuantizeLinear":
            counts["activations"] += 1
            if scale.size != 1:
                raise HyfxError(f"node {node.name}: activations must be quantized per tensor (scale has {scale.size})")
    return counts
