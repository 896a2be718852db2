"""Reshape / Transpose chains rewritten into the transposes ONNX Runtime's CPU kernels run fast.

MobileViT's unfold and fold are chains like Reshape → Transpose(0, 2, 1, 3) → Reshape → Transpose(0, 3, 2, 1)
→ Reshape. ORT's Transpose is fast when it copies whole innermost rows or transposes the two innermost axes
of a large enough tensor, and slow otherwise: element by element, or split across threads into work items
too small to pay for them. Measured with ORT 1.32 on this CPU (2 threads, bs1, mobilevit_xxs shapes): the
unfold's first transpose (innermost axis of 2 elements) 29 µs in float but 696 µs on uint8, which is where the
int8 lowering runs it (ORT moves DequantizeLinear forward through Reshape / Transpose, onnxruntime#7404); the
second, (0, 3, 2, 1), ~300 µs in either type; the same data movement as a 2-D transpose [64, 1024] and a
transpose that copies rows of 64 channels, 30 µs. MobileViT v2's unfold has no such split (its innermost
axes are 2 and 16 elements): it is left alone.

Every chain of Reshape / Transpose / Identity (one consumer per intermediate, constant shapes) is a permutation
of the elements. `fast_transposes` recovers it as a permutation of merged axes (Reshape → one Transpose →
Reshape), checks the recovery on index arrays for two batch sizes, and writes it back as at most two
transposes, a 2-D transpose of the innermost axes and a copy of whole rows. A chain is replaced only when the
new one has fewer transposes of the slow kind (`is_slow`). Pure data movement: outputs are bitwise equal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hyfx.backends.onnx_graph import drop_unused_initializers

MOVEMENT = ("Reshape", "Transpose", "Identity")
MIN_BLOCK = 16  # innermost elements a transpose must keep in place to copy by rows instead of by element


def _perm(node: onnx.NodeProto, rank: int) -> list[int]:
    attr = next((a for a in node.attribute if a.name == "perm"), None)
    return list(attr.ints) if attr is not None else list(range(rank))[::-1]


def _reshape_target(shape: np.ndarray, current: tuple[int, ...], allowzero: bool) -> list[int]:
    target = [int(d) for d in shape]
    if not allowzero:
        target = [current[i] if d == 0 else d for i, d in enumerate(target)]
    return target


def _run(chain: list[onnx.NodeProto], x: np.ndarray, constants: dict[str, np.ndarray]) -> np.ndarray:
    """The chain applied to an array (numpy's reshape and transpose have ONNX's semantics)."""
    for node in chain:
        if node.op_type == "Reshape":
            allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
            x = x.reshape(_reshape_target(constants[node.input[1]], x.shape, allowzero))
        elif node.op_type == "Transpose":
            x = x.transpose(_perm(node, x.ndim))
    return x


def axis_permutation(index: np.ndarray) -> tuple[list[int], list[int]] | None:
    """(sizes, perm) with index == arange(prod(sizes)).reshape(sizes).transpose(perm).reshape(index.shape),
    axes merged where they stay adjacent; None when the element mapping is no permutation of axes."""
    flat = index.ravel()
    n = flat.size
    groups: list[tuple[int, int]] = []  # (size, input stride) of the output's axes, innermost first
    step = 1
    while step < n:
        stride = int(flat[step] - flat[0])
        size = 1
        while (size + 1) * step <= n and flat[size * step] - flat[0] == size * stride:
            size += 1
        if size == 1 or stride <= 0 or n % (size * step):
            return None
        groups.append((size, stride))
        step *= size
    by_stride = sorted(groups, key=lambda g: -g[1])
    sizes = [g[0] for g in by_stride]
    expected = 1
    for size, stride in reversed(by_stride):
        if stride != expected:
            return None
        expected *= size
    perm = [by_stride.index(g) for g in reversed(groups)]
    rebuilt = np.arange(n).reshape(sizes or [1]).transpose(perm or [0]).ravel()
    return (sizes, perm) if np.array_equal(rebuilt, flat) else None


def merged(sizes: list[int], perm: list[int]) -> tuple[list[int], list[int]]:
    """The same permutation with input axes that stay adjacent in the output merged into one."""
    groups: list[list[int]] = []
    for axis in perm:
        if groups and groups[-1][-1] + 1 == axis:
            groups[-1].append(axis)
        else:
            groups.append([axis])
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    new_sizes = [int(np.prod([sizes[a] for a in groups[g]])) for g in order]
    return new_sizes, [order.index(g) for g in range(len(groups))]


def is_slow(sizes: list[int], perm: list[int]) -> bool:
    """ORT copies this transpose element by element, or splits it into work items too small to pay for its
    threads: fast are only copies of whole innermost rows of ≥ MIN_BLOCK elements and 2-D transposes of the
    two innermost axes when both hold ≥ MIN_BLOCK (measured: [2048, 16, 2] → (0, 2, 1) takes 5.8 ms at 2
    threads, [64, 1024] → (1, 0) 14-44 µs)."""
    sizes, perm = merged(sizes, perm)
    n = len(perm)
    if n <= 1:
        return False
    if perm[-1] == n - 1:
        return sizes[-1] < MIN_BLOCK
    inner_swap = perm == [*range(n - 2), n - 1, n - 2]
    return not (inner_swap and min(sizes[-2:]) >= MIN_BLOCK)


def fast_steps(sizes: list[int], perm: list[int]) -> list[tuple[list[int], list[int]]]:
    """The permutation as at most two transposes ((sizes, perm) each, merged): one that moves the output's
    innermost axis to the end (or the input's innermost axis into place) and one that copies whole rows of
    it, ordered so the rows are the larger of the two candidates."""
    sizes, perm = merged(sizes, perm)
    n = len(perm)
    if n <= 1:
        return []
    if not is_slow(sizes, perm):
        return [(sizes, perm)]
    last = perm[-1]
    if sizes[last] >= sizes[n - 1]:  # move the output's innermost axis to the end, then permute whole rows
        first = [a for a in range(n) if a != last] + [last]
    else:  # permute whole rows of the input's innermost axis, then move it into place
        first = [a for a in perm if a != n - 1] + [n - 1]
    second = [first.index(a) for a in perm]
    steps = []
    for step_perm, step_sizes in ((first, sizes), (second, [sizes[a] for a in first])):
        s, p = merged(step_sizes, step_perm)
        if len(p) > 1:
            steps.append((s, p))
    return steps


def _chains(nodes: list[onnx.NodeProto], outputs: set[str], constants: dict[str, np.ndarray]) -> list[list[int]]:
    """Maximal Reshape / Transpose / Identity chains holding a transpose, as node indices."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    users: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            users.setdefault(name, []).append(i)

    def movable(i: int) -> bool:
        return nodes[i].op_type in MOVEMENT and (nodes[i].op_type != "Reshape" or nodes[i].input[1] in constants)

    def successor(i: int) -> int | None:
        after = users.get(nodes[i].output[0], [])
        return after[0] if nodes[i].output[0] not in outputs and len(after) == 1 and movable(after[0]) else None

    chains = []
    for i in range(len(nodes)):
        before = producer.get(nodes[i].input[0]) if nodes[i].input else None
        if not movable(i) or (before is not None and movable(before) and successor(before) == i):
            continue  # not the start of a chain
        chain = [i]
        while (nxt := successor(chain[-1])) is not None:
            chain.append(nxt)
        if any(nodes[j].op_type == "Transpose" for j in chain):
            chains.append(chain)
    return chains


def _dim(dim: int | str | None, batch: int) -> int | None:
    """A dimension for a batch size: ints as they are, the symbolic batch ("batch", "4*batch") evaluated."""
    if isinstance(dim, int):
        return dim if dim > 0 else None
    factors = str(dim).split("*") if dim else []
    numbers = [int(f) for f in factors if f.isdigit()]
    if len(factors) - len(numbers) != 1:
        return None
    return int(np.prod(numbers)) * batch


def _input_shape(name: str, shapes: dict[str, list], batch: int) -> tuple[int, ...] | None:
    dims = shapes.get(name)
    if dims is None or len({d for d in dims if not isinstance(d, int)}) > 1:
        return None
    shape = tuple(_dim(d, batch) for d in dims)
    return None if None in shape else shape


def _value_shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in v.type.tensor_type.shape.dim]
    return shapes


