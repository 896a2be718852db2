"""Learned weight rounding (AdaRound), run after a recipe has chosen every scale.

Rounding each weight to nearest minimises the weight error, not the layer's output error; at 6 bits and below
the difference is most of the accuracy lost (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020). Per conv / linear layer, in graph order, a continuous variable V per weight picks
floor or ceil through the rectified sigmoid h(V), trained with Adam to minimise

    Σ_c k_c² ‖W x̂ − W̃(V) x̂_q‖²_c  +  λ Σ (1 − |2h(V) − 1|^β),   β annealed 20 → 2 after a warm-up,

where x̂_q is the layer's input as the quantized model computes it (activation quantizers and the already
rounded earlier layers included) and W x̂ the FP32 model's output there (`objective="fp32"`, the paper's
"asymmetric reconstruction": each layer also absorbs the error arriving from below). k_c is the following
BatchNorm's per-channel factor γ/σ, so the error is weighed as the network sees it. `objective="layer"` targets
W x̂_q instead (the layer's own rounding error only).

Why the default is "fp32": at W6A6 the error a layer's input brings from the low-bit activations and earlier
layers is far larger than its own weight-rounding error, so fitting the layer to the FP32 output recovers more
(the README's AdaRound section has the measured comparison).
The plan keeps every scale the recipe chose; only `weight_rounding` is added (hyfx.quant.rounding).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch
import torch.fx as fx
from tqdm import tqdm

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analysed
from hyfx.meta import TAGS
from hyfx.ops import CONV, LINEAR, batchnorm_factor, getattr_path, sole_batchnorm, weight_arg
from hyfx.passes.fuse_qdq import fuse_qdq
from hyfx.passes.insert_quant import insert_quant, resolved_weight_specs
from hyfx.quant.rounding import encode_offsets, offsets_from_codes, rounded_weight, weight_grid
from hyfx.quant.spec import QuantPlan, QuantSpec
from hyfx.search.sampling import calibration_images

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)


class _Reached(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        self.args_, self.kwargs_ = args, kwargs


class _ArgsAt(fx.Interpreter):
    """Runs a graph until `stop` and returns the values of its arguments (nothing after it is computed)."""

    def __init__(self, gm: fx.GraphModule, stop: fx.Node):
        super().__init__(gm)
        self.stop = stop

    def run_node(self, n: fx.Node):
        if n is self.stop:
            raise _Reached(*self.fetch_args_kwargs_from_env(n))
        return super().run_node(n)

    def args_at(self, x: torch.Tensor) -> tuple[tuple, dict]:
        try:
            self.run(x)
        except _Reached as reached:
            return reached.args_, reached.kwargs_
        raise HyfxError(f"node {self.stop.name} is not computed by the graph")


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _bn_factor(node: fx.Node, channels: int) -> torch.Tensor | None:
    """γ/σ of a BatchNorm that is the conv's only user, or None."""
    bn = sole_batchnorm(node)
    factor = batchnorm_factor(node.graph.owning_module, bn) if bn is not None else None
    return factor if factor is not None and factor.numel() == channels else None


