"""Which graph targets are which kind of operation, for both capture paths.

torch.export graphs hold ATen overloads; the torch.fx fallback holds torch / functional callables,
method names, and leaf modules. Every pass asks these tables rather than matching targets itself.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from hyfx.meta import EXAMPLE_SHAPE, TAGS

aten = torch.ops.aten

CONV = "conv"
LINEAR = "linear"
MATMUL = "matmul"
SOFTMAX = "softmax"
NORM = "norm"
ACT = "act"
RESHAPE = "reshape"
ATTENTION = "attention"  # a fused SDPA node, before decomposition
QUANT = "quant"
OTHER = "other"

_TARGETS: dict[object, tuple[str, str | None]] = {}


def _register(kind: str, sub: str | None, *targets: object) -> None:
    for target in targets:
        _TARGETS[target] = (kind, sub)


_register(CONV, "conv2d", aten.conv2d.default, aten.convolution.default, F.conv2d, torch.conv2d)
_register(CONV, "conv1d", aten.conv1d.default, F.conv1d, torch.conv1d)
_register(LINEAR, "linear", aten.linear.default, F.linear, torch._C._nn.linear)
_register(MATMUL, "matmul", aten.matmul.default, aten.bmm.default, aten.mm.default, torch.matmul, torch.bmm,
          operator.matmul, "matmul", "bmm")
_register(SOFTMAX, "softmax", aten.softmax.int, aten._softmax.default, F.softmax, torch.softmax, "softmax")
_register(NORM, "layer_norm", aten.layer_norm.default, F.layer_norm)
_register(NORM, "group_norm", aten.group_norm.default, F.group_norm)
_register(NORM, "batch_norm", aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
          F.batch_norm)
_register(ATTENTION, "sdpa", aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
for _name in ("relu", "relu_", "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "sigmoid", "sigmoid_",
              "hardsigmoid", "hardsigmoid_", "tanh", "tanh_", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_",
              "relu6", "elu", "mish", "mish_"):
    for _ns in (aten,):
        _packet = getattr(_ns, _name, None)
        if _packet is not None:
            _register(ACT, _name.rstrip("_"), *[getattr(_packet, o) for o in _packet.overloads()])
    if hasattr(F, _name):
        _register(ACT, _name.rstrip("_"), getattr(F, _name))
    if hasattr(torch, _name):
        _register(ACT, _name.rstrip("_"), getattr(torch, _name))
    _register(ACT, _name.rstrip("_"), _name)
for _name in ("view", "reshape", "permute", "transpose", "flatten", "unflatten", "unfold", "squeeze", "unsqueeze",
              "expand", "contiguous", "unbind", "split", "chunk", "t", "_unsafe_view", "clone", "fold", "im2col",
              "col2im", "pixel_shuffle", "pixel_unshuffle"):
    _packet = getattr(aten, _name, None)
    if _packet is not None:
        _register(RESHAPE, _name, *[getattr(_packet, o) for o in _packet.overloads()])
    for _fn in (getattr(torch, _name, None), getattr(F, _name, None)):
        if _fn is not None:
            _register(RESHAPE, _name, _fn)
    _register(RESHAPE, _name, _name)
_register(RESHAPE, "getitem", operator.getitem)

_MODULE_KINDS: list[tuple[type, str, str]] = [
    (torch.nn.Conv2d, CONV, "conv2d"),
    (torch.nn.Conv1d, CONV, "conv1d"),
    (torch.nn.Linear, LINEAR, "linear"),
    (torch.nn.LayerNorm, NORM, "layer_norm"),
    (torch.nn.GroupNorm, NORM, "group_norm"),
    (torch.nn.modules.batchnorm._BatchNorm, NORM, "batch_norm"),
    (torch.nn.Softmax, SOFTMAX, "softmax"),
]


def op_kind(node: fx.Node, gm: fx.GraphModule | None = None) -> tuple[str, str | None]:
    """(kind, sub-kind) of a node; `gm` lets leaf modules (call_module) be classified by type."""
    if node.op in ("call_function", "call_method"):
        if getattr(node.target, "namespace", None) == "quantized_decomposed" or str(node.target).startswith("hyfx."):
            return QUANT, str(node.target)
        try:
            return _TARGETS.get(node.target, (OTHER, None))
        except TypeError:  # unhashable target
            return OTHER, None
    if node.op == "call_module" and gm is not None:
        module = gm.get_submodule(node.target)
        for cls, kind, sub in _MODULE_KINDS:
            if isinstance(module, cls):
                return kind, sub
        return OTHER, type(module).__name__
    return OTHER, None


def weight_arg(node: fx.Node) -> fx.Node | None:
    """The get_attr node feeding a conv/linear's weight (args[1]), if the weight is a graph constant."""
    if node.op != "call_function" or len(node.args) < 2:
        return None
    weight = node.args[1]
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return weight
    return None


