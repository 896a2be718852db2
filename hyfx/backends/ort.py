"""ONNX Runtime: int8 CPU lowering, sessions, timing, and parity against the PyTorch quantized graph.

The int8 lowering (`cpu_plan`, `compile_cpu`) turns a recipe's plan into a model ONNX Runtime runs fast here:
- Q/DQ sit where ORT fuses them into int8 kernels: DQ(x), DQ(w) → Conv → Q becomes QLinearConv, so int8
  convolutions also get an output quantizer; DQ → MatMul / Gemm becomes MatMulIntegerToFloat / QGemm with a
  float output, so a linear or attention matmul gets one only when all its consumers are int8.
- Between int8 layers the data stays uint8: SiLU is split into sigmoid (QLinearSigmoid, a lookup table) and
  mul (QLinearMul), CNN residual adds (QLinearAdd), concats and clamps (folded into the conv) join the int8
  region when all their inputs are int8. Norms, softmax, GELU and the transformer residual stream stay FP32
  with no Q/DQ chatter around reshape / transpose / unfold chains (each tensor has one set of parameters, so
  ORT elides the Q→DQ pairs and moves data-movement ops onto the uint8 side). Those chains are rewritten as
  transposes ORT runs fast on uint8 too (`onnx_layout.fast_transposes`, part of every `target="ort"` export):
  MobileViT's unfold / fold had cost more on uint8 than the int8 layers saved.
- BatchNorm is folded into the convolutions first; weight scales are taken on the folded weights.
- Without AVX-VNNI, MLAS's u8s8 and s8s8 kernels multiply with VPMADDUBSW, whose 16-bit pair sums saturate
  for 8-bit weights (measured here: whole-range output errors on a 1x1 conv, u8u8 exact but ~20% slower);
  7-bit weights (|w| ≤ 63) cannot saturate (255·63·2 < 2^15) and keep the fast u8s8 kernel: the default there.
  Depthwise convolutions run a direct kernel with 32-bit sums and keep 8-bit weights (`cpu_weight_bits`).
- A recipe's searched specs are lowered as searched: symmetric weights (through BatchNorm folding, exactly),
  activation ranges, and symmetric int8 activations as uint8 with zero point 128 (no s8s8 kernels or
  conversions); a ReLU-like op's searched output range is fitted inside its clamp, which ORT then folds away.
- Which layers run int8: the layer latency table times each layer's int8 island against FP32 at its shape;
  `compile_cpu` keeps the layers above a speedup threshold and picks the threshold by timing whole candidate
  models (layout changes between int8 NHWC and FP32 NCHWc convs cost more than a table entry shows).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from hyfx.cpu import cpu_info
from hyfx.evaluate import Predictions, accuracy
from hyfx.graph import HybridGraph, analyze, analyze_for
from hyfx.meta import BN_FACTORS, EXAMPLE_SHAPE, TAGS
from hyfx.ops import CONV, LINEAR, MATMUL, getattr_path, is_depthwise, moves_values, node_shape, source_through
from hyfx.quant.calibrate import batches, calibrate_activations
from hyfx.quant.quantizers import calibrate_weight
from hyfx.quant.rounding import flip_offsets
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec
from hyfx.quant.targets import cpu_weight_bits, exact_weight_layers
from hyfx.refine.bias_correction import correct_bias
from hyfx.timing import median, time_interleaved

from . import onnx_qdq

aten = torch.ops.aten
DEFAULT_THREADS = 2


# ---------------------------------------------------------------------------------------------- sessions


def session(model: onnx.ModelProto | str | Path, threads: int = DEFAULT_THREADS,
            optimize: bool = True) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads (inter-op 1), every graph optimisation on by default."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, images: torch.Tensor) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0]


def predict(sess: ort.InferenceSession, loader: Iterable) -> Predictions:
    logits, labels = [], []
    for images, target in loader:
        logits.append(torch.from_numpy(run(sess, images)))
        labels.append(torch.as_tensor(target))
    return Predictions(torch.cat(logits), torch.cat(labels))


@dataclass
class Parity:
    """ORT output of an exported model vs the PyTorch graph it was lowered from (and vs FP32)."""

    n: int
    agreement: float  # top-1 agreement with the PyTorch quantized graph, percent
    max_abs_diff: float  # largest |logit difference| to the PyTorch quantized graph
    top1_ort: float
    top1_torch: float
    top1_fp32: float | None = None
    agreement_fp32: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"ORT vs PyTorch quantized on {self.n} images: top-1 agreement {self.agreement:.2f}%, "
                f"max |Δlogit| {self.max_abs_diff:.4g}; top-1 ORT {self.top1_ort:.2f}% / PyTorch {self.top1_torch:.2f}%")
        if self.top1_fp32 is not None:
            text += f" / FP32 {self.top1_fp32:.2f}% (agreement with FP32 {self.agreement_fp32:.2f}%)"
        return text


def logits(module: torch.nn.Module, loader: Iterable) -> torch.Tensor:
    """A PyTorch model's logits over a loader, to compare several ORT models against one reference run."""
    with torch.no_grad():
        return torch.cat([module(images).float() for images, _ in loader])


