"""Plan → plan for a target without zero points (TensorRT): asymmetric uniform specs made symmetric int8."""

from __future__ import annotations

import copy

from hyfx.quant.spec import QuantPlan, QuantSpec


def symmetric_plan(plan: QuantPlan) -> QuantPlan:
    """The plan with asymmetric uniform specs made symmetric int8 over the same calibrated range (TensorRT).

    An asymmetric activation covering [lo, hi] becomes symmetric with scale max(|lo|, |hi|)/127; weights are
    re-derived per output channel from the weights themselves. log2 specs are kept.
    """
    plan = copy.deepcopy(plan)
    for policy in plan.layers.values():
        if policy.weight is not None and policy.weight.kind == "uniform":
            policy.set_weight(QuantSpec(bits=8, granularity="channel", scheme="symmetric", axis=0))
        for idx, spec in list(policy.inputs.items()):
            policy.inputs[idx] = _symmetric_activation(spec)
        if policy.output is not None:
            policy.output = _symmetric_activation(policy.output)
    plan.target = "tensorrt"
    return plan


def _symmetric_activation(spec: QuantSpec) -> QuantSpec:
    if spec.kind != "uniform" or (spec.scheme == "symmetric" and spec.bits == 8):
        return spec
    new = QuantSpec(bits=8, granularity="tensor", scheme="symmetric")
    if not spec.calibrated:
        return new
    lo = (spec.qmin - spec.zero_point[0]) * spec.scale[0]
    hi = (spec.qmax - spec.zero_point[0]) * spec.scale[0]
    return new.with_params([max(abs(lo), abs(hi), 1e-8) / new.qmax], [0])
