"""Write SiLU as x · sigmoid(x), so an int8 runtime without a SiLU kernel can keep both halves int8."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from hyfx.meta import TAGS

aten = torch.ops.aten
_SILU = (aten.silu.default, aten.silu_.default)


def decompose_silu(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with SiLU written as x · sigmoid(x), so the sigmoid output can carry its own quantizer.

    ONNX Runtime has int8 kernels for Sigmoid (a lookup table) and Mul but none for SiLU: an int8 chain
    conv → SiLU → conv stays int8 only if both halves are quantized. The Mul keeps the SiLU's layer name;
    the Sigmoid is named `<silu>.sigmoid`.
    """
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SILU:
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            sig = gm.graph.call_function(aten.sigmoid.default, (x,))
            mul = gm.graph.call_function(aten.mul.Tensor, (x, sig))
        info = dict(node.meta.get(TAGS, {}))
        for new, name, sub in ((sig, f"{info.get('name', node.name)}.sigmoid", "sigmoid"), (mul, info.get("name"), "silu")):
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "tensor_meta")})
            new.meta[TAGS] = {**info, "name": name or new.name, "sub": sub, "kind": "act"}
        node.replace_all_uses_with(mul)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
