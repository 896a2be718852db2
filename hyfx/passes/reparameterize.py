"""Move per-channel activation scales into weights: RepQ-ViT's norm reparameterization, HyQ's input scaling.

A norm's output x (LayerNorm: channels last; GroupNorm: channel dim 1) quantized per channel with scale s_c and
zero point z_c equals, exactly, x̃ = (x + s_c·r2_c) / r1_c quantized per tensor with s̃ and z̃, where
r1 = s / s̃ and r2 = z − z̃ (an integer): round(x̃/s̃) + z̃ = round(x/s_c) + z_c. x̃ is what the norm computes with
its affine (γ, β) replaced by (γ / r1, (β + s·r2) / r1); every consumer y = W·x + b then computes the same y from
x̃ with W̃ = W·diag(r1) (input channels) and b̃ = b − W·(s·r2). So the reparameterized graph is the same function
in float and its per-tensor quantizer is the per-channel one, which no int8 kernel runs.

A reparameterization is data, as a plan records it (`QuantPlan.meta["reparameterized"]`):
    {norm layer: {"consumers": [layer, ...], "ratio": r1 per channel, "shift": s·r2 per channel}}
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.meta import INPUT_SCALED, REPARAMETERIZED, SOFTMAX_APPROXIMATED, TAGS
from hyfx.ops import CONV, LINEAR, getattr_path, weight_arg

aten = torch.ops.aten
NORM_AFFINE = {aten.layer_norm.default: (2, 3, -1), aten.group_norm.default: (2, 3, 1)}  # weight, bias, channel dim


def norm_channel_dim(node: fx.Node) -> int | None:
    """The channel dim of a LayerNorm / GroupNorm with a constant per-channel affine, or None (not reparameterizable)."""
    layout = NORM_AFFINE.get(node.target)
    if layout is None:
        return None
    w, b, dim = layout
    args = node.args
    if len(args) <= b or not all(isinstance(args[i], fx.Node) and args[i].op == "get_attr" for i in (w, b)):
        return None
    if node.target is aten.layer_norm.default and len(args[1]) != 1:
        return None  # affine over several trailing dims is not per channel
    return dim


def consumer_ok(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A linear, or a conv whose bias shift is exact (no padding, one group), with the norm as its input 0."""
    kind = node.meta.get(TAGS, {}).get("kind")
    if weight_arg(node) is None or kind not in (CONV, LINEAR):
        return False
    if kind == LINEAR:
        return True
    args = list(node.args) + [None] * 7
    padding, groups = args[4], args[6]
    return (groups in (None, 1)) and (padding is None or all(p == 0 for p in (padding if isinstance(padding, (list, tuple))
                                                                             else [padding])))


def _replace_arg(gm: fx.GraphModule, node: fx.Node, index: int, name: str, value: torch.Tensor) -> None:
    gm.register_buffer(name, value.detach().clone())
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    args = list(node.args) + [None] * max(0, index + 1 - len(node.args))
    old = args[index]
    args[index] = attr
    node.args = tuple(args)
    if isinstance(old, fx.Node) and old.op == "get_attr" and not old.users:
        gm.graph.erase_node(old)


def _safe(name: str) -> str:
    return name.replace(".", "_").replace("#", "_")


def reparameterize_norms(gm: fx.GraphModule, reparams: Mapping[str, Mapping]) -> fx.GraphModule:
    """A copy of the tagged graph `gm` with each norm's affine and its consumers' weights reparameterized."""
    gm = copy.deepcopy(gm)
    index = {n.meta[TAGS]["name"]: n for n in gm.graph.nodes if TAGS in n.meta}
    for norm, record in sorted(reparams.items()):
        node = index.get(norm)
        if node is None or norm_channel_dim(node) is None:
            raise HyfxError(f"plan reparameterizes norm {norm!r}, which this model has not as a LayerNorm / GroupNorm "
                            "with an affine: the plan was made for another model")
        w_i, b_i, _ = NORM_AFFINE[node.target]
        gamma = getattr_path(gm, node.args[w_i].target).detach().double()
        beta = getattr_path(gm, node.args[b_i].target).detach().double()
        ratio = torch.tensor(record["ratio"], dtype=torch.float64)
        shift = torch.tensor(record["shift"], dtype=torch.float64)
        if ratio.shape != gamma.shape or shift.shape != gamma.shape or bool((ratio <= 0).any()):
            raise HyfxError(f"plan's reparameterization of {norm} has {ratio.numel()} channels (the norm has "
                            f"{gamma.numel()}) or a non-positive ratio: the plan was made for another model")
        _replace_arg(gm, node, w_i, f"_hyfx_{_safe(norm)}_reparam_weight", (gamma / ratio).float())
        _replace_arg(gm, node, b_i, f"_hyfx_{_safe(norm)}_reparam_bias", ((beta + shift) / ratio).float())
        for layer in record["consumers"]:
            user = index.get(layer)
            if user is None or not consumer_ok(user, gm) or user.args[0] is not node:
                raise HyfxError(f"plan reparameterizes {layer} as a consumer of {norm}, which it is not here: "
                                "the plan was made for another model")
            weight = getattr_path(gm, weight_arg(user).target).detach().double()
            shape = [1] * weight.dim()
            shape[1] = -1
            bias_node = user.args[2] if len(user.args) > 2 else None
            bias = (getattr_path(gm, bias_node.target).detach().double() if isinstance(bias_node, fx.Node)
                    else torch.zeros(weight.shape[0], dtype=torch.float64))
            taps = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(-1)  # a conv without padding sums its taps
            _replace_arg(gm, user, 1, f"_hyfx_{_safe(layer)}_reparam_weight",
                         (weight * ratio.reshape(shape)).float())
            _replace_arg(gm, user, 2, f"_hyfx_{_safe(layer)}_reparam_bias", (bias - taps @ shift).float())
    gm.meta[REPARAMETERIZED] = sorted(reparams)
    gm.graph.lint()
    gm.recompile()
    return gm