@dataclass
class _Recovered:
    sizes: list[int]  # the input's merged axes
    perm: list[int]
    shape: tuple[int, ...]  # the chain's input shape at batch 1
    out: list[int]  # the chain's output shape, -1 on the batch dimension


def _recover(chain: list[onnx.NodeProto], shapes: dict, constants: dict) -> _Recovered | None:
    """The permutation a chain applies, found at batch 1 and checked at batch 2 (batch outermost throughout)."""
    found = []
    for batch in (1, 2):
        shape = _input_shape(chain[0].input[0], shapes, batch)
        if shape is None:
            return None
        try:
            found.append((shape, _run(chain, np.arange(int(np.prod(shape))).reshape(shape), constants)))
        except ValueError:
            return None
    (shape1, index1), (shape2, index2) = found
    if shape1[1:] != shape2[1:] or index1.ndim != index2.ndim:
        return None  # the batch is not in the leading input dimension
    varying = [i for i, (a, b) in enumerate(zip(index1.shape, index2.shape, strict=True)) if a != b]
    if len(varying) != (1 if shape1 != shape2 else 0):
        return None  # the batch is not in exactly one output dimension
    n = index1.size
    if shape1 != shape2 and not np.array_equal(index2.ravel(), np.concatenate([index1.ravel(), index1.ravel() + n])):
        return None  # batch not the outermost dimension of the output
    found_perm = axis_permutation(index1)
    if found_perm is None:
        return None
    out = [-1 if i in varying else d for i, d in enumerate(index1.shape)]
    return _Recovered(*found_perm, shape1, out)


