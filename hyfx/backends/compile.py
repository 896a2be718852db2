"""A torch.compile backend that quantizes the captured graph: `torch.compile(model, backend=hyfx.backend(...))`.

Dynamo hands a backend an FX graph whose parameters and buffers are graph inputs. The backend freezes them
back into constants (weights are read once, at compile time: this is for inference), captures the frozen
graph with `hyfx.capture`, asks its plan maker for the plan of that graph (`hyfx.pipelines.compile` makes one
from a recipe and calibration images, or hands back a given plan) and returns the quantized GraphModule as the
compiled function. Each compiled graph, its plan and its quantized
graph are kept on the backend object (`backend.compiled`) for inspection and parity checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from hyfx.capture import capture
from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analyze_for
from hyfx.ops import getattr_path
from hyfx.passes.insert_quant import insert_quant
from hyfx.quant.spec import QuantPlan

_STATE = re.compile(r"\._(parameters|buffers)\[")


@dataclass
class Compiled:
    """One graph dynamo handed to the backend, and what the backend made of it."""

    captured: fx.GraphModule  # the frozen graph as hyfx.capture saw it (FP32)
    plan: QuantPlan
    quantized: fx.GraphModule  # what the compiled function runs
    input_index: int  # which of dynamo's arguments is the image batch


def _is_state(node: fx.Node, value: object) -> bool:
    """Whether a dynamo placeholder is a module parameter / buffer rather than a real input."""
    arg = node.meta.get("grapharg")
    source = getattr(getattr(arg, "source", None), "name", None)
    if isinstance(source, str):
        return bool(_STATE.search(source))
    return isinstance(value, torch.nn.Parameter)


def freeze(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[int]]:
    """A copy of dynamo's graph with parameter / buffer placeholders turned into constants.

    Returns the frozen graph (whose placeholders are the real inputs only) and their positions in
    dynamo's argument list.
    """
    frozen = fx.GraphModule(torch.nn.Module(), fx.Graph())
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise HyfxError("dynamo passed a graph whose inputs do not match its example inputs: cannot freeze it")
    for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if isinstance(value, torch.Tensor) and _is_state(node, value):
            name = f"_frozen_{index}_{node.name}"[:120]
            frozen.register_buffer(name, value.detach().clone())
            env[node] = graph.get_attr(name)
        else:
            env[node] = graph.placeholder(node.name)
            inputs.append(index)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            value = getattr_path(gm, node.target)
            name = "_const_" + node.target.replace(".", "_")
            frozen.register_buffer(name, value.detach().clone() if isinstance(value, torch.Tensor) else value)
            env[node] = graph.get_attr(name)
            continue
        if node.op == "call_module":
            name = node.target.replace(".", "_")
            frozen.add_module(name, gm.get_submodule(node.target))
            env[node] = graph.create_node("call_module", name, *fx.map_arg((node.args, node.kwargs), env.__getitem__))
            continue
        new = graph.node_copy(node, env.__getitem__)
        new.meta = dict(node.meta)
        env[node] = new
    frozen.graph = graph
    frozen.recompile()
    return frozen.eval(), inputs


class _Single(torch.nn.Module):
    """The frozen graph as a one-input module (what hyfx.capture takes)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, x):
        return self.gm(x)


PlanMaker = Callable[[HybridGraph, list], QuantPlan]  # (analysed graph, the traced example batch) → plan


class HyfxBackend:
    """The torch.compile backend; make one with `hyfx.backend(...)`. `plan_for` makes the plan of each graph dynamo
    hands over; `plan` (when given) is the plan the graph is analysed for (its recorded outlier split)."""

    def __init__(self, plan_for: PlanMaker, plan: QuantPlan | None = None):
        self.plan_for = plan_for
        self.plan = plan
        self.compiled: list[Compiled] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        frozen, inputs = freeze(gm, list(example_inputs))
        if len(inputs) != 1:
            raise HyfxError(f"hyfx.backend quantizes graphs with one image input; this graph has {len(inputs)}")
        index = inputs[0]
        example = example_inputs[index]
        captured = capture(_Single(frozen), example)
        hg = analyze_for(captured, self.plan)
        plan = self.plan_for(hg, [example])
        quantized = insert_quant(hg.gm, plan)
        self.compiled.append(Compiled(captured, plan, quantized, index))

        def run(*args):
            with torch.no_grad():
                out = quantized(args[index])
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        return run
