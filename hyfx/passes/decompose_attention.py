"""Fused scaled_dot_product_attention → matmul · softmax · matmul.

Post-softmax activations are the tensor the hybrid-PTQ papers quantize specially (log2, twin uniform);
a fused SDPA node hides it. The decomposition follows SDPA's math definition, so numerics agree with
the fused kernel to float rounding.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx

from hyfx.ops import ATTENTION, annotate_shapes, node_shape, op_kind

aten = torch.ops.aten


def _sdpa_arguments(node: fx.Node) -> dict:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    bound.setdefault("attn_mask", None)
    bound.setdefault("is_causal", False)
    bound.setdefault("scale", None)
    bound.setdefault("enable_gqa", False)
    return bound


def _decompose_one(graph: fx.Graph, node: fx.Node) -> None:
    args = _sdpa_arguments(node)
    query, key, value = args["query"], args["key"], args["value"]
    if args["enable_gqa"]:
        raise NotImplementedError(f"{node.name}: grouped-query SDPA is not decomposed yet")
    q_shape, k_shape = node_shape(query), node_shape(key)
    if q_shape is None or k_shape is None:
        raise ValueError(f"{node.name}: attention input shapes unknown; run annotate_shapes first")
    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(q_shape[-1])
    first_new = node.prev
    with graph.inserting_before(node):
        key_t = graph.call_function(aten.transpose.int, (key, -2, -1))
        scores = graph.call_function(aten.matmul.default, (query, key_t))
        scores = graph.call_function(aten.mul.Tensor, (scores, scale))
        mask = args["attn_mask"]
        if args["is_causal"]:
            # SDPA's causal mask is lower-triangular over (L, S)
            causal = torch.ones(q_shape[-2], k_shape[-2], dtype=torch.bool).tril()
            owner = graph.owning_module
            attr = f"_hyfx_causal_mask_{node.name}"
            owner.register_buffer(attr, causal)
            mask = graph.get_attr(attr)
        if mask is not None:
            mask_val = mask.meta.get("val")
            is_bool = (mask_val is not None and mask_val.dtype == torch.bool) or args["is_causal"]
            if is_bool:
                scores = graph.call_function(aten.masked_fill.Scalar,
                                             (scores, graph.call_function(aten.logical_not.default, (mask,)),
                                              float("-inf")))
            else:
                scores = graph.call_function(aten.add.Tensor, (scores, mask))
        probs = graph.call_function(aten.softmax.int, (scores, -1))
        out = graph.call_function(aten.matmul.default, (probs, value))
    new = first_new.next
    while new is not node:
        new.meta["nn_module_stack"] = copy.copy(node.meta.get("nn_module_stack", {}))
        new = new.next
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def decompose_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with every fused SDPA node replaced by its explicit math."""
    gm = copy.deepcopy(gm)
    nodes = [n for n in gm.graph.nodes if op_kind(n, gm)[0] == ATTENTION]
    if not nodes:
        return gm
    if any(node_shape(n.args[0]) is None for n in nodes):
        annotate_shapes(gm)
    for node in nodes:
        _decompose_one(gm.graph, node)
    gm.graph.lint()
    gm.recompile()
    annotate_shapes(gm)
    return gm
