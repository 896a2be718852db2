"""Node kinds, user-facing layer names, and CNN / Transformer block classification.

Every call_* node gets `node.meta[TAGS]` with:
  kind, sub      operation kind (conv, linear, matmul, softmax, norm, act, reshape, quant, other) and detail
  module         the user's module path that produced it (``stages.2.1.conv_kxk.conv``)
  name           a unique, stable layer name in the user's language (module path, plus the op for
                 modules that run several ops, e.g. ``stages.2.1.transformer.0.attn.softmax``)
  block          the block the node belongs to, and block_kind: "cnn", "transformer" or "other"
  region         the block kind seen by this layer: "transformer" for token-mixing layers, else the block kind

Blocks follow EfficientQuant's Algorithm 1 (Conv2d → CNN; Linear / attention / transformer → Transformer):
a block that computes attention (a softmax) or works on token sequences (LayerNorm, Linear on ≥3-D
input) is a Transformer block; a block with convolutions and neither is a CNN block.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict

import torch.fx as fx

from hyfx.meta import TAGS
from hyfx.ops import CONV, LINEAR, MATMUL, NORM, RESHAPE, SOFTMAX, module_stack, node_shape, op_kind

COMPUTE_KINDS = (CONV, LINEAR, MATMUL, SOFTMAX, NORM)
_CONTAINERS = ("torch.nn.modules.container.Sequential", "torch.nn.modules.container.ModuleList",
               "torch.nn.modules.container.ModuleDict", "Sequential", "ModuleList", "ModuleDict")


def _is_container(cls_name: str) -> bool:
    return cls_name in _CONTAINERS or cls_name.endswith((".Sequential", ".ModuleList", ".ModuleDict"))


def block_of(stack: list[tuple[str, str]]) -> str:
    """The block a node belongs to, from its module stack (outermost first).

    A timm-style `...Block` module wins (MobileVitBlock holds its local convs, unfold, transformer and
    fusion: one block). Otherwise the outermost non-container module sitting in a container
    (``blocks.1.0`` of an EfficientNet), else the top-level child (``stem``, ``head``).
    """
    stack = [(p, c) for p, c in stack if p]
    for path, cls in stack:
        if cls.rsplit(".", 1)[-1].endswith("Block") or "Block" in cls.rsplit(".", 1)[-1]:
            return path
    for i, (path, cls) in enumerate(stack):
        parent_cls = stack[i - 1][1] if i > 0 else ""
        if i > 0 and _is_container(parent_cls) and not _is_container(cls):
            return path
    return stack[0][0] if stack else ""


def _is_token_op(node: fx.Node, kind: str, sub: str | None) -> bool:
    if kind in (SOFTMAX, MATMUL):
        return True
    if kind == NORM and sub == "layer_norm":
        return True
    if kind == LINEAR:
        shape = node_shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        return shape is not None and len(shape) >= 3
    return False


def tag(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` whose nodes carry `meta["hyfx"]` tags (see module docstring)."""
    gm = copy.deepcopy(gm)
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    per_module: dict[str, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        kind, sub = op_kind(node, gm)
        stack = module_stack(node)
        module = stack[-1][0] if stack else ""
        node.meta[TAGS] = {"kind": kind, "sub": sub, "module": module, "block": block_of(stack),
                             "token_op": _is_token_op(node, kind, sub)}
        per_module[module].append(node)
    _assign_names(per_module)
    _classify_blocks(nodes)
    return gm


def _assign_names(per_module: dict[str, list[fx.Node]]) -> None:
    taken: set[str] = set()
    for module, members in per_module.items():
        compute = [n for n in members if n.meta[TAGS]["kind"] in COMPUTE_KINDS]
        single_weighted = len(compute) == 1 and compute[0].meta[TAGS]["kind"] in (CONV, LINEAR, NORM)
        kind_totals = Counter(n.meta[TAGS]["kind"] if n.meta[TAGS]["kind"] != "other" else n.name for n in members)
        seen: Counter = Counter()
        for node in members:
            info = node.meta[TAGS]
            if not module:
                name = node.name
            elif single_weighted and node is compute[0]:
                name = module
            elif info["kind"] in COMPUTE_KINDS or info["kind"] not in ("other", RESHAPE):
                label = info["kind"]
                name = f"{module}.{label}" if kind_totals[label] == 1 else f"{module}.{label}_{seen[label]}"
                seen[label] += 1
            else:
                name = f"{module}.{node.name}"
            while name in taken:  # a module called twice (shared weights) gets a call index
                name = f"{name}#"
            taken.add(name)
            info["name"] = name


def _classify_blocks(nodes: list[fx.Node]) -> None:
    has: dict[str, set[str]] = defaultdict(set)
    for node in nodes:
        info = node.meta[TAGS]
        if info["token_op"]:
            has[info["block"]].add("token")
        if info["kind"] == SOFTMAX:
            has[info["block"]].add("attention")
        if info["kind"] == CONV:
            has[info["block"]].add("conv")
    for node in nodes:
        info = node.meta[TAGS]
        found = has[info["block"]]
        if found & {"token", "attention"}:
            info["block_kind"] = "transformer"
        elif "conv" in found:
            info["block_kind"] = "cnn"
        else:
            info["block_kind"] = "other"
        info["region"] = "transformer" if info["token_op"] else info["block_kind"]
