"""RepQ-ViT (Li et al., ICCV 2023): scale reparameterization of post-LayerNorm and post-Softmax activations.

Quantization and inference are decoupled:
  post-norm activations (the output of a LayerNorm / GroupNorm feeding linears or unpadded convs, whose
    channels vary by orders of magnitude) are calibrated per channel, asymmetric; then
    reparameterized to one per-tensor scale s̃ = mean(s) and zero point z̃ = round(mean(z)), the per-channel
    ratios folded into the norm's affine and the consumers' weights (hyfx.passes.reparameterize). The per-tensor
    quantizer of the reparameterized graph is then exactly the per-channel one of the original;
  post-softmax activations (the attention probabilities into a matmul) get a log√2 quantizer,
    Δ·2^(−q/2), deployed as a shift and, for odd codes, one √2 multiply; Δ is the candidate among the top
    quantiles of the calibration probabilities with the least squared error;
  weights are quantized per output channel, asymmetric, after the reparameterization; every other activation
    per tensor, asymmetric.
Every range is RepQ-ViT's percentile search: of [q(1−p), q(p)] for p in 0.999 / 0.9999 / 0.99999, the one of least
squared quantization error (activations: on the first calibration batch). One departure: z̃ is rounded to an integer
(the reference keeps the float mean), so the per-tensor quantizer is an int8 one and equals the per-channel one.
A target restricts it: symmetric schemes where it has no zero points, symmetric weights where it asks for them,
and a uniform per-tensor post-softmax quantizer where it runs no log√2 one (`Target.kinds`). `full=True` also
quantizes the inputs of softmax and of every norm (per tensor), the full-quantization setting.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

from hyfx.graph import HybridGraph, analysed
from hyfx.meta import TAGS
from hyfx.ops import CONV, LINEAR, MATMUL, NORM, SOFTMAX, getattr_path, weight_arg
from hyfx.passes.reparameterize import consumer_ok, norm_channel_dim, reparameterize_norms
from hyfx.quant.calibrate import calibrate_activations, collect, run_with_taps
from hyfx.quant.observers import SEARCH_QUANTILES, QuantileSearchObserver, best_quantile_range
from hyfx.quant.quantizers import log_sqrt2_fake_quant, uniform_params
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec, check_bits
from hyfx.quant.targets import check_bits_for_target, get_target
from hyfx.recipes.ptq4vit import softmax_producer
from hyfx.recipes.registry import register

MAX_SAMPLES = 1 << 20


def reparameterizable(hg: HybridGraph) -> dict[str, list[str]]:
    """Norm layer → its consumer layers, for every LayerNorm / GroupNorm whose output only feeds, as input 0,
    linears or unpadded one-group convs (the layers the per-channel ratios can fold into)."""
    found = {}
    for layer in hg.layers((NORM,)):
        node = hg.node(layer)
        if norm_channel_dim(node) is None or not node.users:
            continue
        users = list(node.users)
        if all(consumer_ok(u, hg.gm) and u.args[0] is node and list(u.args).count(node) == 1 for u in users):
            found[layer] = [u.meta[TAGS]["name"] for u in users]
    return found


def _channel_ranges(hg: HybridGraph, norms: dict[str, list[str]], spec: QuantSpec, loader: Iterable,
                    max_batches: int | None, progress: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    observers = {hg.node(n).name: QuantileSearchObserver(spec, norm_channel_dim(hg.node(n))) for n in norms}
    run_with_taps(hg.gm, {name: obs.update for name, obs in observers.items()}, loader, desc="per-channel ranges",
                  max_batches=max_batches, progress=progress)
    return {n: observers[hg.node(n).name].range() for n in norms}


def reparameterization(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[dict, QuantSpec]:
    """(the plan's record of one norm: ratio r1 and shift s·r2 per channel, the per-tensor spec of its output)."""
    scale, zero_point = uniform_params(lo, hi, spec)
    scale, zero_point = scale.double(), zero_point.double()
    s_tensor = scale.mean()
    z_tensor = torch.round(zero_point.mean()) if spec.scheme == "asymmetric" else torch.zeros(())
    ratio = scale / s_tensor
    shift = scale * (zero_point - z_tensor)
    record = {"ratio": ratio.tolist(), "shift": shift.tolist()}
    return record, spec.with_params([float(s_tensor)], [int(z_tensor)])


def log_sqrt2_spec(probs: torch.Tensor, bits: int) -> QuantSpec:
    """The log√2 spec whose Δ, among the top quantiles of `probs`, gives the least squared error."""
    flat = probs.detach().float().reshape(-1)
    if flat.numel() > MAX_SAMPLES:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:MAX_SAMPLES]]
    ordered = flat.sort().values
    best, best_err = None, float("inf")
    for q in SEARCH_QUANTILES:
        delta = max(float(ordered[min(int(q * (len(ordered) - 1)), len(ordered) - 1)]), 1e-8)
        err = float((log_sqrt2_fake_quant(flat, delta, bits) - flat).pow(2).mean())
        if err < best_err:
            best, best_err = delta, err
    return QuantSpec(bits=bits, kind="log_sqrt2", scheme="asymmetric").with_params([best], [0])