def scale_input_channels(gm: fx.GraphModule, scales: Mapping[str, list[float]]) -> fx.GraphModule:
    """A copy of the tagged graph `gm` where each named conv / linear computes W·diag(α) on its input divided by α
    per channel (HyQ's QADS): the same function in float, with the channels' spread moved from the activation,
    quantized per tensor, into the weight, quantized per output channel."""
    gm = copy.deepcopy(gm)
    index = {n.meta[TAGS]["name"]: n for n in gm.graph.nodes if TAGS in n.meta}
    for layer, alpha in sorted(scales.items()):
        node = index.get(layer)
        kind = node.meta[TAGS].get("kind") if node is not None else None
        if kind not in (CONV, LINEAR) or weight_arg(node) is None or not isinstance(node.args[0], fx.Node):
            raise HyfxError(f"plan rescales the input channels of {layer!r}, which this model has not as a conv / "
                            "linear with a constant weight: the plan was made for another model")
        weight = getattr_path(gm, weight_arg(node).target).detach()
        alpha_t = torch.tensor(alpha, dtype=torch.float32)
        if alpha_t.numel() != weight.shape[1] or bool((alpha_t <= 0).any()):
            raise HyfxError(f"plan's input scales of {layer} have {alpha_t.numel()} channels (the layer has "
                            f"{weight.shape[1]}) or a non-positive one: the plan was made for another model")
        shape = [1] * weight.dim()
        shape[1] = -1
        _replace_arg(gm, node, 1, f"_hyfx_{_safe(layer)}_scaled_weight", weight * alpha_t.reshape(shape))
        src = node.args[0]
        inv = f"_hyfx_{_safe(layer)}_input_scale"
        act_shape = [1] * (weight.dim() if kind == CONV else 1)
        act_shape[1 if kind == CONV else 0] = -1
        gm.register_buffer(inv, (1.0 / alpha_t).reshape(act_shape))
        with gm.graph.inserting_before(node):
            factor = gm.graph.get_attr(inv)
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (src, factor))
        scaled.meta = {k: v for k, v in src.meta.items() if k != TAGS}
        scaled.meta[TAGS] = dict(node.meta[TAGS], kind="other", sub="input_scale", name=f"{layer}.input_scale",
                                 token_op=False)
        node.replace_input_with(src, scaled)
    gm.meta[INPUT_SCALED] = sorted(scales)
    gm.graph.lint()
    gm.recompile()
    return gm


def plan_rewrites(gm: fx.GraphModule, meta: Mapping) -> fx.GraphModule:
    """`gm` with every rewrite a plan records in its meta and `gm` lacks: norm reparameterization (RepQ-ViT),
    input-channel scaling and softmax approximation (HyQ)."""
    from hyfx.passes.approximate_softmax import approximate_softmax

    if meta.get("reparameterized") and not gm.meta.get(REPARAMETERIZED):
        gm = reparameterize_norms(gm, meta["reparameterized"])
    if meta.get("input_channel_scales") and not gm.meta.get(INPUT_SCALED):
        gm = scale_input_channels(gm, meta["input_channel_scales"])
    if meta.get("softmax_approximation") and not gm.meta.get(SOFTMAX_APPROXIMATED):
        gm = approximate_softmax(gm, meta["softmax_approximation"])
    return gm


REWRITES = (("reparameterized", REPARAMETERIZED), ("input_channel_scales", INPUT_SCALED),
            ("softmax_approximation", SOFTMAX_APPROXIMATED))


def rewrite_mismatch(gm: fx.GraphModule, meta: Mapping) -> str | None:
    """Which recorded rewrite `gm` does not carry as the plan records it (None: all match)."""
    for key, marker in REWRITES:
        if sorted(meta.get(key) or {}) != sorted(gm.meta.get(marker, [])):
            return key
    return None
