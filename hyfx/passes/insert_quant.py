"""Rewrite a tagged graph with quantization nodes from a QuantPlan.

Weights get a quantize → dequantize pair between their get_attr and the layer (per tensor or per
output channel); activation inputs get a per-tensor pair on the edge into the layer (other consumers
of the same tensor keep the float value); outputs (post-softmax) get their quantizer after the node.
A layer's bias correction is added to its bias; a learned weight rounding replaces the weight by its rounded
value on the spec's grid (the quantize → dequantize pair then reproduces it exactly). The pairs are real
`quantized_decomposed` graph nodes so later lowering passes see them.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.meta import SPLIT_OUTLIERS as SPLIT_META
from hyfx.meta import TAGS
from hyfx.ops import QUANT, getattr_path, weight_arg
from hyfx.passes.reparameterize import rewrite_mismatch
from hyfx.quant.quantizers import calibrate_weight, qd
from hyfx.quant.rounding import decode_offsets, rounded_weight
from hyfx.quant.spec import QuantPlan, QuantSpec


def _dtype(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.signed else torch.uint8


def _tag(node: fx.Node, layer: str, role: str, spec: QuantSpec, like: fx.Node) -> None:
    node.meta["nn_module_stack"] = copy.copy(like.meta.get("nn_module_stack", {}))
    info = dict(like.meta.get(TAGS, {}))
    info.update(kind=QUANT, sub=spec.kind, name=f"{layer}.{role}_q", quantizes=layer, role=role,
                spec=spec.short(), token_op=False)
    node.meta[TAGS] = info


def _single_op_quantizer(spec: QuantSpec) -> tuple | None:
    """(op, arguments after the input) of the quantizers that are one registered hyfx op, else None."""
    if spec.kind == "log2":
        return torch.ops.hyfx.log2_fake_quant.default, (spec.scale[0], spec.zero_point[0], spec.bits, spec.eps)
    if spec.kind == "twin":
        return torch.ops.hyfx.twin_fake_quant.default, (spec.scale[0], spec.scale[1], spec.bits, spec.signed)
    if spec.kind == "log_sqrt2":
        return torch.ops.hyfx.log_sqrt2_fake_quant.default, (spec.scale[0], spec.bits)
    return None


def _insert_qdq(gm: fx.GraphModule, src: fx.Node, spec: QuantSpec, layer: str, role: str) -> fx.Node:
    graph = gm.graph
    single = _single_op_quantizer(spec)
    if single is not None:
        op, args = single
        with graph.inserting_after(src):
            out = graph.call_function(op, (src, *args))
        _tag(out, layer, role, spec, src)
        return out
    dtype = _dtype(spec)
    if spec.granularity == "channel":
        prefix = f"_hyfx_{layer}_{role}".replace(".", "_").replace("#", "_")
        gm.register_buffer(f"{prefix}_scale", torch.tensor(spec.scale, dtype=torch.float32))
        gm.register_buffer(f"{prefix}_zero_point", torch.tensor(spec.zero_point, dtype=torch.int64))
        with graph.inserting_after(src):
            scale = graph.get_attr(f"{prefix}_scale")
        with graph.inserting_after(scale):
            zero_point = graph.get_attr(f"{prefix}_zero_point")
        with graph.inserting_after(zero_point):
            q = graph.call_function(qd.quantize_per_channel.default,
                                    (src, scale, zero_point, spec.axis, spec.qmin, spec.qmax, dtype))
        with graph.inserting_after(q):
            dq = graph.call_function(qd.dequantize_per_channel.default,
                                     (q, scale, zero_point, spec.axis, spec.qmin, spec.qmax, dtype))
    else:
        args = (spec.scale[0], spec.zero_point[0], spec.qmin, spec.qmax, dtype)
        with graph.inserting_after(src):
            q = graph.call_function(qd.quantize_per_tensor.default, (src, *args))
        with graph.inserting_after(q):
            dq = graph.call_function(qd.dequantize_per_tensor.default, (q, *args))
    _tag(q, layer, role, spec, src)
    _tag(dq, layer, role, spec, src)
    return dq


def _correct_bias(gm: fx.GraphModule, node: fx.Node, layer: str, correction: tuple[float, ...]) -> None:
    """Replace the layer's bias (conv / linear argument 2; none is zeros) by bias + correction."""
    weight_node = weight_arg(node)
    if weight_node is None:
        raise HyfxError(f"plan corrects the bias of {layer}, which is not a conv / linear with a constant weight")
    weight = getattr_path(gm, weight_node.target)
    delta = torch.tensor(correction, dtype=weight.dtype)
    if delta.shape != weight.shape[:1]:
        raise HyfxError(f"plan's bias correction of {layer} has {delta.numel()} channels, the layer "
                        f"{weight.shape[0]}: the plan was made for another model")
    in_kwargs = "bias" in node.kwargs
    bias = node.kwargs["bias"] if in_kwargs else (node.args[2] if len(node.args) > 2 else None)
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        raise HyfxError(f"plan corrects the bias of {layer}, whose bias is computed, not a constant")
    base = getattr_path(gm, bias.target).detach() if bias is not None else torch.zeros_like(delta)
    name = f"_hyfx_{layer}_corrected_bias".replace(".", "_").replace("#", "_")
    gm.register_buffer(name, base + delta)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    if in_kwargs:
        node.kwargs = {**node.kwargs, "bias": attr}
    else:
        args = list(node.args) + [None] * max(0, 3 - len(node.args))
        args[2] = attr
        node.args = tuple(args)


