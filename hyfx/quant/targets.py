"""What each deployment target can run: the search space a backend-aware recipe may use, and a plan check.

TensorRT has no zero point: int8 only, symmetric weights (per tensor or per output channel) and symmetric
per-tensor activations. ONNX Runtime's int8 kernels (QLinearConv / QLinearMatMul) take per-tensor activations
(symmetric int8 or asymmetric uint8) and per-tensor or per-channel weights, but a per-channel weight must
have one zero point for all channels (QLinearConv rejects differing ones, onnxruntime#8890 and #28447), so
per-channel weights are symmetric; weights of fewer bits run in the same int8 type (the CPU lowering uses
7-bit weights on CPUs without VNNI, see `cpu_weight_bits`). "fake" is PyTorch fake quantization, which runs
anything a QuantSpec can say (2-8 bits, per-channel activations, log2, twin, log√2).
"""

from __future__ import annotations

from dataclasses import dataclass

from hyfx.cpu import cpu_info
from hyfx.errors import HyfxError
from hyfx.quant.spec import KINDS, QuantPlan, QuantSpec
from hyfx.registry import Registry

GRANULARITIES = ("tensor", "channel")
SCHEMES = ("symmetric", "asymmetric")


@dataclass(frozen=True)
class Target:
    """One deployment target: what its kernels run, in one place for the recipes' search, the plan check and the
    exporters. Register a new one with `register_target`; `lowering` names the function ("module:function") that
    `hyfx.export` calls for it, None where plans only run as PyTorch fake quantization."""

    name: str
    weight_schemes: tuple[str, ...] = SCHEMES
    weight_granularities: tuple[str, ...] = GRANULARITIES
    act_schemes: tuple[str, ...] = SCHEMES
    act_granularities: tuple[str, ...] = GRANULARITIES
    bits: int | None = None  # None: any of 2-8
    kinds: tuple[str, ...] = ("uniform", "log2", "twin")
    channel_weight_schemes: tuple[str, ...] = SCHEMES  # per-channel weights
    narrower_weights: bool = False  # weights of fewer than `bits` bits run in the same integer type
    cpu_weight_bits: bool = False  # the CPU's int8 GEMM limits weight bits (see `cpu_weight_bits`)
    direct_depthwise: bool = True  # with `cpu_weight_bits`: depthwise convs (and exact layers) keep 8 bits
    lowering: str | None = None
    description: str = ""
    # what its exported model may hold (QDQ export; `export_violation`, hyfx.backends.qdq_rules)
    title: str = ""  # the runtime's name in messages (default: `name`)
    float_kinds: tuple[str, ...] = ("log2",)  # lowered as float ops (or approximated), so exported anywhere
    export_bits: int | None = None  # the only bits its Q/DQ run; None: any (a narrower grid gets a Clip)
    zero_point_free: bool = False  # symmetric int8 only: every zero point 0
    shared_channel_zero_point: bool = False  # a per-channel weight takes one zero point for all channels
    per_channel_weights: bool = False  # weights quantized per output channel (axis 0) only
    symmetric_weights: bool = False  # weights' zero points must all be 0 (activations may keep theirs)
    # a MatMul of two activations runs int8 only when neither input has a zero point (else it runs, in float):
    # a search prefers symmetric inputs there, or asymmetric ones of a non-negative range (zero point 0)
    zero_point_free_matmul: bool = False
    layout_rewrite: bool = False  # rewrite Reshape/Transpose chains for ONNX Runtime's fast paths (onnx_layout)
    export_types: tuple[str, ...] = ("UINT8", "INT8", "FLOAT8E4M3FN")  # ONNX types of its Q/DQ zero points

    @property
    def display(self) -> str:
        return self.title or self.name

    def allows_weight(self, granularity: str, scheme: str) -> bool:
        return (granularity in self.weight_granularities and scheme in self.weight_schemes
                and (granularity != "channel" or scheme in self.channel_weight_schemes))

    def weight_bits(self, bits: int, exact: bool) -> int:
        """The weight bits a layer of `bits` runs at here; `exact`: a depthwise conv or a layer kept 8-bit."""
        return min(bits, cpu_weight_bits(exact and self.direct_depthwise)) if self.cpu_weight_bits else bits

    def violation(self, spec: QuantSpec, role: str) -> str | None:
        """Why `spec` (a weight, or an activation for any other role) cannot run on this target, or None."""
        weight = role == "weight"
        narrower = weight and self.narrower_weights and spec.bits <= (self.bits or 8)
        if self.bits is not None and spec.bits != self.bits and not narrower:
            return f"{spec.bits}-bit (runs int{self.bits} only)"
        if spec.kind not in self.kinds:
            return f"a {spec.kind} quantizer"
        schemes = self.weight_schemes if weight else self.act_schemes
        if spec.kind == "uniform" and spec.scheme not in schemes:
            return f"an {spec.scheme} {'weight' if weight else 'activation'} (zero point; allows {'/'.join(schemes)})"
        granularities = self.weight_granularities if weight else self.act_granularities
        if spec.granularity not in granularities:
            return f"a per-{spec.granularity} {'weight' if weight else 'activation'} quantizer"
        if weight and spec.kind == "uniform" and not self.allows_weight(spec.granularity, spec.scheme):
            return f"a per-{spec.granularity} {spec.scheme} weight (per-channel zero points must all be 0)"
        return None

    def export_violation(self, spec: QuantSpec, role: str) -> str | None:
        """Why a model exported for this target cannot hold `spec` (a weight, or an activation for any other role),
        or None. Laxer than `violation` where the lowering copes: float kinds, narrower grids."""
        if spec.kind in self.float_kinds:
            return None
        title = self.display
        if role != "weight" and spec.granularity not in self.act_granularities:
            return f"activations must be quantized per {'/'.join(self.act_granularities)} for {self.name}"
        if self.shared_channel_zero_point and role == "weight" and spec.granularity == "channel" and \
                spec.scheme != "symmetric" and (not spec.calibrated or len(set(spec.zero_point)) > 1):
            return (f"{title}'s int8 conv takes per-channel weights only with one zero point; "
                    f"quantize weights symmetrically (e.g. the recipe's --target {self.name})")
        if self.export_bits is not None and spec.bits != self.export_bits:
            return f"{title} runs int{self.export_bits} only, not {spec.bits}-bit; use --bits {self.export_bits}"
        if self.zero_point_free and (spec.scheme != "symmetric" or (spec.zero_point is not None and any(spec.zero_point))):
            return f"{title} needs symmetric int8 with zero point 0; use a symmetric plan or export with symmetric=True"
        if self.per_channel_weights and role == "weight" and (spec.granularity != "channel" or spec.axis != 0):
            return f"{title} weights must be quantized per output channel (axis 0)"
        if self.symmetric_weights and role == "weight" and (spec.scheme != "symmetric" or any(spec.zero_point or ())):
            return (f"{title}'s int8 kernels take symmetric weights (zero point 0); quantize weights symmetrically "
                    f"(e.g. the recipe's --target {self.name})")
        return None


