"""Fold each inference BatchNorm into the convolution before it, and carry a plan over to the folded graph.

What both ONNX Runtime and TensorRT want before quantization: the folded weights are quantized as one tensor.
The per-output-channel factor each folded weight was multiplied by is kept in `gm.meta[BN_FACTORS]`, so a
symmetric weight spec calibrated before folding carries over exactly (`folded_weight_spec`, `folded_plan`).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from hyfx.meta import BN_FACTORS, TAGS
from hyfx.ops import batchnorm_factor, getattr_path
from hyfx.quant.rounding import flip_offsets
from hyfx.quant.spec import QuantPlan, QuantSpec

aten = torch.ops.aten


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
