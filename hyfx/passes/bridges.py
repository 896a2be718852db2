"""Bridge-block detection: where the data leaves convolutions and enters a transformer, and back.

Q-HyViT calls the conv layers that feed a transformer the *bridge block* (in MobileViT,
``stages.N.1.conv_kxk → stages.N.1.conv_1x1``: the local convs whose output is unfolded into tokens).
Found from the graph alone: a transformer block whose input comes from a CNN block (not from another
transformer block) is an entry; its bridge layers are the block's convs that run on the feature map
before it is reshaped into tokens, or, when the block starts directly on tokens (ViT, EfficientFormer's
Meta3D), the convs of the previous block that feed it. The exit is the set of convs that run on the
folded-back feature map after the block's last token operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from hyfx.meta import TAGS
from hyfx.ops import CONV, QUANT, RESHAPE, ancestors, descendants

_PASS_THROUGH = ("act", "other", RESHAPE, QUANT)


@dataclass
class Bridge:
    block: str  # the transformer block entered
    layers: list[str]  # bridge conv layers, in execution order (names from meta["hyfx"]["name"])
    into: str  # the first token operation they feed
    exit_layers: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return " → ".join(self.layers) + f"  ⇒ {self.into}"


def _info(node: fx.Node) -> dict | None:
    return node.meta.get(TAGS)


def _nearest_compute_inputs(node: fx.Node) -> list[fx.Node]:
    """The closest tagged compute nodes upstream of `node`, looking through reshapes, activations, adds."""
    found, seen, todo = [], set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        info = _info(n)
        if info is None:
            continue
        if info["kind"] in _PASS_THROUGH or (info["kind"] == "norm" and info["sub"] == "batch_norm"):
            todo.extend(n.all_input_nodes)
        else:
            found.append(n)
    return found


def _is_layout_change(node: fx.Node) -> bool:
    return _info(node)["kind"] == RESHAPE and _info(node)["sub"] != "getitem"


def _feeding_convs(first_token: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """The conv chain of the block right before a block that starts on tokens (ViT, EfficientFormer Meta3D)."""
    convs = [p for p in _nearest_compute_inputs(first_token) if _info(p)["kind"] == CONV]
    if not convs:
        return []
    last = max(convs, key=order.__getitem__)
    block = _info(last)["block"]
    upstream = ancestors(last) | {last}
    return sorted((n for n in upstream if _info(n) and _info(n)["block"] == block and _info(n)["kind"] == CONV),
                  key=order.__getitem__)


def find_bridges(gm: fx.GraphModule) -> list[Bridge]:
    """Bridge blocks of a graph tagged by `hyfx.passes.tag.tag`, in execution order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_block: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        info = _info(node)
        if info is not None and info["block_kind"] == "transformer":
            by_block.setdefault(info["block"], []).append(node)
    bridges = []
    for block, members in by_block.items():
        member_set = set(members)
        first_token = next((n for n in members if _info(n)["token_op"]), None)
        if first_token is None:
            continue
        upstream = ancestors(first_token)
        sources = [p for n in members for p in _nearest_compute_inputs(n) if p not in member_set]
        if not sources or _info(max(sources, key=order.__getitem__))["region"] == "transformer":
            continue  # fed by another transformer block (or the input): no conv→transformer transition
        reshapes = [n for n in members if n in upstream and _is_layout_change(n)]
        cut = min((order[n] for n in reshapes), default=order[first_token])
        layers = [n for n in members if n in upstream and _info(n)["kind"] == CONV and order[n] < cut]
        if not layers:
            layers = _feeding_convs(first_token, order)
        if not layers:
            continue
        last_token = [n for n in members if _info(n)["token_op"]][-1]
        after = descendants(last_token)
        fold = max((order[n] for n in members if n in after and _is_layout_change(n)), default=order[last_token])
        exits = [_info(n)["name"] for n in members if order[n] > fold and _info(n)["kind"] == CONV]
        bridges.append(Bridge(block, [_info(n)["name"] for n in layers], _info(first_token)["name"], exits))
    return bridges