def _slow_count(chain: list[onnx.NodeProto], shape: tuple[int, ...], constants: dict) -> tuple[int, int]:
    """(slow transposes, transposes) of a chain run on `shape`."""
    x, slow, total = np.empty(shape), 0, 0
    for node in chain:
        if node.op_type == "Transpose":
            slow += is_slow(list(x.shape), _perm(node, x.ndim))
            total += 1
        x = _run([node], x, constants)
    return slow, total


def fast_transposes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with its slow Reshape / Transpose chains rewritten (see the module docstring), and the
    number of chains rewritten."""
    model = copy.deepcopy(model)
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    shapes = _value_shapes(model)
    nodes = list(graph.node)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for k, indices in enumerate(_chains(nodes, {o.name for o in graph.output}, constants)):
        chain = [nodes[i] for i in indices]
        found = _recover(chain, shapes, constants)
        if found is None:
            continue
        steps = fast_steps(found.sizes, found.perm)
        if _slow_count(chain, found.shape, constants) <= (sum(is_slow(s, p) for s, p in steps), len(steps)):
            continue
        replaced[indices[0]] = _emit(graph, chain, steps, -1 in found.out, found.out, f"hyfx_layout{k}")
        replaced.update({i: [] for i in indices[1:]})
    if replaced:
        rewritten = [new for i, n in enumerate(nodes) for new in replaced.get(i, [n])]
        del graph.node[:]
        graph.node.extend(rewritten)
        drop_unused_initializers(model)
        live = {name for n in graph.node for name in (*n.input, *n.output)}
        infos = [v for v in graph.value_info if v.name in live]
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return model, sum(1 for v in replaced.values() if v)


def _emit(graph: onnx.GraphProto, chain: list[onnx.NodeProto], steps: list, batched: bool, final_shape: list[int],
          prefix: str) -> list[onnx.NodeProto]:
    nodes: list[onnx.NodeProto] = []
    current = chain[0].input[0]
    lead = [-1] if batched else []
    offset = 1 if batched else 0

    def reshape(target: list[int], name: str, output: str | None = None) -> None:
        nonlocal current
        const = numpy_helper.from_array(np.array(target, dtype=np.int64), f"{prefix}_{name}_shape")
        graph.initializer.append(const)
        out = output or f"{prefix}_{name}"
        nodes.append(helper.make_node("Reshape", [current, const.name], [out], name=f"{prefix}/{name}"))
        current = out

    for i, (sizes, perm) in enumerate(steps):
        reshape(lead + sizes, f"view{i}")
        out = f"{prefix}_t{i}"
        nodes.append(helper.make_node("Transpose", [current], [out], name=f"{prefix}/transpose{i}",
                                      perm=list(range(offset)) + [p + offset for p in perm]))
        current = out
    reshape(final_shape, "out", output=chain[-1].output[0])
    return nodes