def _rounded(gm: fx.GraphModule, node: fx.Node, weight_node: fx.Node, layer: str, value: torch.Tensor) -> fx.Node:
    """A get_attr of `value` (the rounded weight) in place of `weight_node` as the layer's weight."""
    name = f"_hyfx_{layer}_rounded_weight".replace(".", "_").replace("#", "_")
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    attr.meta.update(weight_node.meta)
    node.replace_input_with(weight_node, attr)
    if not weight_node.users:
        gm.graph.erase_node(weight_node)
    return attr


def _require_calibrated(spec: QuantSpec, layer: str, role: str) -> None:
    if not spec.calibrated:
        raise HyfxError(f"plan entry {layer} {role} has no scale: calibrate the plan (a recipe with calibration data)")


def insert_quant(gm: fx.GraphModule, plan: QuantPlan) -> fx.GraphModule:
    """Return a copy of a tagged graph (`hyfx.analyze(...).gm`) with the plan's quantizers inserted."""
    gm = copy.deepcopy(gm)
    index = {n.meta[TAGS]["name"]: n for n in gm.graph.nodes if TAGS in n.meta}
    missing = sorted(set(plan.layers) - set(index))
    split = plan.meta.get("split_outliers")
    if missing and SPLIT_META not in gm.meta and (split is not None or any(m.endswith(".outliers") for m in missing)):
        raise HyfxError(f"plan was made with conv outlier weights split (threshold {split or 'as chosen'}) but this "
                        f"graph was not: analyse it with hyfx.analyze(gm, split_outliers={split or 16.0}) as the plan was")
    mismatch = rewrite_mismatch(gm, plan.meta)
    if mismatch is not None:
        raise HyfxError(f"plan records a graph rewrite ({mismatch}) this graph does not carry as recorded: apply the "
                        "plan through hyfx.quantize / hyfx.analyze_for(gm, plan), which rewrite as the plan records")
    if missing:
        raise HyfxError(
            f"plan names {len(missing)} layers this model does not have (e.g. {missing[0]!r}): "
            "the plan was made for another model"
        )
    for layer, policy in sorted(plan.layers.items()):
        node = index[layer]
        if policy.bias_correction is not None:
            _correct_bias(gm, node, layer, policy.bias_correction)
        if policy.weight is not None:
            weight_node = weight_arg(node)
            if weight_node is None:
                raise HyfxError(f"plan quantizes the weight of {layer}, which has no constant weight")
            weight = getattr_path(gm, weight_node.target).detach()
            spec = calibrate_weight(weight, policy.weight)
            if policy.weight_rounding is not None:
                weight_node = _rounded(gm, node, weight_node, layer,
                                       rounded_weight(weight, spec, decode_offsets(policy.weight_rounding,
                                                                                   weight.shape, layer)))
            node.replace_input_with(weight_node, _insert_qdq(gm, weight_node, spec, layer, "weight"))
        elif policy.weight_rounding is not None:
            raise HyfxError(f"plan rounds the weight of {layer} but gives no weight spec: the plan is inconsistent")
        for idx, spec in sorted(policy.inputs.items()):
            _require_calibrated(spec, layer, f"input{idx}")
            src = node.args[idx] if idx < len(node.args) else None
            if not isinstance(src, fx.Node):
                raise HyfxError(f"plan quantizes input {idx} of {layer}, which is not a tensor input")
            node.replace_input_with(src, _insert_qdq(gm, src, spec, layer, f"input{idx}"))
        if policy.output is not None:
            _require_calibrated(policy.output, layer, "output")
            users = list(node.users)
            out = _insert_qdq(gm, node, policy.output, layer, "output")
            for user in users:
                user.replace_input_with(node, out)
    gm.graph.lint()
    gm.recompile()
    return gm


def resolved_weight_specs(gm: fx.GraphModule, plan: QuantPlan) -> dict[str, QuantSpec]:
    """The weight specs with min-max parameters filled in, as insert_quant applies them."""
    index = {n.meta[TAGS]["name"]: n for n in gm.graph.nodes if TAGS in n.meta}
    out = {}
    for layer, policy in plan.layers.items():
        if policy.weight is not None and layer in index:
            weight_node = weight_arg(index[layer])
            out[layer] = calibrate_weight(getattr_path(gm, weight_node.target), policy.weight)
    return out