TARGETS: Registry[Target] = Registry("target")


def register_target(target: Target) -> Target:
    """Make `target` selectable by name (`--target NAME`, `recipe(target=NAME)`, `hyfx.export(target=NAME)`)."""
    return TARGETS.add(target.name, target)


def get_target(name: str) -> Target:
    return TARGETS.get(name)


def available_targets() -> list[str]:
    return TARGETS.names()


register_target(Target("fake", kinds=KINDS, description="PyTorch fake quantization: anything a QuantSpec can say"))
register_target(Target("ort", act_granularities=("tensor",), bits=8, channel_weight_schemes=("symmetric",),
                       narrower_weights=True, cpu_weight_bits=True, lowering="hyfx.backends.onnx_qdq:export",
                       description="ONNX Runtime int8: per-tensor activations", title="ONNX Runtime",
                       shared_channel_zero_point=True, layout_rewrite=True))
register_target(Target("tensorrt", weight_schemes=("symmetric",), act_schemes=("symmetric",),
                       act_granularities=("tensor",), bits=8, kinds=("uniform",),
                       lowering="hyfx.backends.onnx_qdq:export", description="TensorRT: symmetric int8 only",
                       title="TensorRT", export_bits=8, zero_point_free=True, per_channel_weights=True,
                       export_types=("INT8", "FLOAT8E4M3FN")))
register_target(Target("openvino", weight_schemes=("symmetric",), act_granularities=("tensor",), bits=8,
                       narrower_weights=True, cpu_weight_bits=True, direct_depthwise=False,
                       lowering="hyfx.backends.openvino:export", title="OpenVINO",
                       description="OpenVINO CPU int8: symmetric weights, per-tensor activations",
                       symmetric_weights=True, zero_point_free_matmul=True))


def check_bits_for_target(target: str, w_bits: int, a_bits: int) -> None:
    rules = get_target(target)
    if rules.bits is not None and (w_bits != rules.bits or a_bits != rules.bits):
        raise HyfxError(f"target {target} runs int{rules.bits} only, not W{w_bits}A{a_bits}: "
                        f"use --bits {rules.bits} or --target fake")


def check_plan_target(plan: QuantPlan, target: str) -> QuantPlan:
    """Raise a one-line HyfxError at the first spec `target` cannot run; else record the target in the plan."""
    rules = get_target(target)
    for layer, role, spec in plan.specs():
        why = rules.violation(spec, role)
        if why is not None:
            raise HyfxError(f"{plan.recipe} plan quantizes {layer} {role} with {why}, which {target} cannot run: "
                            f"use a recipe that takes the target (e.g. --recipe qhyvit --target {target})")
    plan.target = target
    return plan


def cpu_weight_bits(depthwise: bool = False) -> int:
    """Weight bits ONNX Runtime's u8s8 CPU kernels run exactly here: 8 with VNNI or for a depthwise conv, else 7.

    Without VNNI, MLAS's GEMM multiplies with VPMADDUBSW, whose 16-bit pair sums saturate for 8-bit weights;
    |w| ≤ 63 cannot (255·63·2 < 2^15). Depthwise convolutions run a direct kernel that accumulates in 32 bits
    (measured here: all-127 weights on uint8 inputs ≥ 200 are exact there, a 1x1 conv is off by 18 codes).
    """
    return 8 if depthwise or cpu_info().vnni else 7
