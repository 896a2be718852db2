"""Per-layer reconstruction problems: a layer's sampled inputs and FP32 output, and its output for many candidate
quantizations at once.

`evaluate(side, q, fixed)` takes a chunk of candidates for one side (the weight, or an activation input),
shaped (k, *side.data.shape), holds the other sides at `fixed`, and returns the objective output (k, P, C) at
the P sampled rows, in one batched op: conv and linear layers as a matmul over sampled receptive fields (a
grouped / depthwise conv as a batched matmul over groups), matmuls broadcast over the candidate dim, and
norms / softmax by folding the candidates into the batch. A bridge-block layer is scored at the bridge block's
output: its candidate outputs run through the rest of the block (pointwise: BN, activations, 1×1 convs) on
the sampled positions, viewed as 1×1 images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.meta import TAGS
from hyfx.ops import ACT, CONV, NORM, OTHER, QUANT, RESHAPE, ancestors, descendants, weight_arg
from hyfx.passes.insert_quant import getattr_path
from hyfx.quant.quantizers import fake_quant
from hyfx.quant.spec import QuantSpec
from hyfx.search.sampling import Samples, conv_geometry

aten = torch.ops.aten


@dataclass
class Side:
    """One tensor a layer quantizes: its sampled data, channel layout and full calibration range."""

    data: torch.Tensor
    axis: int | None  # channel axis of `data` (None: per-tensor only)
    index: torch.Tensor | None  # input channel of each position along `axis` (conv patch columns), or None
    lo: torch.Tensor  # per-channel range (C,), over all calibration data
    hi: torch.Tensor
    graph_axis: int  # the channel axis a per-channel spec uses in the graph
    halves: tuple | None = None  # ((lo, hi), (lo, hi)) of two halves of the calibration batches, or None

    @property
    def channels(self) -> int:
        return self.lo.numel()


def _halves(samples: Samples, i: int) -> tuple | None:
    return samples.halves[i] if i < len(samples.halves) else None


class ConvLinearProblem:
    """Conv2d or linear: y = x·Wᵀ (+ b) on sampled rows / receptive fields."""

    def __init__(self, layer: str, node: fx.Node, gm: fx.GraphModule, samples: Samples, x: torch.Tensor | None = None):
        self.layer = layer
        wnode = weight_arg(node)
        if wnode is None:
            raise HyfxError(f"{layer} has no constant weight")
        weight = getattr_path(gm, wnode.target).detach().float()
        bias_node = node.args[2] if len(node.args) > 2 else None
        self.bias = (getattr_path(gm, bias_node.target).detach().float() if isinstance(bias_node, fx.Node)
                     else torch.zeros(weight.shape[0]))
        self.is_conv = node.meta[TAGS]["kind"] == CONV
        self.groups = conv_geometry(node)[3] if self.is_conv else 1
        cout = weight.shape[0]
        w2 = weight.reshape(cout, -1)
        x = samples.inputs[0] if x is None else x
        lo, hi = samples.ranges[0]
        kk = w2.shape[1] * self.groups // lo.numel() if self.is_conv else 1
        index = torch.arange(lo.numel()).repeat_interleave(kk) if kk > 1 else None
        rank = samples.rank[0] if samples.rank else 2
        self.sides = {
            "weight": Side(w2, 0, None, w2.amin(1), w2.amax(1), 0),
            "input0": Side(x, 1, index, lo, hi, 1 if self.is_conv else rank - 1, _halves(samples, 0)),
        }
        self.target = samples.output - self.bias  # candidates are compared without the (unquantized) bias
        self.g2 = samples.g2

    def linear_out(self, side: str, q: torch.Tensor, fixed: dict[str, torch.Tensor]) -> torch.Tensor:
        return linear_out(side, q, fixed, self.groups)

    def evaluate(self, side, q, fixed) -> torch.Tensor:
        return self.linear_out(side, q, fixed)

    def view(self, side: str):
        """What a side is scored on: itself, or for the activation of a grouped conv whose candidates would be
        large, a random subset of its groups. Each group's outputs depend on its own inputs only, so the
        objective is a sum over groups and the subset's (rescaled) is an unbiased estimate of it."""
        if side != "input0" or self.groups == 1:
            return self
        x = self.sides["input0"].data
        keep = max(1, GROUP_SUBSET_ELEMENTS * self.groups // x.numel())
        return self if keep >= self.groups else GroupSubset(self, keep)


GROUP_SUBSET_ELEMENTS = 1 << 19  # activation samples per candidate a grouped conv is scored on, at most


def linear_out(side: str, q: torch.Tensor, fixed: dict[str, torch.Tensor], groups: int) -> torch.Tensor:
    """(k, P, Cout) outputs for k candidates of one side: a matmul, or a batched matmul over groups."""
    if side == "weight":
        w, x = q, fixed["input0"]
    else:
        w, x = fixed["weight"], q
    if groups == 1:
        if side == "weight":
            k, cout, din = w.shape
            return (x @ w.reshape(k * cout, din).T).reshape(x.shape[0], k, cout).transpose(0, 1)
        return x @ w.T
    cout, din = w.shape[-2:]
    if side == "weight":
        k = w.shape[0]
        y = torch.einsum("pgd,kgod->kpgo", x.reshape(x.shape[0], groups, din), w.reshape(k, groups, cout // groups, din))
    else:
        k = x.shape[0]
        y = torch.einsum("kpgd,god->kpgo", x.reshape(k, x.shape[1], groups, din), w.reshape(groups, cout // groups, din))
    return y.reshape(k, y.shape[1], cout)


class GroupSubset:
    """The activation side of a grouped conv restricted to `keep` random groups (full-channel candidates still
    apply: the kept columns carry their channel index)."""

    def __init__(self, base: ConvLinearProblem, keep: int):
        g = base.groups
        side = base.sides["input0"]
        din = side.data.shape[1] // g
        og = base.target.shape[1] // g
        groups = torch.randperm(g, generator=torch.Generator().manual_seed(0))[:keep].sort().values
        cols = (groups[:, None] * din + torch.arange(din)).reshape(-1)
        self.outs = (groups[:, None] * og + torch.arange(og)).reshape(-1)
        index = side.index[cols] if side.index is not None else cols
        self.sides = {"input0": replace(side, data=side.data[:, cols], index=index), "weight": base.sides["weight"]}
        self.groups = keep
        self.target = base.target[:, self.outs]
        self.g2 = None if base.g2 is None else base.g2[:, self.outs] * (g / keep)

    def evaluate(self, side, q, fixed) -> torch.Tensor:
        return linear_out(side, q, {"weight": fixed["weight"][self.outs]}, self.groups)


class MatmulProblem:
    """Activation × activation (q·kᵀ, attention·v) on sampled slices and rows."""

    def __init__(self, layer: str, samples: Samples):
        self.layer = layer
        a, b = samples.inputs
        (alo, ahi), (blo, bhi) = samples.ranges
        self.sides = {"input0": Side(a, None, None, alo, ahi, 0, _halves(samples, 0)),
                      "input1": Side(b, None, None, blo, bhi, 0, _halves(samples, 1))}
        self.target = samples.output.reshape(-1, samples.output.shape[-1])
        self.g2 = None if samples.g2 is None else samples.g2.reshape(self.target.shape)

    def evaluate(self, side, q, fixed) -> torch.Tensor:
        y = q @ fixed["input1"] if side == "input0" else fixed["input0"] @ q
        return y.reshape(y.shape[0], -1, y.shape[-1])


class RowsProblem:
    """Softmax, layer / batch / group norm on sampled rows (or whole images for group norm): the node's own op."""

    def __init__(self, layer: str, node: fx.Node, gm: fx.GraphModule, samples: Samples):
        self.layer = layer
        self.node, self.gm = node, gm
        sub = node.meta[TAGS]["sub"]
        x = samples.inputs[0]
        lo, hi = samples.ranges[0]
        rank = samples.rank[0]
        if sub == "softmax":
            dim = node.args[1]
            if dim not in (-1, rank - 1):
                raise HyfxError(f"{layer}: softmax over dim {dim} is not supported by the scale search")
            axis = graph_axis = None
        elif sub == "batch_norm":
            axis, graph_axis = x.dim() - 1, 1
        elif sub == "group_norm":
            axis, graph_axis = 1, 1
        else:  # layer norm: rows over the normalized shape; per channel only for a 1-D normalized shape
            axis = x.dim() - 1 if lo.numel() > 1 else None
            graph_axis = rank - 1
        self.sub = sub
        self.sides = {"input0": Side(x, axis, None, lo, hi, graph_axis if graph_axis is not None else 0,
                                     _halves(samples, 0))}
        self.target = samples.output.reshape(samples.output.shape[0], -1)
        self.g2 = None if samples.g2 is None else samples.g2.reshape(self.target.shape)
        self.args = [self._value(a) for a in node.args]

    def _value(self, a):
        if isinstance(a, fx.Node):
            if a.op != "get_attr":
                return None  # the input itself
            return getattr_path(self.gm, a.target)
        return a

    def evaluate(self, side, q, fixed) -> torch.Tensor:
        k, p = q.shape[:2]
        args = list(self.args)
        args[0] = q.reshape(k * p, *q.shape[2:])
        if self.sub == "softmax":
            args[1] = -1
        y = self.node.target(*args)  # batch norm takes the (N, C) channel rows as they are
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y.reshape(k, p, -1)


# ---------------------------------------------------------------------------------------------- bridge chains

_POINTWISE_OTHER = {aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.add.Scalar,
                    aten.mul.Scalar, aten.clamp.default, aten.hardtanh.default}


def _is_pointwise_conv(node: fx.Node) -> bool:
    if node.meta[TAGS]["kind"] != CONV or weight_arg(node) is None:
        return False
    w = node.args[1].meta.get("val")
    stride, padding, dilation, _ = conv_geometry(node)
    kernel_ok = w is None or tuple(w.shape[-2:]) == (1, 1)
    return kernel_ok and stride == (1, 1) and padding == (0, 0) and dilation == (1, 1)


def chain_nodes(start: fx.Node, end: fx.Node) -> list[fx.Node] | None:
    """The nodes from `start` to `end` (both included) if everything after `start` is pointwise in space and
    fed only from inside the chain (or constants); None otherwise."""
    if start is end:
        return [start]
    down, up = descendants(start), ancestors(end)
    if end not in down:
        return None
    between = (down & up) | {end}
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    nodes = [start] + sorted(between, key=order.__getitem__)
    inside = set(nodes)
    for n in nodes[1:]:
        info = n.meta.get(TAGS)
        if info is None:
            return None
        kind = info["kind"]
        ok = (kind in (ACT, QUANT) or (kind == NORM and info["sub"] == "batch_norm") or _is_pointwise_conv(n)
              or (kind in (OTHER, RESHAPE) and n.target in _POINTWISE_OTHER))
        if not ok:
            return None
        if any(a not in inside and a.op != "get_attr" for a in n.all_input_nodes):
            return None
    return nodes


class Chain:
    """Runs part of a bridge block on sampled positions, given as (N, C, 1, 1) tensors."""

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node]):
        self.gm, self.nodes = gm, nodes
        self.layer_name = {n: n.meta[TAGS]["name"] for n in nodes}

    def _arg(self, env, a):
        if isinstance(a, fx.Node):
            return env[a] if a in env else getattr_path(self.gm, a.target)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(env, v) for v in a)
        return a

    def run(self, value: torch.Tensor, after: fx.Node, until: fx.Node, decided: dict, input_of: bool = False):
        """Value at `until` (or at its input 0 when `input_of`) from `value` at `after`'s output.

        `decided` maps layer names to (quantized weight or None, {input index: spec}) applied on the way.
        """
        env = {after: value}
        started = False
        for node in self.nodes:
            if node is after:
                started = True
                continue
            if not started:
                continue
            if node is until and input_of:
                return env[node.args[0]]
            args = [self._arg(env, a) for a in node.args]
            kwargs = {k: self._arg(env, v) for k, v in node.kwargs.items()}
            weight, inputs = decided.get(self.layer_name[node], (None, {}))
            if weight is not None:
                args[1] = weight.reshape(args[1].shape)
            for idx, spec in inputs.items():
                args[idx] = fake_quant(args[idx], spec)
            out = node.target(*args, **kwargs)
            env[node] = out[0] if isinstance(out, (tuple, list)) and node.meta[TAGS]["kind"] == NORM else out
            if node is until:
                return env[node]
        raise ValueError(f"{until.name} does not follow {after.name} in the chain")


class ChainProblem:
    """A bridge-block layer scored at the block's output: layer output (+ bias) → rest of the block → objective."""

    def __init__(self, base: ConvLinearProblem, chain: Chain, node: fx.Node, end: fx.Node, samples: Samples):
        self.base, self.chain, self.node, self.end = base, chain, node, end
        self.layer = base.layer
        self.sides = base.sides
        self.target = samples.output
        self.g2 = samples.g2

    def evaluate(self, side, q, fixed) -> torch.Tensor:
        y = self.base.linear_out(side, q, fixed) + self.base.bias
        k, p, c = y.shape
        if self.node is not self.end:
            y = self.chain.run(y.reshape(k * p, c, 1, 1), self.node, self.end, {})
        return y.reshape(k, p, -1)


def chain_input(chain: Chain, start_problem: ConvLinearProblem, start_weight: torch.Tensor,
                start_input: torch.Tensor, node: fx.Node, decided: dict) -> torch.Tensor:
    """The sampled input of bridge layer `node` with the block's earlier layers quantized as `decided`."""
    y = start_problem.linear_out("input0", start_input[None], {"weight": start_weight})[0] + start_problem.bias
    x = chain.run(y.reshape(y.shape[0], -1, 1, 1), chain.nodes[0], node, decided, input_of=True)
    return x.reshape(x.shape[0], -1)


def uniform_spec(bits: int, granularity: str, scheme: str, axis: int) -> QuantSpec:
    return QuantSpec(bits=bits, granularity=granularity, scheme=scheme, axis=axis if granularity == "channel" else 0)
