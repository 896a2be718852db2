"""The ONNX Runtime int8 CPU region plan: which tensors get which quantizer, derived from a recipe's plan.

- Q/DQ sit where ORT fuses them into int8 kernels: DQ(x), DQ(w) → Conv → Q becomes QLinearConv, so int8
  convolutions also get an output quantizer; DQ → MatMul / Gemm becomes MatMulIntegerToFloat / QGemm with a
  float output, so a linear or attention matmul gets one only when all its consumers are int8.
- Between int8 layers the data stays uint8: SiLU is split into sigmoid (QLinearSigmoid, a lookup table) and
  mul (QLinearMul), CNN residual adds (QLinearAdd), concats and clamps (folded into the conv) join the int8
  region when all their inputs are int8; each tensor has one set of parameters, so ORT elides the Q→DQ pairs.
- A recipe's searched specs are lowered as searched: symmetric weights (through BatchNorm folding, exactly),
  activation ranges, and symmetric int8 activations as uint8 with zero point 128 (no s8s8 kernels or
  conversions); a ReLU-like op's searched output range is fitted inside its clamp, which ORT then folds away.
`hyfx.pipelines.ort_cpu.compile_cpu` chooses which layers run int8 and lowers the plan.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.fx as fx

from hyfx.graph import HybridGraph, analyze, analyze_for
from hyfx.meta import BN_FACTORS, TAGS
from hyfx.ops import CONV, LINEAR, MATMUL, getattr_path, is_depthwise, moves_values, source_through
from hyfx.passes.decompose_silu import decompose_silu
from hyfx.passes.fold_batchnorm import fold_batchnorm, folded_weight_spec
from hyfx.quant.calibrate import calibrate_activations
from hyfx.quant.quantizers import calibrate_weight
from hyfx.quant.rounding import flip_offsets
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec
from hyfx.quant.targets import cpu_weight_bits
from hyfx.refine.bias_correction import correct_bias

aten = torch.ops.aten
_RELU6 = tuple(getattr(aten, name).default for name in ("relu6", "relu6_") if hasattr(aten, name))
_RELU_LIKE = (aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
              aten.clamp.default, *_RELU6)


def cpu_graph(gm: fx.GraphModule | HybridGraph) -> HybridGraph:
    """The analysed graph as the CPU lowering runs it: BatchNorm folded into convs, SiLU as x · sigmoid(x)."""
    hg = gm if isinstance(gm, HybridGraph) else analyze(gm)
    folded, _ = fold_batchnorm(hg.gm)
    return HybridGraph(decompose_silu(folded), hg.blocks, hg.bridges)


def _consumers(node: fx.Node) -> list[tuple[fx.Node, int]]:
    """(op, argument index) of every op reading this tensor, looking forward through pass-through ops."""
    out = []
    for user in node.users:
        if moves_values(user):
            out += _consumers(user)
        else:
            out += [(user, i) for i, a in enumerate(user.args) if a is node]
    return out


def _tensor_args(node: fx.Node) -> list[int]:
    return [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op != "get_attr"]


def int8_candidates(hg: HybridGraph, plan: QuantPlan) -> list[str]:
    """The recipe's layers an int8 kernel can run: uniform-weight conv / linear, uniform-input matmul."""
    out = []
    for layer, policy in plan.layers.items():
        kind = hg.tags(layer)["kind"]
        if kind in (CONV, LINEAR) and policy.weight is not None and policy.weight.kind == "uniform":
            out.append(layer)
        elif kind == MATMUL and policy.inputs and all(s.kind == "uniform" for s in policy.inputs.values()):
            out.append(layer)
    return out


