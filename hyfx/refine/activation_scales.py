"""Activation scales learned end to end, after a recipe has chosen them layer by layer.

A per-layer search picks each activation scale for its own layer's (Hessian-weighted) output error, one layer at
a time; at 6 bits the errors of many layers add up and interact, and the scales that are best one by one are not
best together. Here every uniform activation quantizer's step size becomes a parameter (its logarithm, so it stays
positive), rounding passes gradients straight through (LSQ: Esser et al., ICLR 2020), and all of them are trained
at once to minimise the prediction difference KL(p_FP32 ‖ p_quant) of the model's outputs on the calibration
images (PD-Quant: Liu et al., CVPR 2023). Weights, zero points, granularity and scheme stay as the recipe chose:
only `scale` of the activation specs changes, so the plan's target rules still hold.

It needs a few hundred calibration images: on 32 the training loss falls but the held-out KL does not (the
README's learned activation scales section has the measurements).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analysed
from hyfx.meta import TAGS
from hyfx.passes.insert_quant import insert_quant
from hyfx.quant.quantizers import fake_quant_uniform, qd
from hyfx.quant.spec import QuantPlan
from hyfx.search.sampling import calibration_images

QUANTIZE = (qd.quantize_per_tensor.default, qd.quantize_per_channel.default)


class LearnedFakeQuant(torch.nn.Module):
    """Uniform fake quantization with a trainable log step size (per tensor or per channel of `axis`).

    `drop` > 0 in training mode: each element keeps its float value with that probability (QDrop)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None):
        super().__init__()
        self.log_scale = torch.nn.Parameter(scale.detach().float().log())
        self.register_buffer("zero_point", zero_point.detach().float())
        self.qmin, self.qmax, self.axis = qmin, qmax, axis
        self.drop = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = fake_quant_uniform(x, self.log_scale.exp(), self.zero_point, self.qmin, self.qmax, self.axis, ste=True)
        if self.training and self.drop > 0:
            return torch.where(torch.rand_like(x) < self.drop, x, q)
        return q


def learnable_activations(qgm: fx.GraphModule) -> dict[str, tuple[str, str]]:
    """Replace every activation quantize → dequantize pair of `qgm` by a LearnedFakeQuant submodule (in place).

    Returns {submodule name: (layer, role)}; the roles are insert_quant's ("input0", "output", ...).
    """
    learned = {}
    for q in list(qgm.graph.nodes):
        info = q.meta.get(TAGS, {})
        if q.op != "call_function" or q.target not in QUANTIZE or info.get("role") == "weight":
            continue
        (dq,) = q.users
        if q.target == qd.quantize_per_tensor.default:
            src, scale, zero_point, qmin, qmax, _ = q.args
            axis = None
        else:
            src, scale_node, zp_node, axis, qmin, qmax, _ = q.args
            scale, zero_point = (getattr(qgm, n.target) for n in (scale_node, zp_node))
        name = f"_hyfx_learned_{len(learned)}"
        qgm.add_submodule(name, LearnedFakeQuant(torch.as_tensor(scale), torch.as_tensor(zero_point), qmin, qmax, axis))
        with qgm.graph.inserting_after(dq):
            fq = qgm.graph.call_module(name, (src,))
        fq.meta[TAGS] = info
        dq.replace_all_uses_with(fq)
        qgm.graph.erase_node(dq)
        qgm.graph.erase_node(q)
        learned[name] = (info["quantizes"], info["role"])
    qgm.graph.eliminate_dead_code()
    qgm.recompile()
    return learned


def write_scales(plan: QuantPlan, qgm: fx.GraphModule, learned: dict[str, tuple[str, str]]) -> None:
    """Store the step sizes of `learnable_activations`' submodules in `plan` (in place)."""
    for name, (layer, role) in learned.items():
        scale = qgm.get_submodule(name).log_scale.detach().exp().reshape(-1).tolist()
        policy = plan.layers[layer]
        if role == "output":
            policy.output = policy.output.with_params(scale, policy.output.zero_point)
        else:
            idx = int(role.removeprefix("input"))
            policy.inputs[idx] = policy.inputs[idx].with_params(scale, policy.inputs[idx].zero_point)


def _log_probs(out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise HyfxError("learn_activation_scales needs a model whose output is one [batch, classes] tensor of logits")
    return F.log_softmax(out.float(), dim=-1)


def learn_activation_scales(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, calib_loader: Iterable,
                            steps: int = 150, batch: int = 16, lr: float = 5e-3, seed: int = 0,
                            max_batches: int | None = None, progress: bool = True) -> QuantPlan:
    """A copy of `plan` whose uniform activation scales minimise KL(FP32 ‖ quantized) over the calibration images.

    Adam on the log scales, `steps` steps of `batch` images, cosine-decayed learning rate. Learned weight
    roundings and bias corrections stay in force while training (they are part of the quantized model the
    scales serve) but were made for the old activations: rerun AdaRound / bias correction afterwards.
    """
    if steps < 1:
        raise HyfxError(f"learn_activation_scales needs steps ≥ 1, got {steps}")
    hg = analysed(gm)
    images = torch.cat(calibration_images(calib_loader, max_batches))
    qgm = insert_quant(hg.gm, plan)
    learned = learnable_activations(qgm)
    if not learned:
        raise HyfxError("the plan quantizes no activation with a uniform quantizer: there is no scale to learn")
    for p in qgm.parameters():
        p.requires_grad_(False)
    params = [qgm.get_submodule(name).log_scale for name in learned]
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        target = torch.cat([_log_probs(hg.gm(x)) for x in images.split(batch)])
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for _ in tqdm(range(steps), desc="activation scales", disable=not progress):
        idx = torch.randperm(len(images), generator=gen)[:batch]
        loss = F.kl_div(_log_probs(qgm(images[idx])), target[idx], log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    plan = copy.deepcopy(plan)
    write_scales(plan, qgm, learned)
    window = max(1, steps // 10)
    plan.meta["activation_scales"] = {
        "quantizers": len(learned), "steps": steps, "batch": batch, "lr": lr, "n_images": len(images),
        "loss_first": float(f"{sum(losses[:window]) / window:.4g}"),
        "loss_last": float(f"{sum(losses[-window:]) / window:.4g}"),
        "seconds": round(time.perf_counter() - start, 1)}
    return plan
