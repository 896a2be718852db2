"""One pass over the calibration images that caches what a per-layer scale search needs.

For every requested layer it keeps a small sample of rows (conv output positions with their input patches,
token rows, attention rows, norm/softmax rows), the FP32 output there, and, for Hessian-guided searches, the
squared gradient of the task loss at the output (the diagonal Hessian approximation of PTQ4ViT / Q-HyViT).
Per-channel ranges of every activation input are taken over *all* calibration data, not only the sample, so
candidate scale grids cover the real extremes; the ranges of the two halves of the batches are kept too, so a
search can check that a choice made from one half's ranges holds on the other (per-channel activation ranges of
sparse channels do not generalise from a few dozen images).

Task loss: the cross-entropy with the FP32 model's own top-1 class as label. The loss the papers name,
CE(quantized output, FP32 output) with the soft FP32 distribution as target, has gradient softmax(z) - p = 0 at
the FP32 point, so on the FP32 graph it would weight every error by zero; the hard FP32 prediction gives the
empirical Fisher (whose expectation over labels drawn from p is the true Fisher, i.e. the Hessian of that KL).

Rows are drawn with probability proportional to their gradient mass Σ_c g², with replacement, and reweighted
by the inverse probability, so the sampled objective is an unbiased estimate of the objective over all data
while spending the samples where errors matter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from hyfx.errors import HyfxError
from hyfx.meta import TAGS
from hyfx.ops import mutated_args, out_of_place
from hyfx.quant.calibrate import batches

aten = torch.ops.aten
_CONVS = (aten.conv2d.default, aten.convolution.default)


@dataclass
class Request:
    """What to sample for one layer.

    kind: "conv" | "linear" | "matmul" | "rows" (softmax / layer norm / batch norm rows) | "images" (group norm).
    `objective` is the node whose output the search reconstructs (the layer itself, or the end of its
    bridge block); for "conv" its output grid must match the layer's.
    """

    layer: str
    node: fx.Node
    kind: str
    objective: fx.Node | None = None
    key: str = ""  # name of the result; the layer name unless given

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = self.node
        self.key = self.key or self.layer


@dataclass
class Samples:
    inputs: list[torch.Tensor]  # sampled activation inputs (conv patches, rows, attention slices)
    output: torch.Tensor  # FP32 objective output at the sampled rows
    g2: torch.Tensor | None  # squared gradients (with importance weights), same shape as output
    ranges: list[tuple[torch.Tensor, torch.Tensor]]  # per input: per-channel (lo, hi) over all calibration data
    rank: list[int] = field(default_factory=list)  # rank of each input tensor in the graph
    halves: list[tuple | None] = field(default_factory=list)  # per input: ranges of even / odd batches, or None


def calibration_images(loader: Iterable, max_batches: int | None = None) -> list[torch.Tensor]:
    images = [x.detach().float() for x in batches(loader, max_batches)]
    if not images:
        raise HyfxError("the calibration loader is empty: pass at least one calibration image")
    if len(images) == 1 and len(images[0]) > 1:  # two batches at least, so ranges can be cross-checked
        images = list(images[0].chunk(2))
    return images


def conv_geometry(node: fx.Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """(stride, padding, dilation, groups) of an aten 2-D convolution node."""
    args = list(node.args) + [None] * 9
    if node.target == aten.convolution.default:
        if args[6]:
            raise HyfxError(f"transposed convolution {node.name} is not supported by the scale search")
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
        stride = stride if stride is not None else node.kwargs.get("stride", (1, 1))
        padding = padding if padding is not None else node.kwargs.get("padding", (0, 0))
        dilation = dilation if dilation is not None else node.kwargs.get("dilation", (1, 1))
        groups = groups if groups is not None else node.kwargs.get("groups", 1)

    def pair(v) -> tuple[int, int]:
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return (int(v[0]), int(v[-1]))

    return pair(stride), pair(padding), pair(dilation), int(groups)


def conv_patches(x: torch.Tensor, b: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, kernel: tuple[int, int],
                 stride, padding, dilation) -> torch.Tensor:
    """The receptive fields of output positions (b, oy, ox) as rows of (Cin·kh·kw), the weight's flattening order."""
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    ys = (oy * stride[0])[:, None] + torch.arange(kernel[0]) * dilation[0]
    xs = (ox * stride[1])[:, None] + torch.arange(kernel[1]) * dilation[1]
    patch = xp[b[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (P, kh, kw, Cin)
    return patch.permute(0, 3, 1, 2).reshape(len(b), -1)


def channel_range(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach()
    if axis is None:
        return x.min().reshape(1), x.max().reshape(1)
    dims = tuple(d for d in range(x.dim()) if d != axis % x.dim())
    return x.amin(dims), x.amax(dims)


def _draw(weight: torch.Tensor | None, n: int, total: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of n rows out of `total`, and each drawn row's inverse-probability factor."""
    if n >= total:  # everything fits: every row once, exactly
        return torch.arange(total), torch.ones(total)
    if weight is not None:
        mass = float(weight.sum())
        if mass > 0:
            idx = torch.multinomial(weight, n, replacement=True, generator=gen)
            return idx, mass / (n * weight[idx])
    idx = torch.randperm(total, generator=gen)[:n]
    return idx, torch.full((n,), total / n)


class _Recorder(fx.Interpreter):
    """Keeps the values of the named nodes as they were computed.

    An in-place op (timm's BatchNormAct runs hardtanh_ / silu_ on the norm's output) would overwrite a kept
    value, and gradients taken with respect to it would be those of the mutated tensor; such an op runs out of
    place instead, and the mutated input's later users read its result, as they would in eager mode.
    """

    def __init__(self, gm: fx.GraphModule, keep: set[str]):
        super().__init__(gm)
        self.keep = keep
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        kept = [a for a in mutated_args(n) if a.name in self.keep]
        functional = out_of_place(n) if kept else None
        if functional is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = functional(*args, **kwargs)
            for a in kept:
                self.env[a] = out
        else:
            out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out
        return out


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


class _Accumulator:
    def __init__(self, request: Request, n_inputs: int):
        self.request = request
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(n_inputs)]
        self.output: list[torch.Tensor] = []
        self.g2: list[torch.Tensor] = []
        self.batch_ranges: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_inputs)]
        self.rank: list[int] = [0] * n_inputs

    def add_range(self, i: int, x: torch.Tensor, axis: int | None) -> None:
        self.rank[i] = x.dim()
        self.batch_ranges[i].append(channel_range(x, axis))

    def result(self, hessian: bool, damping: float) -> Samples:
        g2 = torch.cat(self.g2) if hessian else None
        if g2 is not None:
            mean = float(g2.mean())
            # A channel whose gradient is zero on every sampled row (its ReLU never fires on the calibration
            # images) would score all candidates 0 and keep the first, smallest scale; the damping term ranks
            # those by plain output error instead. No gradient at all: plain output MSE.
            g2 = g2 + damping * mean if mean > 0 else torch.ones_like(g2)
        ranges = [_union(r) for r in self.batch_ranges]
        halves = [(_union(r[0::2]), _union(r[1::2])) if len(r) > 1 else None for r in self.batch_ranges]
        return Samples([torch.cat(v) for v in self.inputs], torch.cat(self.output), g2, ranges, self.rank, halves)


def _union(ranges: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([r[0] for r in ranges]).amin(0), torch.stack([r[1] for r in ranges]).amax(0)


def _inputs_of(request: Request) -> list[fx.Node]:
    node = request.node
    if request.kind == "matmul":
        return _tensor_args(node)[:2]
    if request.kind == "conv":
        return [node.args[0], node.args[1]]  # the weight only for its kernel size
    return [node.args[0]]


def sample_layers(gm: fx.GraphModule, requests: list[Request], images: list[torch.Tensor], samples: int = 256,
                  hessian: bool = True, seed: int = 0, rows_per_slice: int = 8, damping: float = 0.01,
                  progress: bool = True) -> dict[str, Samples]:
    """Run the FP32 graph over `images` once (forward, and backward when `hessian`) and sample every request.

    `samples` is the number of rows kept per layer over all images (split over batches by batch size);
    `damping` × the layer's mean squared gradient is added to every squared gradient.
    """
    keep = set()
    for r in requests:
        keep.add(r.node.name)
        keep.add(r.objective.name)
        keep.update(n.name for n in _inputs_of(r))
    grad_names = sorted({r.objective.name for r in requests})
    accs = {r.key: _Accumulator(r, 2 if r.kind == "matmul" else 1) for r in requests}
    total = sum(len(x) for x in images)
    gen = torch.Generator().manual_seed(seed)
    recorder = _Recorder(gm, keep)
    for x in tqdm(images, desc="sampling layers", disable=not progress, leave=False):
        recorder.values = {}
        with torch.set_grad_enabled(hessian):
            inp = x.clone().requires_grad_(hessian)
            out = recorder.run(inp)
            grads: dict[str, torch.Tensor] = {}
            if hessian:
                logits = out[0] if isinstance(out, (tuple, list)) else out
                if logits.dim() != 2:
                    raise HyfxError("Hessian-guided search needs a classifier (N × classes logits); "
                                    f"this graph returns shape {tuple(logits.shape)}")
                loss = F.cross_entropy(logits, logits.detach().argmax(1), reduction="sum")
                tensors = [recorder.values[name] for name in grad_names]
                found = torch.autograd.grad(loss, tensors, allow_unused=True)
                grads = {name: (g if g is not None else torch.zeros_like(t)).detach()
                         for name, g, t in zip(grad_names, found, tensors, strict=True)}
        values = {k: v.detach() for k, v in recorder.values.items()}
        n = max(1, round(samples * len(x) / total))
        for acc in accs.values():
            _sample(acc, values, grads, n, gen, rows_per_slice)
        del recorder.values
    return {key: acc.result(hessian, damping) for key, acc in accs.items()}


def _row_weight(g: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return None if g is None else g.reshape(rows, -1).square().sum(1)


def _sample(acc: _Accumulator, values: dict, grads: dict, n: int, gen: torch.Generator, rows_per_slice: int) -> None:
    r = acc.request
    out = values[r.objective.name]
    g = grads.get(r.objective.name)
    ins = [values[a.name] for a in _inputs_of(r)]
    if r.kind == "conv":
        stride, padding, dilation, _ = conv_geometry(r.node)
        kernel = tuple(ins[1].shape[-2:])
        bsz, _, h, w = out.shape
        if values[r.node.name].shape[-2:] != out.shape[-2:]:
            raise HyfxError(f"{r.layer}: objective {r.objective.name} is not on the layer's output grid")
        idx, factor = _draw(None if g is None else g.square().sum(1).flatten(), n, bsz * h * w, gen)
        b, rest = idx // (h * w), idx % (h * w)
        oy, ox = rest // w, rest % w
        acc.inputs[0].append(conv_patches(ins[0], b, oy, ox, kernel, stride, padding, dilation))
        acc.add_range(0, ins[0], 1)
        acc.output.append(out[b, :, oy, ox])
        if g is not None:
            acc.g2.append(g[b, :, oy, ox].square() * factor[:, None])
    elif r.kind in ("linear", "rows"):
        axis = 1 if r.kind == "rows" and _is_batch_norm(r.node) else -1
        x, o = ins[0], out
        gg = g
        if axis == 1:  # batch norm: channel rows at every position
            x, o = x.movedim(1, -1), o.movedim(1, -1)
            gg = g.movedim(1, -1) if g is not None else None
        width = _row_width(r, x)
        rows_x = x.reshape(-1, *width)
        rows_o = o.reshape(rows_x.shape[0], -1)
        idx, factor = _draw(_row_weight(gg, rows_x.shape[0]), n, rows_x.shape[0], gen)
        acc.inputs[0].append(rows_x[idx])
        acc.add_range(0, ins[0], _range_axis(r, ins[0]))
        acc.output.append(rows_o[idx])
        if gg is not None:
            acc.g2.append(gg.reshape(rows_x.shape[0], -1)[idx].square() * factor[:, None])
    elif r.kind == "images":
        idx, factor = _draw(_row_weight(g, out.shape[0]), max(1, n // 64), out.shape[0], gen)
        acc.inputs[0].append(ins[0][idx])
        acc.add_range(0, ins[0], 1)
        acc.output.append(out[idx].reshape(len(idx), -1))
        if g is not None:
            acc.g2.append(g[idx].reshape(len(idx), -1).square() * factor[:, None])
    elif r.kind == "matmul":
        a, bm = ins
        m, k = a.shape[-2:]
        nn = bm.shape[-1]
        a3 = a.reshape(-1, m, k)
        b3 = bm.expand(*a.shape[:-2], k, nn).reshape(-1, k, nn)
        o3 = out.reshape(-1, m, nn)
        g3 = g.reshape(-1, m, nn) if g is not None else None
        per = min(rows_per_slice, m)
        slices = max(1, n // per)
        sw = None if g3 is None else g3.square().sum((1, 2))
        sidx, sfac = _draw(sw, slices, a3.shape[0], gen)
        rows, facs = [], []
        for s in sidx.tolist():
            ridx, rfac = _draw(None if g3 is None else g3[s].square().sum(1), per, m, gen)
            rows.append(ridx)
            facs.append(rfac)
        rows_t = torch.stack(rows)  # (slices, per)
        # sampling a slice ∝ its mass and a row ∝ its share of it gives the row the product of both factors
        fac = sfac[:, None] * torch.stack(facs)
        take = sidx[:, None].expand_as(rows_t)
        acc.inputs[0].append(a3[take, rows_t])
        acc.inputs[1].append(b3[sidx])
        acc.add_range(0, a, None)
        acc.add_range(1, bm, None)
        acc.output.append(o3[take, rows_t])
        if g3 is not None:
            acc.g2.append(g3[take, rows_t].square() * fac[..., None])
    else:
        raise ValueError(f"unknown request kind {r.kind!r}")


def _is_batch_norm(node: fx.Node) -> bool:
    return node.meta.get(TAGS, {}).get("sub") == "batch_norm"


def _row_width(r: Request, x: torch.Tensor) -> tuple[int, ...]:
    """The trailing dims one row spans: the normalized shape of a layer norm, else the last dim."""
    if r.node.meta.get(TAGS, {}).get("sub") == "layer_norm":
        return tuple(int(d) for d in r.node.args[1])
    return (x.shape[-1],)


def _range_axis(r: Request, x: torch.Tensor) -> int | None:
    sub = r.node.meta.get(TAGS, {}).get("sub")
    if sub == "softmax":
        return None
    if sub == "batch_norm":
        return 1
    if sub == "layer_norm" and len(r.node.args[1]) != 1:
        return None
    return x.dim() - 1