def region_plan(hg: HybridGraph, plan: QuantPlan, layers: Iterable[str], weight_bits: int,
                 specs: QuantPlan | None = None, depthwise_bits: int | None = None,
                 exact: Iterable[str] = ()) -> tuple[QuantPlan, dict[fx.Node, str]]:
    """The int8 plan for a set of int8 layers: the layers, the ops grown between them, one spec per tensor.

    Specs come from `specs` (a calibrated plan over a superset of layers) by layer and role when given,
    else from the recipe's calibrated ranges, else uncalibrated (min-max later). Weights get `weight_bits`,
    depthwise convs `depthwise_bits` (default: the same), `exact` layers 8-bit weights as uint8 (u8u8 kernels).
    """
    exact = set(exact)
    int8: dict[fx.Node, str] = {hg.node(layer): "layer" for layer in layers}
    _grow_int8(hg, int8)
    factors = hg.gm.meta.get(BN_FACTORS, {})
    recipe_specs: dict[fx.Node, QuantSpec] = {}  # source tensor → the recipe's calibrated range for it
    for layer, policy in plan.layers.items():
        node = hg.node(layer)
        for idx, spec in policy.inputs.items():
            if spec.kind == "uniform" and spec.calibrated and idx < len(node.args) and isinstance(node.args[idx], fx.Node):
                recipe_specs.setdefault(source_through(node.args[idx]), _uniform8(spec))
    activation = QuantSpec(bits=8, granularity="tensor", scheme="asymmetric")
    out = QuantPlan(recipe=f"{plan.recipe}+ort", model=plan.model, target="ort",
                    meta={**plan.meta, "ort": {"weight_bits": weight_bits}})
    for node, role in int8.items():
        name = node.meta[TAGS]["name"]
        known = specs.layers.get(name) if specs is not None else None
        policy = LayerPolicy()
        if role == "layer" and node.meta[TAGS]["kind"] in (CONV, LINEAR):
            depthwise = depthwise_bits is not None and is_depthwise(node, hg.gm)
            recipe = plan.layers[name]
            if known and known.weight:
                policy.weight, policy.bias_correction = known.weight, known.bias_correction
                policy.weight_rounding = known.weight_rounding
            elif name in exact and not depthwise and weight_bits < 8:
                weight = getattr_path(hg.gm, node.args[1].target).detach()
                policy.weight = _uint8_weight(_cpu_weight(recipe.weight, 8, factors.get(name)), weight)
            else:
                bits = depthwise_bits if depthwise else weight_bits
                policy.weight = _cpu_weight(recipe.weight, bits, factors.get(name))
                if policy.weight.calibrated and recipe.weight_rounding is not None:  # the recipe's own scales
                    policy.weight_rounding = flip_offsets(recipe.weight_rounding, factors.get(name), name)
        # a clamp after an int8 conv rides on the conv's output quantizer (ORT drops it), so no Q in between
        for idx in (_tensor_args(node) if role not in ("cat", "act") else []):
            policy.inputs[idx] = known.inputs[idx] if known else recipe_specs.get(source_through(node.args[idx]), activation)
        if _needs_output(node, role, int8):
            if known:
                policy.output = known.output
            elif node.meta[TAGS].get("sub") == "sigmoid":
                policy.output = activation.with_params([1 / 255], [0])  # sigmoid ∈ [0, 1]
            else:
                policy.output = recipe_specs.get(node, activation)
        out.set(name, policy)
    for layer, policy in plan.layers.items():  # the recipe's log2 post-softmax quantizers stay
        if policy.output is not None and policy.output.kind == "log2":
            out.layers.setdefault(layer, LayerPolicy()).output = policy.output
    return out, int8


def cpu_plan(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, calib_loader: Iterable, weight_bits: int | None = None,
             layers: Iterable[str] | None = None, mse_weights: bool = False, max_batches: int | None = None,
             progress: bool = False, exact_weights: Iterable[str] | None = None
             ) -> tuple[QuantPlan, HybridGraph, int]:
    """A calibrated plan for ONNX Runtime int8 CPU execution derived from a recipe's plan.

    Returns (plan, the graph it applies to: `cpu_graph(gm)`, weight bits). `layers` (default: every conv /
    linear / matmul the recipe quantizes) run int8. Between them, SiLU (as sigmoid and mul), CNN residual
    adds, concats and clamps are kept int8 too when every input comes from an int8 op, so data stays uint8
    from one kernel to the next. Each tensor gets one set of quantization parameters, shared by its producer's
    output quantizer and its consumers' input quantizers, so ORT sees Q→DQ pairs it can elide. The recipe's
    calibrated input ranges are reused, the others come from min-max over `calib_loader`. Weight-only recipe
    layers get activation quantizers too (int8 kernels need both); log2 post-softmax quantizers are kept.
    `weight_bits` (default `cpu_weight_bits()`) applies to every weight; by default depthwise convs get 8, and
    so do `exact_weights` (default `HybridGraph.exact_weight_layers`: transformer blocks and bridges) through u8u8 kernels.
    A recipe plan with bias corrections gets them measured again for the weights chosen here.
    """
    hg = cpu_graph(analyze_for(gm, plan))
    default = weight_bits is None
    depthwise_bits = cpu_weight_bits(depthwise=True) if default else weight_bits
    weight_bits = cpu_weight_bits() if default else weight_bits
    if exact_weights is None:
        exact_weights = hg.exact_weight_layers() if default else []
    chosen = list(layers) if layers is not None else int8_candidates(hg, plan)
    out, int8 = region_plan(hg, plan, chosen, weight_bits, depthwise_bits=depthwise_bits, exact=exact_weights)
    out.meta["ort"].update(depthwise_weight_bits=depthwise_bits,
                           uint8_weights=sorted(n for n, p in out.layers.items() if p.weight and p.weight.scheme ==
                                                "asymmetric"))
    out = calibrate_activations(hg.gm, out, calib_loader, max_batches=max_batches, progress=progress)
    _fit_clamp_ranges(out, int8)
    _share_tensor_specs(plan=out, int8=int8)
    for layer, policy in out.layers.items():
        if policy.weight is not None and mse_weights and policy.weight.scheme == "symmetric":
            weight = getattr_path(hg.gm, hg.node(layer).args[1].target).detach()
            policy.set_weight(mse_weight_spec(weight, policy.weight))
    if any(p.bias_correction is not None for p in plan.layers.values()):  # measured again for these weights
        out = correct_bias(hg, out, calib_loader, max_batches=max_batches)
    return out, hg, weight_bits


