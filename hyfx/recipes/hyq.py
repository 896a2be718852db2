"""HyQ (Kim, Lee & Kim, IJCAI 2024): hardware-friendly PTQ for CNN–Transformer hybrids.

Two parts, as the paper and its code (IDSL-SeoulTech/HyQ) describe them:
  quantization-aware distribution scaling (QADS): the pointwise (1x1) convs of the inverted-residual blocks see
    inputs whose channels differ in range by orders of magnitude. Each gets a per-input-channel factor α: its input
    is divided by α (then quantized per tensor) and its weight multiplied by α (then quantized per output channel),
    the same function in float (hyfx.passes.reparameterize.scale_input_channels). α starts at 1 and is learned
    with Adam (cosine-annealed learning rate, `qads_iters` steps) to minimise the MSE between the float output
    and the output with both quantizers, keeping the best α seen. Because a 1x1 stride-1 conv treats every pixel
    alike, the loss is computed on `qads_pixels` sampled pixels of the calibration inputs. The reference runs 1000
    steps on 100 images and lets gradients flow through the min-max scales only; here rounding passes gradients
    straight through (STE) as well, which converges in fewer steps;
  the linear softmax: every softmax is replaced by the integer-only approximation of hyfx.quant.linear_softmax
    (exp as a shift and one linear function, the output as powers of two on `softmax_bits` bits, the reference's
    log-int output), on the logits' uint8 scale. Its output goes into attn · v unquantized further (powers of two).
Everything else as the reference configures it: weights symmetric per output channel (min-max), activations into
convs / linears / matmuls asymmetric per tensor (min-max); LayerNorm / GroupNorm stay in float (the reference's
integer LayerNorm with power-of-two channel factors is not reproduced). `qads=False` leaves α at 1.
Plans run as PyTorch fake quantization: the integer softmax has no ONNX lowering.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analysed
from hyfx.meta import TAGS
from hyfx.ops import ACT, CONV, LINEAR, MATMUL, NORM, SOFTMAX, getattr_path, is_depthwise, weight_arg
from hyfx.passes.approximate_softmax import approximate_softmax
from hyfx.passes.reparameterize import scale_input_channels
from hyfx.quant.calibrate import calibrate_activations, fan_out, run_with_taps
from hyfx.quant.observers import MinMaxObserver
from hyfx.quant.quantizers import calibrate_weight, fake_quant_uniform, uniform_params
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec, check_bits
from hyfx.recipes.ptq4vit import softmax_producer
from hyfx.recipes.registry import register


def _next_conv(node: fx.Node, forward: bool, steps: int = 4) -> fx.Node | None:
    """The conv reached from `node` through at most `steps` norms / activations on a single path, or None."""
    for _ in range(steps):
        nxt = (list(node.users) if forward else [a for a in node.all_input_nodes if a.op != "get_attr"])
        if len(nxt) != 1:
            return None
        node = nxt[0]
        kind = node.meta.get(TAGS, {}).get("kind")
        if kind == CONV:
            return node
        if kind not in (NORM, ACT):
            return None
    return None


def qads_layers(hg: HybridGraph) -> list[str]:
    """The pointwise convs of inverted-residual blocks: 1x1, stride 1, one group, outside attention, feeding or fed
    by a depthwise conv through norms / activations only (the expansion and the projection of MobileNet /
    EfficientNet / MobileViT's MV2 blocks)."""
    found = []
    for layer in hg.layers((CONV,)):
        node, tags = hg.node(layer), hg.tags(layer)
        if tags["region"] == "transformer" or weight_arg(node) is None or not isinstance(node.args[0], fx.Node):
            continue
        weight = getattr_path(hg.gm, weight_arg(node).target)
        args = list(node.args) + [None] * 7
        stride, groups = args[3], args[6]
        if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or groups not in (None, 1) or \
                not all(s == 1 for s in (stride or [1])):
            continue
        near = [_next_conv(node, True), _next_conv(node, False)]
        if any(c is not None and is_depthwise(c, hg.gm) for c in near):
            found.append(layer)
    return found


class _PixelSampler:
    """Up to `limit` random pixels (rows of channel values) of a conv input, over the calibration batches."""

    def __init__(self, limit: int, seed: int):
        self.limit, self.rows, self.gen = limit, [], torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1).T
        take = min(len(flat), max(self.limit // 4, 1))
        self.rows.append(flat[torch.randperm(len(flat), generator=self.gen)[:take]])

    def pixels(self) -> torch.Tensor:
        rows = torch.cat(self.rows)
        return rows[torch.randperm(len(rows), generator=self.gen)[: self.limit]]


def learn_alpha(x: torch.Tensor, weight: torch.Tensor, w_bits: int, a_bits: int, iters: int, lr: float
                ) -> tuple[torch.Tensor, float, float]:
    """(α, loss at α = 1, best loss): QADS on pixels `x` (P, C_in) of a 1x1 conv with weight (C_out, C_in)."""
    w = weight.detach().reshape(weight.shape[0], -1).float()
    target = x @ w.T
    a_spec = QuantSpec(bits=a_bits, scheme="asymmetric")
    w_qmax = 2 ** (w_bits - 1) - 1
    log_alpha = torch.zeros(x.shape[1], requires_grad=True)  # α = exp(·) stays positive
    opt = torch.optim.Adam([log_alpha], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iters, 1))

    def loss_at(log_a: torch.Tensor) -> torch.Tensor:
        alpha = log_a.exp()
        xs, ws = x / alpha, w * alpha
        lo, hi = xs.min().clamp(max=0.0), xs.max().clamp(min=0.0)
        scale = ((hi - lo) / (a_spec.qmax - a_spec.qmin)).clamp_min(1e-8)
        zero = (a_spec.qmin - torch.round(lo / scale)).detach()
        xq = fake_quant_uniform(xs, scale, zero, a_spec.qmin, a_spec.qmax, ste=True)
        w_scale = (ws.abs().amax(1) / w_qmax).clamp_min(1e-8)
        wq = fake_quant_uniform(ws, w_scale, torch.zeros_like(w_scale), -w_qmax, w_qmax, axis=0, ste=True)
        return torch.nn.functional.mse_loss(xq @ wq.T, target)

    base = best = None
    best_alpha = torch.ones(x.shape[1])
    for step in range(iters + 1):
        opt.zero_grad()
        loss = loss_at(log_alpha)  # the loss of the α this step starts from
        now = float(loss.detach())
        if base is None:
            base = best = now
        elif now < best:
            best, best_alpha = now, log_alpha.detach().exp().clone()
        if step == iters:
            break
        loss.backward()
        opt.step()
        sched.step()
    return best_alpha, base, best


@register("hyq", targets=None)
def hyq(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
        qads: bool = True, qads_iters: int = 100, qads_lr: float = 0.01, qads_pixels: int = 1024,
        softmax_bits: int = 4, seed: int = 0, target: str = "fake", max_batches: int | None = None,
        progress: bool = True) -> QuantPlan:
    """QADS on the pointwise convs, integer linear-exp softmax, min-max uniform everywhere else."""
    check_bits(w_bits)
    check_bits(a_bits)
    check_bits(softmax_bits)
    if target != "fake":
        raise HyfxError(f"hyq plans run as PyTorch fake quantization only (its integer softmax has no {target} "
                        "lowering): use --target fake, or qhyvit / repqvit for a deployable plan")
    calib_loader = list(calib_loader)
    hg = analysed(gm)
    act = QuantSpec(bits=a_bits, granularity="tensor", scheme="asymmetric")
    meta: dict = {"w_bits": w_bits, "a_bits": a_bits, "softmax_bits": softmax_bits, "qads": qads}

    # the logits' uint8 scale, and each QADS conv's input pixels, from one pass over the float graph
    softmaxes = hg.layers((SOFTMAX,))
    logit_obs = {layer: MinMaxObserver() for layer in softmaxes}
    targets = qads_layers(hg) if qads else []
    samplers = {layer: _PixelSampler(qads_pixels, seed + i) for i, layer in enumerate(targets)}
    taps: dict[str, list] = {}
    for layer in softmaxes:
        taps.setdefault(hg.node(layer).args[0].name, []).append(logit_obs[layer].update)
    for layer in targets:
        taps.setdefault(hg.node(layer).args[0].name, []).append(samplers[layer].update)
    run_with_taps(hg.gm, {k: fan_out(fns) for k, fns in taps.items()}, calib_loader,
                  desc="hyq statistics", max_batches=max_batches, progress=progress)

    scales, report = {}, {}
    for layer in targets:
        weight = getattr_path(hg.gm, weight_arg(hg.node(layer)).target)
        alpha, base, best = learn_alpha(samplers[layer].pixels(), weight, w_bits, a_bits, qads_iters, qads_lr)
        if best < base:
            scales[layer] = alpha.tolist()
            report[layer] = {"mse_before": base, "mse_after": best}
    approx = {}
    for layer in softmaxes:
        lo, hi = logit_obs[layer].range()
        scale, _ = uniform_params(lo, hi, act)
        approx[layer] = {"scale": float(scale), "bits": softmax_bits}
    meta.update(input_channel_scales=scales, softmax_approximation=approx, qads_mse=report)
    rewritten = approximate_softmax(scale_input_channels(hg.gm, scales), approx)
    hg = HybridGraph(rewritten, hg.blocks, hg.bridges)

    plan = QuantPlan(recipe="hyq", meta=meta)
    weight_spec = QuantSpec(bits=w_bits, granularity="channel", scheme="symmetric")
    for layer in hg.layers((CONV, LINEAR, MATMUL)):
        node = hg.node(layer)
        if hg.tags(layer)["kind"] == MATMUL:
            # the approximated softmax's output is powers of two already
            plan.set(layer, LayerPolicy(inputs={i: act for i in (0, 1) if softmax_producer(node, i) is None}))
            continue
        weight = calibrate_weight(getattr_path(hg.gm, weight_arg(node).target), weight_spec)
        plan.set(layer, LayerPolicy(weight=weight, inputs={0: act}))
    plan = calibrate_activations(hg.gm, plan, calib_loader, max_batches=max_batches, progress=progress)
    plan.meta["calibration"]["n_images"] = sum(len(x[0] if isinstance(x, (list, tuple)) else x)
                                               for x in calib_loader[:max_batches])
    return plan