def parity(model: onnx.ModelProto | ort.InferenceSession, reference: torch.nn.Module | torch.Tensor, loader: Iterable,
           fp32: torch.nn.Module | torch.Tensor | None = None, threads: int = DEFAULT_THREADS) -> Parity:
    """Run the ONNX model in ORT and `reference` in PyTorch on the same images; compare top-1 and logits.

    `reference` / `fp32` may be modules or their logits over `loader` already computed (see `logits`).
    """
    sess = model if isinstance(model, ort.InferenceSession) else session(model, threads)
    loader = list(loader)
    labels = torch.cat([torch.as_tensor(target) for _, target in loader])
    ort_pred = Predictions(torch.cat([torch.from_numpy(run(sess, images)) for images, _ in loader]), labels)
    want = reference if isinstance(reference, torch.Tensor) else logits(reference, loader)
    torch_pred = Predictions(want, labels)
    ort_acc = accuracy(ort_pred, torch_pred)
    result = Parity(len(labels), ort_acc.agreement, float((ort_pred.logits - torch_pred.logits).abs().max()),
                    ort_acc.top1, accuracy(torch_pred).top1)
    if fp32 is not None:
        fp32_pred = Predictions(fp32 if isinstance(fp32, torch.Tensor) else logits(fp32, loader), labels)
        result.top1_fp32 = accuracy(fp32_pred).top1
        result.agreement_fp32 = accuracy(ort_pred, fp32_pred).agreement
    return result


# ---------------------------------------------------------------------------------------------- timing


def time_sessions(sessions: dict, inputs: np.ndarray, runs: int = 30, warmup: int = 5,
                  clock=time.perf_counter) -> dict:
    """Per-run latency (s) of each session on `inputs`, interleaved run by run (`hyfx.timing.time_interleaved`)."""
    calls = {name: partial(s.run, None, {s.get_inputs()[0].name: inputs}) for name, s in sessions.items()}
    return time_interleaved(calls, runs=runs, warmup=warmup, clock=clock)


# ---------------------------------------------------------------------------------------------- latency table


@dataclass
class LayerTiming:
    layer: str
    kind: str
    shape: str
    fp32_us: float
    int8_us: float

    @property
    def speedup(self) -> float:
        return self.fp32_us / self.int8_us if self.int8_us else 0.0