def getattr_path(module: torch.nn.Module, target: str) -> torch.Tensor:
    """The attribute a get_attr node's dotted target names (a parameter or buffer of a submodule)."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def sole_batchnorm(node: fx.Node) -> fx.Node | None:
    """The inference `aten.batch_norm` that is `node`'s only user (a conv's BN, foldable into it), or None."""
    users = list(node.users)
    if len(users) == 1 and users[0].target is aten.batch_norm.default and not users[0].args[5]:
        return users[0]
    return None


def batchnorm_factor(gm: fx.GraphModule, bn: fx.Node) -> torch.Tensor | None:
    """γ / sqrt(var + eps) per channel of an inference `aten.batch_norm` node whose γ and var are graph
    constants (no γ: 1), or None: the factor folding multiplies the preceding conv's weights by."""
    gamma, var = bn.args[1], bn.args[4]
    if not isinstance(var, fx.Node) or var.op != "get_attr" or \
            (gamma is not None and (not isinstance(gamma, fx.Node) or gamma.op != "get_attr")):
        return None
    factor = torch.rsqrt(getattr_path(gm, var.target).detach() + float(bn.args[7]))
    return factor * getattr_path(gm, gamma.target).detach() if gamma is not None else factor


def is_depthwise(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A convolution with one input and one output channel per group (weight (C, 1, kh, kw) on C channels):
    int8 runtimes run it with a direct kernel rather than a GEMM."""
    weight = weight_arg(node)
    x = node.args[0] if node.args else None
    if weight is None or not isinstance(x, fx.Node):
        return False
    shape = tuple(getattr_path(gm, weight.target).shape)
    in_shape = node_shape(x)
    return len(shape) == 4 and shape[1] == 1 and in_shape is not None and len(in_shape) == 4 and in_shape[1] == shape[0]


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """[(path, class name), ...] outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        if path.startswith("_empty_nn_module_stack"):  # export's placeholder for nodes of no module
            continue
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        out.append((path, name))
    if node.op == "call_module" and not node.target.startswith("_"):
        out.append((node.target, type(node.graph.owning_module.get_submodule(node.target)).__name__))
    return out


def example_shape(gm: fx.GraphModule) -> tuple[int, ...] | None:
    return gm.meta.get(EXAMPLE_SHAPE)


def annotate_shapes(gm: fx.GraphModule) -> fx.GraphModule:
    """Record each node's output shape in node.meta['tensor_meta'] by running zeros of the example shape."""
    shape = example_shape(gm)
    if shape is None:
        raise ValueError("graph has no recorded example input shape; capture it with hyfx.capture")
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(shape))
    return gm


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """Inputs an in-place op writes to (hardtanh_, silu_, add_ ...); captured graphs keep timm's in-place acts."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for arg, value in zip(schema.arguments, node.args, strict=False):
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
            out.append(value)
    return out


def out_of_place(node: fx.Node):
    """The functional overload of an in-place aten op (aten.hardtanh_.default → aten.hardtanh.default), or None."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.name.endswith("_"):
        return None
    namespace, _, name = schema.name.partition("::")
    packet = getattr(getattr(torch.ops, namespace, None), name[:-1], None)
    return getattr(packet, schema.overload_name or "default", None) if packet is not None else None


VALUE_PRESERVING = (aten.dropout.default, aten.clone.default, aten.alias.default, aten.split_with_sizes.default,
                    aten.split.Tensor, aten.chunk.default, aten.slice.Tensor)  # beyond RESHAPE-kind nodes


def moves_values(node: fx.Node) -> bool:
    """Whether `node` only moves or selects its first input's values (reshapes, transposes, splits, dropout)."""
    return node.op == "call_function" and (node.meta.get(TAGS, {}).get("kind") == RESHAPE
                                           or node.target in VALUE_PRESERVING)


def source_through(node: fx.Node, through: Callable[[fx.Node], bool] = moves_values) -> fx.Node:
    """The node that computed `node`'s values: back through every node `through` accepts, along first inputs."""
    while through(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node `node` depends on, transitively."""
    return _closure(node.all_input_nodes, lambda n: n.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that depends on `node`, transitively."""
    return _closure(node.users, lambda n: n.users)


def _closure(start, step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(step(n))
    return seen