class LearnedRounding(torch.nn.Module):
    """A weight on its spec's grid, rounded up or down per weight by h(v) (AdaRound's rectified sigmoid).

    Training: the soft rounding floor + h(v); eval: the hard one, floor + [v ≥ 0]. v starts where h(v) equals
    the weight's fractional part, so the soft weight starts at the float weight."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec):
        super().__init__()
        scale, zero_point = weight_grid(weight, spec)
        scaled = weight.detach() / scale
        floor = torch.floor(scaled)
        rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("floor", floor)
        self.v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.qmin, self.qmax = spec.qmin, spec.qmax

    def _codes(self, up: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.floor + up + self.zero_point, self.qmin, self.qmax) - self.zero_point

    def codes(self) -> torch.Tensor:
        """The hard integer codes, zero point removed."""
        with torch.no_grad():
            return self._codes((self.v >= 0).to(self.floor.dtype))

    def regulariser(self, beta: float) -> torch.Tensor:
        """Pushes h(v) to 0 or 1 (sharper as beta falls)."""
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()

    def forward(self) -> torch.Tensor:
        up = _h(self.v) if self.training else (self.v >= 0).to(self.floor.dtype)
        return self._codes(up) * self.scale


def learn_rounding(layer_fn, weight: torch.Tensor, spec: QuantSpec, x: torch.Tensor, target: torch.Tensor,
                   channel_dim: int, channel_weight: torch.Tensor | None = None, iters: int = 500, batch: int = 8,
                   lr: float = 1e-2, reg: float = 0.01, warmup: float = 0.2, seed: int = 0) -> torch.Tensor:
    """Integer codes (zero point removed) for `weight` that minimise ‖target − layer_fn(x, W̃)‖² (AdaRound).

    `layer_fn(x, w)` runs the layer with weight w; `x` and `target` hold one sample per row of dim 0.
    """
    rounding = LearnedRounding(weight, spec)
    opt = torch.optim.Adam([rounding.v], lr=lr)
    shape = [1] * target.dim()
    if channel_weight is not None:
        shape[channel_dim] = -1
        channel_weight = (channel_weight.to(target.dtype) ** 2).reshape(shape)
        channel_weight = channel_weight / channel_weight.mean()
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    start_reg = int(warmup * iters)
    for it in range(iters):
        idx = torch.randperm(n, generator=gen)[:batch]
        err = (layer_fn(x[idx], rounding()) - target[idx]) ** 2
        if channel_weight is not None:
            err = err * channel_weight
        loss = err.sum(channel_dim).mean()
        if it >= start_reg:
            beta = 20 + (2 - 20) * (it - start_reg) / max(1, iters - start_reg - 1)
            loss = loss + reg * rounding.regulariser(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rounding.codes()


def unrounded(hg: HybridGraph, plan: QuantPlan) -> tuple[QuantPlan, dict[str, QuantSpec]]:
    """A copy of `plan` to learn a rounding for: weight specs calibrated (a rounding belongs to its scales), no
    rounding or bias correction (both were made for the old rounding); and those weight specs by layer."""
    plan = copy.deepcopy(plan)
    specs = resolved_weight_specs(hg.gm, plan)
    for layer, policy in plan.layers.items():
        policy.bias_correction = policy.weight_rounding = None
        if layer in specs:
            policy.weight = specs[layer]
    return plan, specs


def adaround(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, calib_loader: Iterable, iters: int = 500,
             batch: int = 8, lr: float = 1e-2, reg: float = 0.01, objective: str = "fp32",
             max_batches: int | None = None, progress: bool = True) -> QuantPlan:
    """A copy of `plan` with a learned rounding for every uniform-quantized conv / linear weight.

    Weight specs are stored calibrated (the rounding belongs to their scales); bias corrections are dropped
    (they were measured for round-to-nearest: run `correct_bias` afterwards to measure them again).
    """
    if objective not in ("fp32", "layer"):
        raise HyfxError(f"unknown AdaRound objective {objective!r}: use 'fp32' or 'layer'")
    hg = analysed(gm)
    plan, specs = unrounded(hg, plan)
    images = calibration_images(calib_loader, max_batches)
    if not images:
        raise HyfxError("adaround got no calibration images: pass a non-empty calibration loader")
    qgm = fuse_qdq(insert_quant(hg.gm, plan))  # the same values, run faster
    qindex = {n.meta[TAGS]["name"]: n for n in qgm.graph.nodes if TAGS in n.meta}
    layers = [n.meta[TAGS]["name"] for n in hg.gm.graph.nodes
              if TAGS in n.meta and n.meta[TAGS]["name"] in specs and n.meta[TAGS]["kind"] in (CONV, LINEAR)
              and specs[n.meta[TAGS]["name"]].kind == "uniform" and weight_arg(n) is not None]
    start = time.perf_counter()
    for layer in tqdm(layers, desc="adaround", disable=not progress):
        node, qnode = hg.node(layer), qindex[layer]
        weight = getattr_path(hg.gm, weight_arg(node).target).detach()
        with torch.no_grad():
            fp, quant = _ArgsAt(hg.gm, node), _ArgsAt(qgm, qnode)
            targets, inputs = [], []
            for x in images:
                qargs, qkwargs = quant.args_at(x)
                inputs.append(qargs[0])
                if objective == "fp32":
                    args, kwargs = fp.args_at(x)
                    targets.append(node.target(*args, **kwargs))
                else:
                    targets.append(node.target(qargs[0], weight, *qargs[2:], **qkwargs))
        rest, kwargs = qargs[2:], qkwargs

        def layer_fn(x: torch.Tensor, w: torch.Tensor, node=node, rest=rest, kwargs=kwargs) -> torch.Tensor:
            return node.target(x, w, *rest, **kwargs)

        kind = node.meta[TAGS]["kind"]
        codes = learn_rounding(layer_fn, weight, specs[layer], torch.cat(inputs), torch.cat(targets),
                               1 if kind == CONV else -1, _bn_factor(node, weight.shape[0]) if kind == CONV else None,
                               iters=iters, batch=batch, lr=lr, reg=reg)
        offsets = offsets_from_codes(weight, specs[layer], codes)
        plan.layers[layer].weight_rounding = encode_offsets(offsets)
        with torch.no_grad():  # later layers see the rounding as insert_quant applies it (its quantizer is idempotent)
            getattr_path(qgm, weight_arg(node).target).copy_(rounded_weight(weight, specs[layer], offsets))
    plan.meta["adaround"] = {"layers": len(layers), "objective": objective, "iters": iters, "batch": batch, "lr": lr, "reg": reg,
                             "n_images": sum(x.shape[0] for x in images),
                             "seconds": round(time.perf_counter() - start, 1)}
    return plan
