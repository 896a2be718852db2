"""Device profiles, the paper's energy model, per-layer work from graph shapes, and latency models.

HySquant prices a per-layer bit-width choice with three hardware figures: latency, energy and weight
bytes. Latency comes from a `LatencyModel`: `RooflineLatency` (FLOPs and bytes of each layer against a
device profile's peaks; works anywhere, predicts only) or `MeasuredLatency` (whole-model timing deltas
from any timer, e.g. PyTorch on this CPU now, an ONNX Runtime session later). Energy is the paper's
model: power per FLOP p_f = m_p / m_f (max power / peak FLOPS) and E = p_f × latency.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.fx as fx

from hyfx.cpu import cpu_info
from hyfx.errors import HyfxError
from hyfx.meta import TAGS
from hyfx.ops import CONV, LINEAR, MATMUL, QUANT, RESHAPE, example_shape, weight_arg
from hyfx.quant.quantizers import qd  # also registers the fused hyfx fake-quant ops model_bytes reads

QUANTIZABLE = (CONV, LINEAR, MATMUL)
OUTPUT_BYTES_PER_ELEMENT = 1  # a layer's output is requantized to int8 for the next layer in a deployed int graph


# ---------------------------------------------------------------------------------------------- bit configs


@dataclass(frozen=True, order=True)
class BitConfig:
    """One choice for a layer: weight bits and activation (input) bits."""

    w_bits: int
    a_bits: int

    def __post_init__(self) -> None:
        for bits in (self.w_bits, self.a_bits):
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise HyfxError(f"unsupported bit-width {bits!r} in a bit config: use 2 to 8 bits")

    @property
    def name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @classmethod
    def parse(cls, text: str) -> BitConfig:
        t = text.strip().upper()
        if not (t.startswith("W") and "A" in t):
            raise HyfxError(f"bad bit config {text!r}: write it as W<bits>A<bits>, e.g. W4A8")
        w, a = t[1:].split("A", 1)
        try:
            return cls(int(w), int(a))
        except ValueError:
            raise HyfxError(f"bad bit config {text!r}: write it as W<bits>A<bits>, e.g. W4A8") from None

    def __str__(self) -> str:
        return self.name


DEFAULT_CONFIGS = tuple(BitConfig.parse(c) for c in ("W4A4", "W4A8", "W8A4", "W8A8"))


# ---------------------------------------------------------------------------------------------- device profiles


@dataclass(frozen=True)
class DeviceProfile:
    """Peak figures of one device, as data.

    `int_ops` maps an integer container width (bits) to peak dense ops/s; a layer runs in the narrowest
    container holding both its weight and activation bits (W6A6 runs as int8), or at FP32 peak when none does.
    """

    name: str
    max_power_w: float  # m_p
    peak_flops: float  # m_f, FP32 FLOP/s
    memory_bandwidth: float  # bytes/s
    int_ops: dict[int, float] = field(default_factory=dict)
    memory_power_w: float | None = None
    source: str = ""

    @property
    def power_per_flop(self) -> float:
        """p_f = m_p / m_f: the paper's power per FLOP (W per FLOP/s)."""
        return power_per_flop(self.max_power_w, self.peak_flops)

    def energy(self, latency_s: float) -> float:
        return energy(latency_s, self.max_power_w, self.peak_flops)

    def compute_rate(self, bits: int) -> float:
        """Peak ops/s for a layer whose widest operand has `bits` bits."""
        containers = sorted(b for b in self.int_ops if b >= bits)
        return self.int_ops[containers[0]] if containers else self.peak_flops

    def to_dict(self) -> dict:
        data = asdict(self)
        data["int_ops"] = {str(k): v for k, v in self.int_ops.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> DeviceProfile:
        data = dict(data)
        data["int_ops"] = {int(k): float(v) for k, v in (data.get("int_ops") or {}).items()}
        return cls(**data)


def power_per_flop(max_power_w: float, peak_flops: float) -> float:
    """p_f = m_p / m_f."""
    if max_power_w <= 0 or peak_flops <= 0:
        raise HyfxError(f"a device profile needs positive max power and peak FLOPS, got {max_power_w} W, {peak_flops}")
    return max_power_w / peak_flops


def energy(latency_s: float, max_power_w: float, peak_flops: float) -> float:
    """The paper's energy model, E = p_f × latency with p_f = m_p / m_f.

    Taken as the paper writes it: the figure is latency weighted by how many watts the device spends per
    FLOP/s of peak, so it ranks plans (and devices) but is not joules; multiply by m_f for the energy at
    max power over the latency (m_p × latency).
    """
    return power_per_flop(max_power_w, peak_flops) * latency_s


# The paper's RTX 3080 numbers, then Hopper from NVIDIA's datasheet; int8/int4 are dense tensor-core peaks.
PROFILES: dict[str, DeviceProfile] = {
    "rtx3080": DeviceProfile(
        name="rtx3080", max_power_w=320.0, memory_power_w=80.0, peak_flops=28.77e12, memory_bandwidth=760e9,
        int_ops={8: 238e12, 4: 476e12},
        source="HySquant paper (320 W max, 80 W memory, 28.77 TFLOPS); 760 GB/s and int8/int4 dense tensor "
               "TOPS from NVIDIA's GA102 whitepaper",
    ),
    "h100": DeviceProfile(
        name="h100", max_power_w=700.0, peak_flops=66.9e12, memory_bandwidth=3.35e12, int_ops={8: 1979e12},
        source="NVIDIA H100 SXM5 datasheet (700 W, 66.9 TFLOPS FP32, 1979 TOPS dense int8, 3.35 TB/s HBM3); "
               "Hopper has no int4 tensor cores, so 4-bit layers run as int8",
    ),
}

CPU_WATTS_PER_CORE = 280.0 / 64  # AMD EPYC 7763: 280 W TDP over 64 cores; an estimate for a share of a socket
CPU_BANDWIDTH_PER_CORE = 20e9  # bytes/s a single core streams from DDR4, an estimate


def this_cpu(threads: int | None = None) -> DeviceProfile:
    """A profile for the CPU cores this process uses, from /proc/cpuinfo (SIMD width, clock) and estimates.

    FP32 FLOPs per cycle per core: 64 with AVX-512, 32 with AVX2+FMA (two 256-bit FMA pipes), else 8.
    Integer dot products run 4× the FP32 rate with VNNI, 2× with AVX2's vpmaddubsw; no CPU has int4 units.
    Power and bandwidth are per-core estimates (CPU_WATTS_PER_CORE, CPU_BANDWIDTH_PER_CORE).
    """
    cores = threads or torch.get_num_threads() or os.cpu_count() or 1
    cpu = cpu_info()
    flags, mhz, model = cpu.flags, cpu.mhz, cpu.model
    ghz = (mhz or 2500.0) / 1000
    if "avx512f" in flags:
        per_cycle = 64
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32
    else:
        per_cycle = 8
    int8 = 4 if cpu.vnni or cpu.has("amx") else 2
    peak = cores * ghz * 1e9 * per_cycle
    return DeviceProfile(
        name="cpu", max_power_w=cores * CPU_WATTS_PER_CORE, peak_flops=peak,
        memory_bandwidth=cores * CPU_BANDWIDTH_PER_CORE, int_ops={8: int8 * peak},
        source=f"{model}, {cores} cores at {ghz:.2f} GHz, {per_cycle} FP32 FLOP/cycle/core; power "
               f"{CPU_WATTS_PER_CORE:.2f} W/core and bandwidth {CPU_BANDWIDTH_PER_CORE / 1e9:.0f} GB/s/core are estimates",
    )


def get_profile(name: str) -> DeviceProfile:
    """A named profile (rtx3080, h100, cpu) or a JSON file with DeviceProfile's fields."""
    if name == "cpu":
        return this_cpu()
    if name in PROFILES:
        return PROFILES[name]
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        try:
            return DeviceProfile.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise HyfxError(f"device profile {path} is not a valid profile ({exc})") from None
    raise HyfxError(f"unknown device {name!r}: use one of {', '.join([*PROFILES, 'cpu'])} or a profile .json file")


# ---------------------------------------------------------------------------------------------- layer work


@dataclass(frozen=True)
class LayerWork:
    """What one quantizable layer computes and moves, per image."""

    name: str
    kind: str
    macs: int
    weight_numel: int  # 0 for activation × activation matmuls
    weight_channels: int  # per-channel weight scales
    input_numel: tuple[int, ...]  # quantized activation inputs
    output_numel: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def weight_bytes(self, w_bits: int) -> float:
        """Packed weights plus one FP32 scale per output channel (symmetric weights store no zero point)."""
        if not self.weight_numel:
            return 0.0
        return math.ceil(w_bits * self.weight_numel / 8) + 4 * self.weight_channels

    def traffic_bytes(self, config: BitConfig) -> float:
        inputs = sum(config.a_bits * n / 8 for n in self.input_numel)
        return self.weight_bytes(config.w_bits) + inputs + OUTPUT_BYTES_PER_ELEMENT * self.output_numel


@dataclass(frozen=True)
class GraphWork:
    layers: dict[str, LayerWork]
    other_traffic: float  # bytes/image moved by the non-quantizable ops (elementwise, pooling, softmax, norms)
    fixed_bytes: float  # parameters that stay FP32: biases, norms, and the weights of layers not searched


def _shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """Output shape of every tensor node for one image, from running zeros of the captured example shape."""
    shape = example_shape(gm)
    if shape is None:
        raise HyfxError("graph has no recorded example input shape: capture the model with hyfx.capture")
    shapes: dict[str, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        Recorder(gm).run(torch.zeros((1, *shape[1:])))
    return shapes


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def graph_work(gm: fx.GraphModule, layers: Iterable[str] | None = None) -> GraphWork:
    """Per-layer MACs, weights and activation sizes from the tagged graph's shapes (batch 1).

    BatchNorm is counted as folded into its conv (free); reshapes and quantizers are free; every other op
    reads its inputs and writes its output once at one byte per element (an int8 pipeline).
    """
    shapes = _shapes(gm)
    tagged = {n.meta[TAGS]["name"]: n for n in gm.graph.nodes if TAGS in n.meta}
    wanted = set(layers) if layers is not None else {k for k, n in tagged.items() if n.meta[TAGS]["kind"] in QUANTIZABLE}
    unknown = sorted(wanted - set(tagged))
    if unknown:
        raise HyfxError(f"no layer named {unknown[0]!r} in this graph: run `hyfx inspect` to list layer names")
    odd = sorted(k for k in wanted if tagged[k].meta[TAGS]["kind"] not in QUANTIZABLE)
    if odd:
        raise HyfxError(f"layer {odd[0]!r} is a {tagged[odd[0]].meta['hyfx']['kind']}: only conv, linear and matmul "
                        "layers take bit-widths")
    work: dict[str, LayerWork] = {}
    searched_weights: set[str] = set()
    other = 0.0
    for node in gm.graph.nodes:
        info = node.meta.get(TAGS)
        if info is None or node.name not in shapes:
            continue
        name, kind = info["name"], info["kind"]
        out = _numel(shapes[node.name])
        tensor_inputs = [a for a in node.all_input_nodes if a.name in shapes and a.op != "get_attr"]
        if name in wanted:
            work[name] = _layer_work(gm, node, name, kind, shapes, out)
            if (w := weight_arg(node)) is not None:
                searched_weights.add(w.target)
        elif kind in (RESHAPE, QUANT) or info.get("sub") == "batch_norm":
            continue
        else:
            other += OUTPUT_BYTES_PER_ELEMENT * (out + sum(_numel(shapes[a.name]) for a in tensor_inputs))
    constants = {n.target for n in gm.graph.nodes if n.op == "get_attr"} - searched_weights
    fixed = 0.0
    for target in constants:
        value = _get(gm, target)
        if isinstance(value, torch.Tensor):
            fixed += value.numel() * value.element_size()
    return GraphWork(work, other, fixed)


def _get(module: torch.nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _layer_work(gm: fx.GraphModule, node: fx.Node, name: str, kind: str, shapes: dict, out: int) -> LayerWork:
    if kind in (CONV, LINEAR):
        w = weight_arg(node)
        if w is None:
            raise HyfxError(f"layer {name} has no constant weight: it cannot be searched over weight bits")
        weight = _get(gm, w.target)
        per_output = weight[0].numel()  # conv: Cin/groups × kh × kw; linear: in_features
        x = node.args[0]
        return LayerWork(name, kind, out * per_output, weight.numel(), weight.shape[0], (_numel(shapes[x.name]),), out)
    a, b = node.args[0], node.args[1]
    k = shapes[a.name][-1]
    return LayerWork(name, kind, out * k, 0, 0, (_numel(shapes[a.name]), _numel(shapes[b.name])), out)


# ---------------------------------------------------------------------------------------------- latency models


@runtime_checkable
class LatencyModel(Protocol):
    """Additive latency: T(plan) = fixed_latency() + Σ_layers layer_latency(layer, config), in seconds."""

    source: str  # "roofline:<device>" or "measured:<backend>"

    def layer_latency(self, layer: str, config: BitConfig) -> float: ...

    def fixed_latency(self) -> float: ...


class RooflineLatency:
    """Each layer takes max(FLOPs / peak rate at its container width, bytes moved / memory bandwidth)."""

    def __init__(self, work: GraphWork, profile: DeviceProfile):
        self.work = work
        self.profile = profile
        self.source = f"roofline:{profile.name}"

    def layer_latency(self, layer: str, config: BitConfig) -> float:
        lw = self.work.layers[layer]
        compute = lw.flops / self.profile.compute_rate(max(config.w_bits, config.a_bits))
        return max(compute, lw.traffic_bytes(config) / self.profile.memory_bandwidth)

    def fixed_latency(self) -> float:
        return self.work.other_traffic / self.profile.memory_bandwidth


Assignment = Mapping[str, BitConfig]
PlanTimer = Callable[[Assignment], float]  # seconds for one forward of the model quantized as assigned


class MeasuredLatency:
    """Per-layer latency from whole-model deltas on a real backend.

    T(reference) is timed once with every layer at `reference`; layer_latency(l, c) = T(reference with l at c)
    − T(reference), so the reference config costs zero and fixed_latency() is T(reference). Timings are
    taken lazily and cached; each is the timer's own median.
    """

    def __init__(self, timer: PlanTimer, layers: Iterable[str], reference: BitConfig, backend: str):
        self.timer = timer
        self.layers = list(layers)
        self.reference = reference
        self.source = f"measured:{backend}"
        self._cache: dict[tuple[str, BitConfig], float] = {}
        self._ref: float | None = None

    def fixed_latency(self) -> float:
        if self._ref is None:
            self._ref = self.timer({layer: self.reference for layer in self.layers})
        return self._ref

    def layer_latency(self, layer: str, config: BitConfig) -> float:
        if config == self.reference:
            return 0.0
        key = (layer, config)
        if key not in self._cache:
            assignment = {name: self.reference for name in self.layers}
            assignment[layer] = config
            self._cache[key] = self.timer(assignment) - self.fixed_latency()
        return self._cache[key]


# ---------------------------------------------------------------------------------------------- bytes, measured


def model_bytes(qgm: fx.GraphModule) -> float:
    """Bytes of a quantized graph's constants, read from the graph itself (not from the plan).

    A weight that feeds a quantize op (or a fused fake-quant op, `hyfx.passes.fuse_qdq`) counts at the op's
    bit-width (ceil(bits × numel / 8)) plus 4 bytes per scale and 1 per non-zero zero point; hyfx's scale /
    zero-point buffers are counted that way, not again; every other constant counts at its storage size.
    """
    hyfx_ops = torch.ops.hyfx
    per_channel = {qd.quantize_per_channel.default, hyfx_ops.uniform_fake_quant_per_channel.default}
    quantize_ops = {qd.quantize_per_tensor.default, hyfx_ops.uniform_fake_quant.default, *per_channel}  # same args
    total = 0.0
    quantized: set[str] = set()
    for node in qgm.graph.nodes:
        if node.op != "call_function" or node.target not in quantize_ops:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "get_attr"):
            continue  # an activation quantizer
        weight = _get(qgm, src.target)
        if node.target in per_channel:
            scale, zero_point = (_get(qgm, a.target) for a in node.args[1:3])
            qmin, qmax = node.args[4], node.args[5]
            n_scales, n_zp = scale.numel(), int((zero_point != 0).sum())
            quantized.update({src.target, node.args[1].target, node.args[2].target})
        else:
            qmin, qmax = node.args[3], node.args[4]
            n_scales, n_zp = 1, int(node.args[2] != 0)
            quantized.add(src.target)
        bits = math.ceil(math.log2(qmax - qmin + 1))
        total += math.ceil(bits * weight.numel() / 8) + 4 * n_scales + n_zp
    for target in {n.target for n in qgm.graph.nodes if n.op == "get_attr"} - quantized:
        value = _get(qgm, target)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total