@register("repqvit", targets=None)
def repqvit(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, w_bits: int = 8, a_bits: int = 8,
            full: bool = False, target: str = "fake", max_batches: int | None = None,
            progress: bool = True) -> QuantPlan:
    """Post-norm activations per channel reparameterized to per tensor; log√2 post-softmax; per-channel weights."""
    check_bits(w_bits)
    check_bits(a_bits)
    check_bits_for_target(target, w_bits, a_bits)
    rules = get_target(target)
    calib_loader = list(calib_loader)  # read three times: ranges, softmax samples, activation ranges
    hg = analysed(gm)
    act_scheme = "asymmetric" if "asymmetric" in rules.act_schemes else "symmetric"
    w_scheme = "asymmetric" if rules.allows_weight("channel", "asymmetric") else "symmetric"
    w_gran = "channel" if "channel" in rules.weight_granularities else "tensor"
    act = QuantSpec(bits=a_bits, granularity="tensor", scheme=act_scheme)

    norms = reparameterizable(hg)
    ranges = _channel_ranges(hg, norms, act, calib_loader, max_batches, progress)
    records, norm_specs = {}, {}
    for norm, consumers in norms.items():
        record, spec = reparameterization(*ranges[norm], act)
        records[norm] = {"consumers": consumers, **record}
        norm_specs[norm] = spec
    if records:
        hg = HybridGraph(reparameterize_norms(hg.gm, records), hg.blocks, hg.bridges)

    plan = QuantPlan(recipe="repqvit", meta={"w_bits": w_bits, "a_bits": a_bits, "full": full,
                                             "reparameterized": records})
    log_softmax = "log_sqrt2" in rules.kinds
    softmax_inputs: dict[str, fx.Node] = {}
    for layer in hg.layers((CONV, LINEAR, MATMUL)):
        node = hg.node(layer)
        if hg.tags(layer)["kind"] == MATMUL:
            inputs = {}
            for idx in (0, 1):
                src = softmax_producer(node, idx) if log_softmax else None
                if src is not None:
                    softmax_inputs[f"{layer}/{idx}"] = src
                else:
                    inputs[idx] = act
            plan.set(layer, LayerPolicy(inputs=inputs))
            continue
        weight = _weight_spec(getattr_path(hg.gm, weight_arg(node).target), QuantSpec(
            bits=w_bits, granularity=w_gran, scheme=w_scheme))
        src = node.args[0]
        norm = src.meta.get(TAGS, {}).get("name") if isinstance(src, fx.Node) else None
        plan.set(layer, LayerPolicy(weight=weight, inputs={0: norm_specs.get(norm, act)}))
    if full:
        for layer in hg.layers((NORM, SOFTMAX)):
            plan.set(layer, LayerPolicy(inputs={0: act}))
    if softmax_inputs:
        probs = collect(hg.gm, {n.name for n in softmax_inputs.values()}, calib_loader, max_batches=max_batches,
                        progress=progress)
        for key, src in softmax_inputs.items():
            layer, idx = key.split("/")
            plan.layers[layer].inputs[int(idx)] = log_sqrt2_spec(probs[src.name], a_bits)
    plan = calibrate_activations(hg.gm, plan, calib_loader, observer="search", max_batches=max_batches,
                                 progress=progress)
    if rules.zero_point_free_matmul:  # a MatMul of activations runs int8 only without zero points
        plan = _matmul_zero_points_free(hg, plan, act)
    plan.meta["calibration"] = {**plan.meta.get("calibration", {}),
                                "n_images": sum(len(x[0] if isinstance(x, (list, tuple)) else x)
                                                for x in calib_loader[:max_batches])}
    return plan


def _weight_spec(weight: torch.Tensor, spec: QuantSpec) -> QuantSpec:
    """The weight's spec from the quantile search, per output channel or per tensor."""
    rows = weight.detach().reshape(weight.shape[0], -1) if spec.granularity == "channel" else weight.reshape(1, -1)
    scale, zero_point = uniform_params(*best_quantile_range(rows, spec), spec)
    return spec.with_params(scale.reshape(-1).tolist(), zero_point.reshape(-1).tolist())


def _matmul_zero_points_free(hg: HybridGraph, plan: QuantPlan, act: QuantSpec) -> QuantPlan:
    """Matmul inputs whose calibrated range is signed get a symmetric spec (non-negative ones keep zero point 0)."""
    symmetric = QuantSpec(bits=act.bits, granularity="tensor", scheme="symmetric")
    for layer, policy in plan.layers.items():
        if hg.tags(layer)["kind"] != MATMUL:
            continue
        for idx, spec in list(policy.inputs.items()):
            if spec.kind == "uniform" and spec.zero_point and spec.zero_point[0] != 0:
                lo = (spec.qmin - spec.zero_point[0]) * spec.scale[0]
                hi = (spec.qmax - spec.zero_point[0]) * spec.scale[0]
                s, z = uniform_params(torch.tensor(lo), torch.tensor(hi), symmetric)
                policy.inputs[idx] = symmetric.with_params([float(s)], [int(z)])
    return plan
