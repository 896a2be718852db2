"""Replace softmax nodes by HyQ's integer linear-exp softmax (hyfx.quant.linear_softmax), as a plan records it.

The record (`QuantPlan.meta["softmax_approximation"]`): {softmax layer: {"scale": logits' scale, "bits": output bits}}.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.meta import SOFTMAX_APPROXIMATED, TAGS
from hyfx.ops import SOFTMAX
from hyfx.quant import linear_softmax  # noqa: F401 - registers torch.ops.hyfx.linear_softmax


def approximate_softmax(gm: fx.GraphModule, records: Mapping[str, Mapping]) -> fx.GraphModule:
    """A copy of the tagged graph `gm` whose recorded softmax nodes compute the integer approximation."""
    gm = copy.deepcopy(gm)
    index = {n.meta[TAGS]["name"]: n for n in gm.graph.nodes if TAGS in n.meta}
    for layer, record in sorted(records.items()):
        node = index.get(layer)
        if node is None or node.meta[TAGS].get("kind") != SOFTMAX or node.op != "call_function":
            raise HyfxError(f"plan approximates softmax {layer!r}, which this model has not: the plan was made for "
                            "another model")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(torch.ops.hyfx.linear_softmax.default,
                                         (node.args[0], int(dim), float(record["scale"]), int(record["bits"])))
        new.meta = copy.copy(node.meta)
        new.meta[TAGS] = dict(node.meta[TAGS], sub="linear_softmax")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.meta[SOFTMAX_APPROXIMATED] = sorted(records)
    gm.graph.lint()
    gm.recompile()
    return gm
