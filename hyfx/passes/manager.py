"""One calling convention for graph passes: a pass is a function `GraphModule → GraphModule` that leaves its input
untouched, so passes compose in order (as torchao's PassManager and onnx-ir's `ir.passes.Sequential` do).

A pass with options is bound with `functools.partial`; analysis passes that return a result instead of a graph
(`find_bridges`, `outlier_convs`) run after the rewriting ones, on their output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

GraphPass = Callable[[fx.GraphModule], fx.GraphModule]


@dataclass(frozen=True)
class Sequential:
    """Run `passes` in order, each on the previous one's output."""

    passes: tuple[GraphPass, ...]

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        for graph_pass in self.passes:
            gm = graph_pass(gm)
        return gm


def sequential(*passes: GraphPass | None) -> Sequential:
    """`Sequential` of the given passes, leaving out the Nones (passes an option switched off)."""
    return Sequential(tuple(p for p in passes if p is not None))
