"""Run a quantized graph fast in PyTorch: each uniform quantize → dequantize pair becomes one fake-quant op.

`insert_quant` writes `quantized_decomposed` pairs, the form lowering passes and exporters read. Run eagerly, a
pair makes eight passes over its tensor (scale, round, shift, clamp, copy to uint8, copy back, shift, scale), and on
a hybrid they cost more than the convolutions. `hyfx::uniform_fake_quant` does the same float operations in place
without the integer copies, so the fused graph computes the same values bit for bit (tested); it is the form
`hyfx.quantize` returns for evaluation. Pairs whose codes have another user are left alone.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from hyfx.quant.quantizers import qd, uniform_fake_quant, uniform_fake_quant_per_channel  # noqa: F401 - registers ops

_PAIRS = {
    qd.quantize_per_tensor.default: (qd.dequantize_per_tensor.default, torch.ops.hyfx.uniform_fake_quant.default),
    qd.quantize_per_channel.default: (qd.dequantize_per_channel.default,
                                      torch.ops.hyfx.uniform_fake_quant_per_channel.default),
}


def fuse_qdq(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with every quantize → dequantize pair (same parameters) replaced by one fake-quant node that
    keeps the dequantize node's meta (its hyfx tags among them)."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    for q in list(graph.nodes):
        pair = _PAIRS.get(q.target) if q.op == "call_function" else None
        if pair is None or len(q.users) != 1:
            continue
        dq = next(iter(q.users))
        dequantize, fused = pair
        if dq.target is not dequantize or dq.args[1:] != q.args[1:] or dq.kwargs:
            continue
        x, *params, _dtype = q.args  # per tensor: scale, zero point, qmin, qmax; per channel: + axis after them
        with graph.inserting_before(dq):
            node = graph.call_function(fused, (x, *params))
        node.meta.update(dq.meta)
        dq.replace_all_uses_with(node)
        graph.erase_node(dq)
        graph.erase_node(q)
    graph.lint()
    gm.recompile()
    return gm
