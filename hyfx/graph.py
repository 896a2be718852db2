"""HybridGraph: the analysed view of a captured model (tags, blocks, bridges) and its networkx form."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import networkx as nx
import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.meta import SPLIT_OUTLIERS as SPLIT_META
from hyfx.meta import TAGS
from hyfx.ops import CONV, LINEAR, MATMUL, node_shape
from hyfx.passes.bridges import Bridge, find_bridges
from hyfx.passes.decompose_attention import decompose_attention
from hyfx.passes.fuse_qdq import fuse_qdq
from hyfx.passes.insert_quant import insert_quant
from hyfx.passes.manager import sequential
from hyfx.passes.reparameterize import plan_rewrites
from hyfx.passes.split_outliers import split_weight_outliers
from hyfx.passes.tag import tag

if TYPE_CHECKING:
    from hyfx.quant.spec import QuantPlan

QUANTIZABLE_KINDS = (CONV, LINEAR, MATMUL)


@dataclass
class Block:
    name: str
    kind: str  # "cnn" | "transformer" | "other"
    counts: Counter = field(default_factory=Counter)  # node kind → count
    layers: list[str] = field(default_factory=list)  # quantizable layers (conv / linear / matmul), in order
    bridge: bool = False


@dataclass
class HybridGraph:
    gm: fx.GraphModule  # decomposed and tagged
    blocks: list[Block]
    bridges: list[Bridge]

    def nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if TAGS in n.meta]

    def tags(self, name: str) -> dict:
        return self.node(name).meta[TAGS]

    def node(self, name: str) -> fx.Node:
        index = self._index()
        if name not in index:
            raise HyfxError(f"no layer named {name!r} in this graph: run `hyfx inspect` to list layer names")
        return index[name]

    def _index(self) -> dict[str, fx.Node]:
        if not hasattr(self, "_by_name"):
            self._by_name = {n.meta[TAGS]["name"]: n for n in self.nodes()}
        return self._by_name

    def layers(self, kinds: tuple[str, ...] = QUANTIZABLE_KINDS) -> list[str]:
        return [n.meta[TAGS]["name"] for n in self.nodes() if n.meta[TAGS]["kind"] in kinds]

    def edge_layers(self) -> list[str]:
        """The network's first and last weighted layers: the convs / linears reached from the graph input, and those
        reaching the graph output, through no other conv / linear / matmul (the stem and the classifier)."""
        graph = self.gm.graph
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        outputs = [n for n in graph.nodes if n.op == "output"]
        edges = _first_weighted(inputs, lambda n: n.users) | _first_weighted(outputs, lambda n: n.all_input_nodes)
        return [n.meta[TAGS]["name"] for n in graph.nodes if n in edges]

    def bridge_layers(self) -> dict[str, Bridge]:
        return {layer: b for b in self.bridges for layer in b.layers}

    def exact_weight_layers(self) -> list[str]:
        """The layers whose weights stay 8-bit where the CPU's GEMM would need 7: transformer blocks and bridges.

        Without VNNI they run ONNX Runtime's u8u8 kernels (uint8 weights with zero point 128), which cannot
        saturate, at some speed; the README's CPU lowering section has the accuracy this keeps.
        """
        bridges = self.bridge_layers()
        return [layer for layer in self.layers((CONV, LINEAR))
                if self.tags(layer).get("region") == "transformer" or layer in bridges]

    def cnn_blocks(self) -> list[str]:
        return [b.name for b in self.blocks if b.kind == "cnn"]

    def transformer_blocks(self) -> list[str]:
        return [b.name for b in self.blocks if b.kind == "transformer"]

    def to_networkx(self) -> nx.DiGraph:
        """Data-flow graph over every node; attributes are the hyfx tags plus op, target and shape."""
        graph = nx.DiGraph()
        for node in self.gm.graph.nodes:
            attrs = dict(node.meta.get(TAGS, {}))
            attrs.update(op=node.op, target=str(node.target), shape=str(node_shape(node) or ""))
            graph.add_node(node.name, **attrs)
            for src in node.all_input_nodes:
                graph.add_edge(src.name, node.name)
        return graph


def analyze(gm: fx.GraphModule, split_outliers: float | None = None) -> HybridGraph:
    """Decompose fused attention, tag every node, group blocks and find bridges.

    `split_outliers`: first split the outlier weights of convs into their own conv at this many robust
    standard deviations (hyfx.passes.split_outliers; plans made on that graph record it).
    """
    split = partial(split_weight_outliers, threshold=split_outliers) if split_outliers is not None else None
    tagged = sequential(split, decompose_attention, tag)(gm)
    blocks: dict[str, Block] = {}
    for node in tagged.graph.nodes:
        info = node.meta.get(TAGS)
        if info is None:
            continue
        block = blocks.setdefault(info["block"], Block(info["block"], info["block_kind"]))
        block.counts[info["kind"]] += 1
        if info["kind"] in QUANTIZABLE_KINDS:
            block.layers.append(info["name"])
    bridges = find_bridges(tagged)
    for bridge in bridges:
        blocks[bridge.block].bridge = True
    return HybridGraph(tagged, list(blocks.values()), bridges)


def analysed(gm: fx.GraphModule | HybridGraph) -> HybridGraph:
    """`gm` itself when already analysed, else `analyze(gm)`."""
    return gm if isinstance(gm, HybridGraph) else analyze(gm)


def split_threshold(hg: HybridGraph) -> float | None:
    """The outlier-split threshold the graph was analysed with (None: not split)."""
    info = hg.gm.meta.get(SPLIT_META)
    return info["threshold"] if info else None


def analyze_for(gm: fx.GraphModule | HybridGraph, plan: QuantPlan | None) -> HybridGraph:
    """`gm` analysed as `plan` was made: with the outlier split it records (plan.meta["split_outliers"]) and its
    rewrites it records (norms reparameterized, input channels scaled, softmax approximated: plan_rewrites)."""
    hg = gm if isinstance(gm, HybridGraph) else analyze(gm, plan.meta.get("split_outliers") if plan is not None else None)
    if plan is not None:
        rewritten = plan_rewrites(hg.gm, plan.meta)
        if rewritten is not hg.gm:
            hg = HybridGraph(rewritten, hg.blocks, hg.bridges)
    return hg


def quantize(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, fuse: bool = True) -> fx.GraphModule:
    """The quantized model: `gm` analysed as `plan` was made (attention decomposed, tagged, split as it records) with
    the plan's quantizers inserted. `fuse`: each uniform quantize → dequantize pair as one fake-quant op (the same
    values, about twice as fast to run); `fuse=False` keeps torch's `quantized_decomposed` pairs (PT2E's form)."""
    qgm = insert_quant(analyze_for(gm, plan).gm, plan)
    return fuse_qdq(qgm) if fuse else qgm


def _first_weighted(start: list[fx.Node], neighbours) -> set[fx.Node]:
    """The convs / linears met first walking tensors from `start` along `neighbours`, not past a matmul (shape
    arithmetic is not walked: an input's batch size reaches every reshape of the network)."""
    found, seen, stack = set(), set(start), list(start)
    while stack:
        for node in neighbours(stack.pop()):
            if node in seen or node_shape(node) is None:
                continue
            seen.add(node)
            kind = node.meta.get(TAGS, {}).get("kind")
            if kind in (CONV, LINEAR):
                found.add(node)
            elif kind != MATMUL:
                stack.append(node)
    return found


@dataclass(frozen=True)
class GraphRecipe:
    """How another process (a Ray worker) rebuilds the analysed graph: capture `model` on an input of `shape` and
    analyse it as the driver did (`split_outliers`). Capture is deterministic, so every worker gets the driver's
    graph; the recipe pickles where the graph does not (torch.export graphs hold unpicklable callables)."""

    model: torch.nn.Module
    shape: tuple[int, ...]
    split_outliers: float | None = None

    def __call__(self) -> HybridGraph:
        from hyfx.capture import capture

        return analyze(capture(self.model.eval(), torch.zeros(self.shape)), self.split_outliers)
