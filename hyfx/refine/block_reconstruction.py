"""Block reconstruction with dropped quantization (BRECQ + QDrop), run after a recipe has chosen every scale.

AdaRound learns one layer's rounding at a time; the layers of a block (an MBConv, a MobileViT block with its
transformer) interact, and at 6 bits the best rounding of one layer depends on the rounding of the next. BRECQ
(Li et al., ICLR 2021) learns the rounding of all weights of a block at once against the block's FP32 output;
QDrop (Wei et al., ICLR 2022) learns the block's activation step sizes with them and, while training, lets each
activation element skip its quantizer with probability `drop`, so the weights are fitted to a flatter
neighbourhood of the quantized activations rather than to one noisy instance of them. Per block, in graph order:

    min over V, s   Σ_out ‖f_block(x̂_q; W̃(V), s) − f_block^FP32(x)‖²  +  λ Σ (1 − |2h(V) − 1|^β)

with x̂_q the block's inputs as the quantized model computes them (earlier blocks already reconstructed) and
the targets the FP32 model's values (asymmetric reconstruction, as hyfx's AdaRound). A quantizer belongs to
the block of the layer it quantizes (so a block's input quantizers are trained with it). Log2 / twin quantizers
and anything left in float stay as they are. The plan keeps every granularity, scheme and zero point; it gains
`weight_rounding` and new activation scales. A block whose loss on the calibration images did not fall is put
back as the recipe left it (round to nearest, its scales).

The README's block reconstruction section has what it measured on the real-weight hybrid.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.fx as fx
from tqdm import tqdm

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analysed
from hyfx.meta import TAGS
from hyfx.ops import QUANT, getattr_path, source_through, weight_arg
from hyfx.passes.insert_quant import insert_quant
from hyfx.quant.rounding import encode_offsets, offsets_from_codes
from hyfx.quant.spec import QuantPlan, QuantSpec
from hyfx.refine.activation_scales import QUANTIZE, learnable_activations, write_scales
from hyfx.refine.adaround import LearnedRounding, unrounded
from hyfx.search.sampling import calibration_images


class _Stream(fx.Interpreter):
    """A graph run over every calibration batch and kept where it stopped, so each block's inputs (and FP32
    targets) come from one pass through the graph instead of a re-run from the images per block.

    Only values a later node still reads are kept. Nodes that read no data (a weight's learned rounding) are
    recomputed where they are used, never kept: a block trained after the stream passed them changes them."""

    def __init__(self, gm: fx.GraphModule, images: list[torch.Tensor]):
        super().__init__(gm)
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.constant: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "get_attr" or (n.op in ("call_function", "call_method", "call_module")
                                      and all(a in self.constant for a in n.all_input_nodes)):
                self.constant.add(n)
        self.last_use = {n: max((self.index[u] for u in n.users), default=-1) for n in self.nodes}
        self.envs = [{} for _ in images]
        self.images = images
        self.position = 0

    def _value(self, n: fx.Node):
        if n in self.constant and n not in self.env:
            for a in n.all_input_nodes:
                self._value(a)
            self.env[n] = super().run_node(n)
        return self.env[n]

    def run_node(self, n: fx.Node):
        for a in n.all_input_nodes:
            self._value(a)
        return super().run_node(n)

    def advance(self, until: int, keep: set[fx.Node] = frozenset()) -> None:
        """Run every node before position `until`, freeing values no node at or after `until` reads."""
        for env, x in zip(self.envs, self.images, strict=True):
            self.env = env
            for n in self.nodes[self.position:until]:
                if n.op == "placeholder":
                    env[n] = x
                elif n.op != "output" and n not in self.constant:
                    env[n] = self.run_node(n)
            for n in [n for n in env if n in self.constant or (self.last_use[n] < until and n not in keep)]:
                del env[n]
        self.position = max(self.position, until)

    def take(self, nodes: list[fx.Node], until: int) -> list[torch.Tensor]:
        """The values of `nodes` over every batch, concatenated, after advancing to `until`."""
        self.advance(until, keep=set(nodes))
        source = self
        if not all(n in env for env in self.envs for n in nodes):
            # a value computed after `until` or freed before it (nodes of blocks interleaved): run afresh to it
            source = _Stream(self.module, self.images)
            source.advance(max(self.index[n] for n in nodes) + 1, keep=set(nodes))
        if not all(n in env for env in source.envs for n in nodes):
            raise HyfxError(f"block reconstruction cannot record {', '.join(n.name for n in nodes)}: a block input "
                            "computed from weights alone is not supported")
        return [torch.cat([env[n] for env in source.envs]) for n in nodes]


def _learnable_weights(qgm: fx.GraphModule, specs: dict[str, QuantSpec]) -> dict[str, str]:
    """Replace every uniform weight quantize → dequantize pair by a LearnedRounding submodule (in place).

    Returns {submodule name: layer}."""
    learned = {}
    for q in list(qgm.graph.nodes):
        info = q.meta.get(TAGS, {})
        if q.op != "call_function" or q.target not in QUANTIZE or info.get("role") != "weight":
            continue
        (dq,) = q.users
        layer = info["quantizes"]
        if specs[layer].kind != "uniform":
            continue
        name = f"_hyfx_rounding_{len(learned)}"
        qgm.add_submodule(name, LearnedRounding(getattr_path(qgm, q.args[0].target).detach(), specs[layer]))
        with qgm.graph.inserting_after(dq):
            w = qgm.graph.call_module(name, ())
        w.meta[TAGS] = info
        dq.replace_all_uses_with(w)
        qgm.graph.erase_node(dq)
        qgm.graph.erase_node(q)
        learned[name] = layer
    qgm.graph.eliminate_dead_code()
    qgm.recompile()
    return learned


def _block_of(node: fx.Node, hg: HybridGraph) -> str | None:
    info = node.meta.get(TAGS)
    if info is None:
        return None
    if "quantizes" in info:  # a quantizer, learned or not, goes with the layer it quantizes
        return hg.tags(info["quantizes"])["block"]
    return info["block"]


_SCALARS = (int, float, bool, torch.SymInt, torch.SymFloat)


def _shape_arithmetic(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, _SCALARS) or (isinstance(val, (list, tuple)) and bool(val)
                                         and all(isinstance(v, _SCALARS) for v in val))


def _subgraph(qgm: fx.GraphModule, members: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """The block as its own GraphModule over `qgm`'s parameters and submodules (shared, not copied).

    Returns (module, input nodes of qgm it takes in order, output nodes of qgm it returns in order). Shape
    arithmetic the block reads from outside (a batch size) is pulled in with it, so it follows the batch."""
    inside = set(members)

    def pull(n: fx.Node) -> None:
        if n in inside or n.op in ("placeholder", "get_attr") or not _shape_arithmetic(n):
            return
        for a in n.all_input_nodes:
            pull(a)
        inside.add(n)

    for n in members:
        for a in n.all_input_nodes:
            pull(a)
    order = [n for n in qgm.graph.nodes if n in inside]
    graph, env, inputs = fx.Graph(), {}, []
    for n in order:
        for a in n.all_input_nodes:
            if a in env:
                continue
            if a.op == "get_attr":
                env[a] = graph.get_attr(a.target)
            elif a not in inside:
                env[a] = graph.placeholder(f"in_{len(inputs)}")
                inputs.append(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(qgm, graph), inputs, outputs


def _fp_source(node: fx.Node) -> fx.Node:
    """The FP32 value a quantized-graph node stands for: through quantizers to what they quantize."""
    return source_through(node, lambda n: n.meta.get(TAGS, {}).get("kind") == QUANT)


def _loss(outs: tuple, targets: list[torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for out, target in zip(outs, targets, strict=True):
        err = (out - target) ** 2
        total = total + (err.sum(1 if err.dim() == 4 else -1) if err.dim() > 1 else err).mean()
    return total


def reconstruct_blocks(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, calib_loader: Iterable, iters: int = 500,
                       batch: int = 8, lr: float = 1e-2, scale_lr: float = 2e-3, drop: float = 0.5, reg: float = 0.01,
                       warmup: float = 0.2, seed: int = 0, max_batches: int | None = None,
                       progress: bool = True) -> QuantPlan:
    """A copy of `plan` with the rounding of every uniform weight and the step size of every uniform activation
    quantizer learned block by block (BRECQ with QDrop's dropped activation quantization).

    Bias corrections are dropped (measured for round-to-nearest: run `correct_bias` afterwards)."""
    if iters < 1:
        raise HyfxError(f"block reconstruction needs iters ≥ 1, got {iters}")
    if not 0 <= drop < 1:
        raise HyfxError(f"block reconstruction's drop probability must lie in [0, 1), got {drop}")
    hg = analysed(gm)
    plan, specs = unrounded(hg, plan)
    images = calibration_images(calib_loader, max_batches)
    qgm = insert_quant(hg.gm, plan)
    for p in qgm.parameters():
        p.requires_grad_(False)
    roundings = _learnable_weights(qgm, specs)
    scales = learnable_activations(qgm)
    if not roundings and not scales:
        raise HyfxError("the plan has no uniform weight or activation quantizer: there is nothing to reconstruct")
    trainable = set(roundings) | set(scales)
    blocks: dict[str, list[fx.Node]] = {}
    for n in qgm.graph.nodes:
        block = _block_of(n, hg)
        if block is not None:
            blocks.setdefault(block, []).append(n)
    qgm.eval()
    quant, fp = _Stream(qgm, images), _Stream(hg.gm, images)
    # where a block's computation starts: its first node that reads data (weights' nodes sit at the graph's top)
    starts = {b: min((quant.index[n] for n in ns if n not in quant.constant), default=len(quant.nodes))
              for b, ns in blocks.items()}
    todo = sorted(((b, ns) for b, ns in blocks.items() if any(n.op == "call_module" and n.target in trainable
                                                             for n in ns)), key=lambda item: starts[item[0]])
    start, report = time.perf_counter(), []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for block, members in tqdm(todo, desc="block reconstruction", disable=not progress):
            sub, inputs, outputs = _subgraph(qgm, members)
            sources = [fp.by_name[_fp_source(n).name] for n in outputs]
            with torch.no_grad():
                xs = quant.take(inputs, starts[block])
                targets = fp.take(sources, max(fp.index[n] for n in sources) + 1)
            mods = [qgm.get_submodule(n.target) for n in members if n.op == "call_module" and n.target in trainable]
            report.append([block, *_train(sub, mods, xs, targets, iters, batch, lr, scale_lr, drop, reg, warmup)])
    for name, layer in roundings.items():
        weight = getattr_path(hg.gm, weight_arg(hg.node(layer)).target).detach()
        codes = qgm.get_submodule(name).codes()
        plan.layers[layer].weight_rounding = encode_offsets(offsets_from_codes(weight, specs[layer], codes))
    write_scales(plan, qgm, scales)
    plan.meta["block_reconstruction"] = {
        "blocks": len(todo), "roundings": len(roundings), "activation_scales": len(scales), "iters": iters,
        "batch": batch, "drop": drop, "n_images": sum(x.shape[0] for x in images),
        "loss": report, "seconds": round(time.perf_counter() - start, 1)}
    return plan


def _train(sub: fx.GraphModule, mods: list[torch.nn.Module], xs: list[torch.Tensor], targets: list[torch.Tensor],
           iters: int, batch: int, lr: float, scale_lr: float, drop: float, reg: float, warmup: float) -> list[float]:
    """Adam on the block's rounding variables and log step sizes; returns the block loss (hard rounding, every
    quantizer in force) before and after: a block that did not improve is put back as it was."""
    roundings = [m for m in mods if isinstance(m, LearnedRounding)]
    scales = [m for m in mods if not isinstance(m, LearnedRounding)]
    groups = [{"params": [m.v for m in roundings], "lr": lr}] if roundings else []
    if scales:
        groups.append({"params": [m.log_scale for m in scales], "lr": scale_lr})
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    n = xs[0].shape[0]

    def evaluate() -> float:
        with torch.no_grad():
            return sum(_loss(sub(*(x[i:i + batch] for x in xs)), [t[i:i + batch] for t in targets]).item()
                       for i in range(0, n, batch)) * batch / n

    before = evaluate()
    initial = [p.detach().clone() for p in params]
    for m in mods:
        m.train()
        m.drop = drop if m in scales else 0.0
    start_reg = int(warmup * iters)
    for it in range(iters):
        idx = torch.randperm(n)[:batch]
        loss = _loss(sub(*(x[idx] for x in xs)), [t[idx] for t in targets])
        if it >= start_reg and roundings:
            beta = 20 + (2 - 20) * (it - start_reg) / max(1, iters - start_reg - 1)
            loss = loss + reg * sum(m.regulariser(beta) for m in roundings)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    for m in mods:
        m.eval()
        m.drop = 0.0
    for p in params:
        p.requires_grad_(False)
    after = evaluate()
    if not after < before:  # no better (or diverged to NaN): the block keeps nearest rounding and the recipe's scales
        with torch.no_grad():
            for p, value in zip(params, initial, strict=True):
                p.copy_(value)
        after = before
    return [round(before, 4), round(after, 4)]