def mse_weight_spec(weight: torch.Tensor, spec: QuantSpec, ratios: Iterable[float] = np.linspace(1.0, 0.6, 17)
                    ) -> QuantSpec:
    """Symmetric per-channel weight scales that minimise each channel's squared rounding + clipping error.

    Min-max scales waste codes on the largest weight of a channel; at 7 bits (the no-VNNI default) a clipped
    range that lowers the error of every other weight wins back most of the bit lost. Grid over clip ratios.
    """
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    amax = flat.abs().amax(dim=1).clamp_min(1e-8)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / spec.qmax
    for ratio in ratios:
        scale = amax * float(ratio) / spec.qmax
        q = torch.clamp(torch.round(flat / scale[:, None]), spec.qmin, spec.qmax) * scale[:, None]
        err = (q - flat).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return spec.with_params(best.tolist(), [0] * len(best))


def _grow_int8(hg: HybridGraph, int8: dict[fx.Node, str]) -> None:
    """Add the cheap int8 ops that keep data uint8 between int8 layers (SiLU halves, CNN adds, concats)."""
    def fed_by_int8(node: fx.Node) -> bool:
        srcs = [source_through(node.args[i]) for i in _tensor_args(node)]
        return bool(srcs) and all(s in int8 for s in srcs)

    for node in hg.gm.graph.nodes:  # topological order: producers are decided first
        if node.op != "call_function" or node in int8:
            continue
        info = node.meta.get(TAGS, {})
        if info.get("sub") == "sigmoid" and fed_by_int8(node):
            int8[node] = "sigmoid"
        elif info.get("sub") == "silu" and node.target is aten.mul.Tensor and fed_by_int8(node):
            int8[node] = "mul"
        elif node.target is aten.add.Tensor and info.get("region") == "cnn" and len(_tensor_args(node)) == 2 \
                and fed_by_int8(node):
            int8[node] = "add"
        elif node.target is aten.cat.default and info.get("region") == "cnn" and \
                all(isinstance(a, fx.Node) and source_through(a) in int8 for a in node.args[0]):
            int8[node] = "cat"
        elif node.target in _RELU_LIKE and fed_by_int8(node):
            int8[node] = "act"


def _needs_output(node: fx.Node, role: str, int8: dict[fx.Node, str]) -> bool:
    """Output quantizer: always for conv / sigmoid / mul / add / cat (their int8 kernels write uint8), for a
    linear or matmul only when every consumer is int8 (else its kernel writes float, MatMulIntegerToFloat);
    a conv followed only by a ReLU-like op hands its quantizer to that op (ORT folds the clamp)."""
    consumers = [c for c, _ in _consumers(node)]
    if role == "layer" and node.meta[TAGS]["kind"] == CONV and consumers and \
            all(int8.get(c) == "act" for c in consumers):
        return False
    if role == "layer" and node.meta[TAGS]["kind"] in (LINEAR, MATMUL):
        return bool(consumers) and all(c in int8 for c in consumers)
    return True


def _clamp_bounds(node: fx.Node) -> tuple[float, float]:
    """(min, max) a ReLU-like op clamps to."""
    if node.target in (aten.relu.default, aten.relu_.default):
        return 0.0, float("inf")
    if node.target in _RELU6:
        return 0.0, 6.0
    args = list(node.args[1:]) + [None] * 2
    if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
        lo, hi = node.kwargs.get("min_val", args[0]), node.kwargs.get("max_val", args[1])
        return float(-1 if lo is None else lo), float(1 if hi is None else hi)
    lo, hi = node.kwargs.get("min", args[0]), node.kwargs.get("max", args[1])
    return float("-inf" if lo is None else lo), float("inf" if hi is None else hi)


def _fits(spec: QuantSpec, scale: np.float32, zero: int, lo: float, hi: float) -> bool:
    """Whether the quantizer's range lies inside [lo, hi], in float32 as ORT checks it."""
    return bool(scale * np.float32(spec.qmax - zero) <= np.float32(hi) and
                scale * np.float32(spec.qmin - zero) >= np.float32(lo))