def _tensor_info(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _qdq(prefix: str, src: str, scale: float, zero_point: int, signed: bool) -> tuple[list, list, str]:
    dtype = TensorProto.INT8 if signed else TensorProto.UINT8
    inits = [numpy_helper.from_array(np.array(scale, np.float32), prefix + "_s"),
             helper.make_tensor(prefix + "_z", dtype, [], [zero_point])]
    nodes = [helper.make_node("QuantizeLinear", [src, prefix + "_s", prefix + "_z"], [prefix + "_q"]),
             helper.make_node("DequantizeLinear", [prefix + "_q", prefix + "_s", prefix + "_z"], [prefix + "_d"])]
    return nodes, inits, prefix + "_d"


def _weight_dq(weight: np.ndarray, axis: int, qmax: int) -> tuple[list, list, str]:
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    scale = np.maximum(np.abs(moved).max(1), 1e-8) / qmax
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale.astype(np.float32), "ws"),
             numpy_helper.from_array(np.zeros(len(scale), np.int8), "wz")]
    return [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis)], inits, "wd"


def _layer_models(gm: fx.GraphModule, node: fx.Node, kind: str, batch: int, weight_qmax: int
                  ) -> tuple[onnx.ModelProto, onnx.ModelProto, list[np.ndarray], str]:
    """(FP32 model, int8-island model, inputs, shape text) for one conv / linear / matmul node at `batch`."""
    rng = np.random.default_rng(0)
    shapes = [node_shape(a) if isinstance(a, fx.Node) else None for a in node.args[:2]]
    if shapes[0] is None:
        raise ValueError(f"{node.name}: no recorded input shape")
    x_shape = (batch, *shapes[0][1:])
    if kind == MATMUL:
        b_shape = (batch, *shapes[1][1:]) if shapes[1] is not None and len(shapes[1]) == len(shapes[0]) else shapes[1]
        feeds = [rng.random(x_shape, dtype=np.float32), rng.standard_normal(b_shape).astype(np.float32)]
        inputs = [_tensor_info("x", x_shape), _tensor_info("b", b_shape)]
        fp32 = [helper.make_node("MatMul", ["x", "b"], ["y"])]
        n1, i1, xd = _qdq("a", "x", 1 / 255, 0, False)
        n2, i2, bd = _qdq("c", "b", 4 / 255, 128, False)
        int8 = [*n1, *n2, helper.make_node("MatMul", [xd, bd], ["y"])]
        return (_model(fp32, inputs, []), _model(int8, inputs, i1 + i2), feeds,
                f"{tuple(x_shape)}@{tuple(b_shape)}")
    weight = getattr_path(gm, node.args[1].target).detach().float().numpy()
    weight_shape = weight.shape
    feeds = [rng.random(x_shape, dtype=np.float32)]
    inputs = [_tensor_info("x", x_shape)]
    n1, i1, xd = _qdq("a", "x", 1 / 255, 0, False)
    if kind == CONV:
        stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]):])
        nd = len(weight_shape) - 2
        attrs = dict(strides=_ints(stride, nd), dilations=_ints(dilation, nd), group=int(groups))
        if isinstance(padding, str):
            attrs["auto_pad"] = "SAME_UPPER" if padding == "same" else "VALID"
        else:
            attrs["pads"] = _ints(padding, nd) * 2
        wn, wi, wd = _weight_dq(weight, 0, weight_qmax)
        fp32 = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
        n3, i3, _ = _qdq("o", "y0", 8 / 255, 128, False)
        int8 = [*n1, *wn, helper.make_node("Conv", [xd, wd], ["y0"], **attrs), *n3,
                helper.make_node("Identity", ["o_d"], ["y"])]
        return (_model(fp32, inputs, [numpy_helper.from_array(weight, "w")]), _model(int8, inputs, i1 + wi + i3), feeds,
                f"{tuple(x_shape)} w{tuple(weight_shape)} g{groups}")
    # linear: y = x W^T, as the exporter writes it (MatMul on the transposed weight)
    weight_t = np.ascontiguousarray(weight.T)
    wn, wi, wd = _weight_dq(weight_t, 1, weight_qmax)
    fp32 = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    int8 = [*n1, *wn, helper.make_node("MatMul", [xd, wd], ["y"])]
    return (_model(fp32, inputs, [numpy_helper.from_array(weight_t, "w")]), _model(int8, inputs, i1 + wi), feeds,
            f"{tuple(x_shape)} w{tuple(weight_shape)}")


