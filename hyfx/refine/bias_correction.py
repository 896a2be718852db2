"""Empirical bias correction: undo the mean output shift that rounding a layer's weights causes.

Rounding W to Q(W) shifts each output channel's mean by E[(W - Q(W)) x], a systematic error that every later
layer sees (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019, the
empirical variant). It is largest for depthwise convolutions (few weights per channel, so rounding errors do
not average out) and at low weight bits. The shift is measured on the calibration images with each layer's
input as the quantized model computes it (activation quantizers and earlier layers included) and the plan
stores its negation per output channel; `insert_quant` adds it to the layer's bias. One pass measures every
layer: a correction barely changes the inputs of later layers' own weight-rounding errors.

Measured with Q-HyViT plans on the real-weight zoo models (benchmarks/accuracy.py): see the README.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analysed
from hyfx.meta import TAGS
from hyfx.ops import CONV, LINEAR, weight_arg
from hyfx.passes.fuse_qdq import fuse_qdq
from hyfx.passes.insert_quant import getattr_path, insert_quant
from hyfx.quant.calibrate import batches
from hyfx.quant.spec import QuantPlan


class _ShiftMeter(fx.Interpreter):
    """Runs the quantized graph; at each corrected layer also runs it with the float weight on the same input."""

    def __init__(self, gm: fx.GraphModule, layers: dict[fx.Node, tuple[str, int, torch.Tensor]]):
        super().__init__(gm)
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.layers:
            layer, channel_dim, weight = self.layers[n]
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            float_out = n.target(args[0], weight, *args[2:], **kwargs)
            shift = _channel_mean(float_out, channel_dim) - _channel_mean(out, channel_dim)
            self.sums[layer] = self.sums.get(layer, 0) + shift * out.shape[0]
        return out


def _channel_mean(y: torch.Tensor, dim: int) -> torch.Tensor:
    dims = [d for d in range(y.dim()) if d != dim % y.dim()]
    return y.double().mean(dims)


def correct_bias(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, calib_loader: Iterable,
                 max_batches: int | None = None) -> QuantPlan:
    """A copy of `plan` whose weight-quantized conv / linear layers carry their measured bias correction.

    Any correction the plan already has is measured again from scratch (it belongs to the weight specs in force).
    """
    hg = analysed(gm)
    plan = copy.deepcopy(plan)
    for policy in plan.layers.values():
        policy.bias_correction = None
    qgm = fuse_qdq(insert_quant(hg.gm, plan))  # the same values, run faster
    index = {n.meta[TAGS]["name"]: n for n in qgm.graph.nodes if TAGS in n.meta}
    layers: dict[fx.Node, tuple[str, int, torch.Tensor]] = {}
    for layer, policy in plan.layers.items():
        node = index.get(layer)
        if policy.weight is None or policy.weight.kind != "uniform" or node is None:
            continue
        kind = node.meta[TAGS]["kind"]
        if kind not in (CONV, LINEAR) or node.op != "call_function":
            continue
        weight = getattr_path(hg.gm, weight_arg(hg.node(layer)).target).detach()  # not the rounded one in qgm
        layers[node] = (layer, 1 if kind == CONV else -1, weight)
    if not layers:
        return plan
    meter = _ShiftMeter(qgm, layers)
    n_images = 0
    with torch.no_grad():
        for images in batches(calib_loader, max_batches):
            meter.run(images)
            n_images += images.shape[0]
    if n_images == 0:
        raise HyfxError("bias correction got no calibration images: pass a non-empty calibration loader")
    for layer, total in meter.sums.items():
        plan.layers[layer].bias_correction = tuple((total / n_images).float().tolist())
    plan.meta["bias_correction"] = {"layers": len(meter.sums), "n_images": n_images}
    return plan
