"""What each deployment target can run: the search space a backend-aware recipe may use, and a plan check.

TensorRT has no zero point: int8 only, symmetric weights (per tensor or per output channel) and symmetric
per-tensor activations. ONNX Runtime's int8 kernels (QLinearConv / QLinearMatMul) take per-tensor activations
(symmetric int8 or asymmetric uint8) and per-tensor or per-channel weights. "fake" is PyTorch fake
quantization, which runs anything a QuantSpec can say (2-8 bits, per-channel activations, log2, twin).
"""

from __future__ import annotations

from dataclasses import dataclass

from hyfx.errors import HyfxError
from hyfx.quant.spec import QuantPlan, QuantSpec

TARGETS = ("fake", "ort", "tensorrt")
GRANULARITIES = ("tensor", "channel")
SCHEMES = ("symmetric", "asymmetric")


@dataclass(frozen=True)
class TargetRules:
    name: str
    weight_schemes: tuple[str, ...] = SCHEMES
    weight_granularities: tuple[str, ...] = GRANULARITIES
    act_schemes: tuple[str, ...] = SCHEMES
    act_granularities: tuple[str, ...] = GRANULARITIES
    bits: int | None = None  # None: any of 2-8
    kinds: tuple[str, ...] = ("uniform", "log2", "twin")

    def violation(self, spec: QuantSpec, role: str) -> str | None:
        """Why `spec` (a weight, or an activation for any other role) cannot run on this target, or None."""
        weight = role == "weight"
        if self.bits is not None and spec.bits != self.bits:
            return f"{spec.bits}-bit (runs int{self.bits} only)"
        if spec.kind not in self.kinds:
            return f"a {spec.kind} quantizer"
        schemes = self.weight_schemes if weight else self.act_schemes
        if spec.kind == "uniform" and spec.scheme not in schemes:
            return f"an {spec.scheme} {'weight' if weight else 'activation'} (zero point; allows {'/'.join(schemes)})"
        granularities = self.weight_granularities if weight else self.act_granularities
        if spec.granularity not in granularities:
            return f"a per-{spec.granularity} {'weight' if weight else 'activation'} quantizer"
        return None


RULES: dict[str, TargetRules] = {
    "fake": TargetRules("fake"),
    "ort": TargetRules("ort", act_granularities=("tensor",), bits=8),
    "tensorrt": TargetRules("tensorrt", weight_schemes=("symmetric",), act_schemes=("symmetric",),
                            act_granularities=("tensor",), bits=8, kinds=("uniform",)),
}


def target_rules(target: str) -> TargetRules:
    if target not in RULES:
        raise HyfxError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    return RULES[target]


def check_bits_for_target(target: str, w_bits: int, a_bits: int) -> None:
    rules = target_rules(target)
    if rules.bits is not None and (w_bits != rules.bits or a_bits != rules.bits):
        raise HyfxError(f"target {target} runs int{rules.bits} only, not W{w_bits}A{a_bits}: "
                        f"use --bits {rules.bits} or --target fake")


def check_plan_target(plan: QuantPlan, target: str) -> QuantPlan:
    """Raise a one-line HyfxError at the first spec `target` cannot run; else record the target in the plan."""
    rules = target_rules(target)
    for layer, role, spec in plan.specs():
        why = rules.violation(spec, role)
        if why is not None:
            raise HyfxError(f"{plan.recipe} plan quantizes {layer} {role} with {why}, which {target} cannot run: "
                            f"use a recipe that takes the target (e.g. --recipe qhyvit --target {target})")
    plan.target = target
    return plan