def _ints(value, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    return [int(v) for v in value]


def _model(nodes: list, inputs: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layer", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_qdq.OPSET)])


def layer_latency_table(hg: HybridGraph, layers: Iterable[str], batch: int = 1, weight_bits: int = 7,
                        runs: int = 40) -> dict[str, LayerTiming]:
    """Each layer alone in ORT at its real shape and `batch`: FP32 op vs its int8 island (Q in, int8 op, DQ out).

    The island is what the lowering produces for a layer between FP32 neighbours, so a layer whose island is
    slower than its FP32 op is better left in FP32. Timed single-threaded in thread CPU time, which other
    processes on a shared machine do not inflate (wall time of a 2-thread session does).
    """
    table = {}
    qmax = 2 ** (weight_bits - 1) - 1
    for layer in layers:
        node = hg.node(layer)
        kind = node.meta[TAGS]["kind"]
        try:
            fp32, int8, feeds, shape = _layer_models(hg.gm, node, kind, batch, qmax)
        except (ValueError, TypeError, IndexError):
            continue
        sessions = {"fp32": session(fp32, 1), "int8": session(int8, 1)}
        names = {k: [i.name for i in s.get_inputs()] for k, s in sessions.items()}
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(3):
            for k, s in sessions.items():
                s.run(None, dict(zip(names[k], feeds, strict=False)))
        for _ in range(runs):
            for k, s in sessions.items():
                start = time.thread_time()
                s.run(None, dict(zip(names[k], feeds, strict=False)))
                times[k].append(time.thread_time() - start)
        table[layer] = LayerTiming(layer, kind, shape, median(times["fp32"]) * 1e6, median(times["int8"]) * 1e6)
    return table


# ---------------------------------------------------------------------------------------------- the int8 plan


@dataclass
class CpuPlanInfo:
    weight_bits: int
    vnni: bool
    int8_layers: list[str] = field(default_factory=list)  # conv / linear / matmul run by int8 kernels
    int8_ops: list[str] = field(default_factory=list)  # sigmoid / mul / add / cat / clamp kept int8 between them
    fp32_layers: list[str] = field(default_factory=list)  # quantizable, left FP32 (int8 not faster)
    latency: dict[str, dict] = field(default_factory=dict)  # the layer latency table
    tuning: list[dict] = field(default_factory=list)  # whole-model timings of the candidate int8 sets
    threshold: float | None = None  # the chosen minimum island speedup
    uint8_weight_layers: list[str] = field(default_factory=list)  # 8-bit weights run by u8u8 kernels (no VNNI)

    def to_dict(self) -> dict:
        return asdict(self)


_SILU = (aten.silu.default, aten.silu_.default)
_RELU6 = tuple(getattr(aten, name).default for name in ("relu6", "relu6_") if hasattr(aten, name))
_RELU_LIKE = (aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
              aten.clamp.default, *_RELU6)


def decompose_silu(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with SiLU written as x · sigmoid(x), so the sigmoid output can carry its own quantizer.

    ONNX Runtime has int8 kernels for Sigmoid (a lookup table) and Mul but none for SiLU: an int8 chain
    conv → SiLU → conv stays int8 only if both halves are quantized. The Mul keeps the SiLU's layer name;
    the Sigmoid is named `<silu>.sigmoid`.
    """
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SILU:
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            sig = gm.graph.call_function(aten.sigmoid.default, (x,))
            mul = gm.graph.call_function(aten.mul.Tensor, (x, sig))
        info = dict(node.meta.get(TAGS, {}))
        for new, name, sub in ((sig, f"{info.get('name', node.name)}.sigmoid", "sigmoid"), (mul, info.get("name"), "silu")):
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "tensor_meta")})
            new.meta[TAGS] = {**info, "name": name or new.name, "sub": sub, "kind": "act"}
        node.replace_all_uses_with(mul)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def cpu_graph(gm: fx.GraphModule | HybridGraph) -> HybridGraph:
    """The analysed graph as the CPU lowering runs it: BatchNorm folded into convs, SiLU as x · sigmoid(x)."""
    hg = gm if isinstance(gm, HybridGraph) else analyze(gm)
    folded, _ = onnx_qdq.fold_batchnorm(hg.gm)
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


def _candidates(hg: HybridGraph, plan: QuantPlan) -> list[str]:
    """The recipe's layers an int8 kernel can run: uniform-weight conv / linear, uniform-input matmul."""
    out = []
    for layer, policy in plan.layers.items():
        kind = hg.tags(layer)["kind"]
        if kind in (CONV, LINEAR) and policy.weight is not None and policy.weight.kind == "uniform":
            out.append(layer)
        elif kind == MATMUL and policy.inputs and all(s.kind == "uniform" for s in policy.inputs.values()):
            out.append(layer)
    return out


def _region_plan(hg: HybridGraph, plan: QuantPlan, layers: Iterable[str], weight_bits: int,
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
    so do `exact_weights` (default `exact_weight_layers`: transformer blocks and bridges) through u8u8 kernels.
    A recipe plan with bias corrections gets them measured again for the weights chosen here.
    """
    hg = cpu_graph(analyze_for(gm, plan))
    default = weight_bits is None
    depthwise_bits = cpu_weight_bits(depthwise=True) if default else weight_bits
    weight_bits = cpu_weight_bits() if default else weight_bits
    if exact_weights is None:
        exact_weights = exact_weight_layers(hg) if default else []
    chosen = list(layers) if layers is not None else _candidates(hg, plan)
    out, int8 = _region_plan(hg, plan, chosen, weight_bits, depthwise_bits=depthwise_bits, exact=exact_weights)
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
        carried = onnx_qdq.folded_weight_spec(spec, factor) if factor is not None else spec
        if carried is not None:
            return carried
    bits = min(weight_bits, spec.bits) if spec is not None else weight_bits
    return QuantSpec(bits=bits, granularity="channel", scheme="symmetric", axis=0)


@dataclass
class CpuResult:
    export: onnx_qdq.ExportResult
    plan: QuantPlan
    info: CpuPlanInfo


THRESHOLDS = (0.0, 0.8, 0.95, 1.05, 1.2)


def compile_cpu(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, calib_loader: Iterable, path: str | Path | None = None,
                log2_mode: str = "exact", weight_bits: int | None = None, batch: int = 1,
                thresholds: Iterable[float] = THRESHOLDS, runs: int = 15, max_batches: int | None = None,
                exact_weights: Iterable[str] | None = None) -> CpuResult:
    """Recipe plan → the fastest ORT int8 model this CPU runs (see the module docstring).

    `exact_weights`: layers whose weights stay 8-bit on a CPU without VNNI (default: `exact_weight_layers`,
    the transformer blocks and bridges; `[]` for all-7-bit weights, the fastest and least accurate).

    1. Every layer the recipe quantizes is planned int8 and calibrated (`cpu_plan`), and exported once.
    2. The layer latency table times each layer's int8 island against FP32 at its shape and `batch`.
    3. For each threshold t, the layers whose island speedup is ≥ t stay int8 (with the ops grown between
       them); each candidate is lowered from the one export and timed whole in ORT (one thread, thread CPU
       time, interleaved); the fastest wins. Whole-model timing decides because layout changes between
       int8 (NHWC) and FP32 (NCHWc) convolutions cost more than any single layer's table entry shows.
    """
    full, hg, bits = cpu_plan(gm, plan, calib_loader, weight_bits=weight_bits, max_batches=max_batches,
                              exact_weights=exact_weights)
    candidates = _candidates(hg, plan)
    table = layer_latency_table(hg, candidates, batch=batch, weight_bits=bits)
    exported = onnx_qdq.export(hg, full, None, target="ort", log2_mode=log2_mode)
    info = CpuPlanInfo(bits, cpu_info().vnni, latency={k: {**asdict(v), "speedup": round(v.speedup, 3)}
                                                       for k, v in table.items()})
    variants: dict[float, tuple[QuantPlan, onnx.ModelProto, list[str]]] = {}
    seen: set[frozenset] = set()
    for t in sorted(set(thresholds)):
        chosen = [layer for layer in candidates if layer not in table or table[layer].speedup >= t]
        if frozenset(chosen) in seen:
            continue
        seen.add(frozenset(chosen))
        vplan, _ = _region_plan(hg, plan, chosen, bits, specs=full)
        keep = {(layer, role) for layer, role, _ in vplan.specs()}
        model = onnx_qdq.lower_subset(exported, keep)
        variants[t] = (vplan, model, chosen)
    shape = hg.gm.meta[EXAMPLE_SHAPE]
    inputs = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    sessions = {t: session(model, threads=1) for t, (_, model, _) in variants.items()}
    timings = time_sessions(sessions, inputs, runs=runs, warmup=2, clock=time.thread_time)
    best = min(timings, key=lambda t: median(timings[t]))
    info.tuning = [{"threshold": t, "int8_layers": len(variants[t][2]), "cpu_ms": round(median(v) * 1000, 3)}
                   for t, v in timings.items()]
    info.threshold = best
    vplan, model, chosen = variants[best]
    info.int8_layers = chosen
    info.uint8_weight_layers = [layer for layer in full.meta["ort"]["uint8_weights"] if layer in chosen]
    info.fp32_layers = [layer for layer in candidates if layer not in chosen]
    _, int8 = _region_plan(hg, plan, chosen, bits, specs=full)
    info.int8_ops = sorted(n.meta[TAGS]["name"] for n, role in int8.items() if role != "layer")
    if any(full.layers[layer].bias_correction is not None or full.layers[layer].weight_rounding is not None
           for layer in info.fp32_layers if layer in full.layers):  # baked into constants lower_subset cannot drop
        model = onnx_qdq.export(hg, vplan, None, target="ort", log2_mode=log2_mode).model  # FP32 layers: own weights
    reference, _, _, _ = onnx_qdq.prepare(hg, vplan)
    report = replace(exported.report, quant_points=sum(1 for _ in vplan.specs()),
                     counts=onnx_qdq.check_qdq(model, "ort"), model_bytes=model.ByteSize())
    result = onnx_qdq.ExportResult(model, reference, [p for p in exported.points if (p.layer, p.role) in
                                                      {(la, r) for la, r, _ in vplan.specs()}], report)
    if path is not None:
        result.save(path)
    return CpuResult(result, vplan, info)


# ---------------------------------------------------------------------------------------------- baselines


def fp32_model(gm: fx.GraphModule | HybridGraph) -> onnx.ModelProto:
    """The FP32 ONNX model of a captured graph (BN folded by the exporter), dynamic batch."""
    hg = gm if isinstance(gm, HybridGraph) else analyze(gm)
    shape = hg.gm.meta[EXAMPLE_SHAPE]
    graph = copy.deepcopy(hg.gm)
    return onnx_qdq.export_graph(graph, torch.randn(max(2, shape[0]), *shape[1:]))


def ort_quantize_static(fp32: onnx.ModelProto, calib_loader: Iterable, out: str | Path, quant_format: str = "qdq",
                        per_channel: bool = True, max_batches: int | None = None) -> Path:
    """ONNX Runtime's own quantize_static (u8 activations, s8 weights), the baseline hyfx is compared with."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    src = out.with_suffix(".fp32.onnx")
    pre = out.with_suffix(".pre.onnx")
    onnx.save(fp32, str(src))
    quant_pre_process(str(src), str(pre))
    name = fp32.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: x.numpy()} for x in batches(calib_loader, max_batches)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(pre), str(out), Reader(),
                    quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel)
    for tmp in (src, pre):
        tmp.unlink(missing_ok=True)
    return out