def _fit_clamp_ranges(plan: QuantPlan, int8: dict[fx.Node, str]) -> None:
    """Shrink the output quantizer of each int8 ReLU-like op to lie inside its clamp range.

    ORT drops a Clip / Relu before a QuantizeLinear, and so fuses conv → clamp → Q into one QLinearConv, only
    when the quantizer's range [s·(0 − z), s·(255 − z)] lies inside the clamp's; a searched scale (a factor
    above 1 on ReLU6's [0, 6]) leaves the clamp, and the conv, in float. Over the clamp's range the fitted
    quantizer is the same or finer, so nothing representable is lost.
    """
    for node, role in int8.items():
        policy = plan.layers.get(node.meta[TAGS]["name"])
        if role != "act" or policy is None or policy.output is None or not policy.output.calibrated:
            continue
        spec = policy.output
        lo_clamp, hi_clamp = _clamp_bounds(node)
        scale, zero = np.float32(spec.scale[0]), spec.zero_point[0]
        if _fits(spec, scale, zero, lo_clamp, hi_clamp):
            continue
        lo = max(float(scale) * (spec.qmin - zero), lo_clamp)
        hi = min(float(scale) * (spec.qmax - zero), hi_clamp)
        if not lo <= 0 <= hi or hi <= lo:
            continue
        new_scale = np.float32((hi - lo) / (spec.qmax - spec.qmin))
        new_zero = int(np.clip(round(spec.qmin - lo / float(new_scale)), spec.qmin, spec.qmax))
        for _ in range(4):  # step down until the float32 range fits
            if _fits(spec, new_scale, new_zero, lo_clamp, hi_clamp):
                break
            new_scale = np.nextafter(new_scale, np.float32(0))
        policy.output = spec.with_params([float(new_scale)], [new_zero])


def _share_tensor_specs(plan: QuantPlan, int8: dict[fx.Node, str]) -> None:
    """Give every quantizer of one tensor the same parameters: its producer's output spec when it has one."""
    for node in int8:
        name = node.meta[TAGS]["name"]
        policy = plan.layers.get(name)
        if policy is None:
            continue
        for idx in list(policy.inputs):
            src = source_through(node.args[idx])
            src_policy = plan.layers.get(src.meta.get(TAGS, {}).get("name", ""))
            if src in int8 and src_policy is not None and src_policy.output is not None:
                policy.inputs[idx] = src_policy.output


def _uniform8(spec: QuantSpec) -> QuantSpec:
    """The activation as uint8 per tensor, what ORT's u8s8 kernels run fastest on x86.

    A calibrated 8-bit asymmetric spec is kept; a calibrated 8-bit symmetric one becomes uint8 with zero
    point 128 and the same scale (its range [-127, 127]·s plus one code below), so the s8s8 kernels and the
    int8 ↔ uint8 conversions between them are never needed; anything else is calibrated again (min-max).
    """
    if spec.bits == 8 and spec.granularity == "tensor" and spec.calibrated:
        if spec.scheme == "asymmetric":
            return spec
        return QuantSpec(bits=8, granularity="tensor", scheme="asymmetric").with_params(spec.scale, [128])
    return QuantSpec(bits=8, granularity="tensor", scheme="asymmetric")


def _uint8_weight(spec: QuantSpec, weight: torch.Tensor) -> QuantSpec:
    """A symmetric 8-bit per-channel weight spec as uint8 with zero point 128 in every channel (same codes
    shifted: ORT's u8u8 kernels run it exactly without VNNI, and one zero point for all channels is allowed)."""
    spec = calibrate_weight(weight, spec)
    scale = list(spec.scale) * (weight.shape[0] if len(spec.scale) == 1 else 1)
    return QuantSpec(bits=8, granularity="channel", scheme="asymmetric", axis=0).with_params(scale, [128] * len(scale))


def _cpu_weight(spec: QuantSpec | None, weight_bits: int, factor: torch.Tensor | None) -> QuantSpec:
    """The int8 kernel's weight spec: the recipe's own when it is symmetric and fits `weight_bits` (carried
    through BatchNorm folding by the fold `factor`), else symmetric per channel, calibrated again (min-max)."""
    if spec is not None and spec.kind == "uniform" and spec.scheme == "symmetric" and spec.bits <= weight_bits \
            and spec.calibrated:
        carried = folded_weight_spec(spec, factor) if factor is not None else spec
        if carried is not None:
            return carried
    bits = min(weight_bits, spec.bits) if spec is not None else weight_bits
    return QuantSpec(bits=bits, granularity="channel", scheme="symmetric", axis=0)
