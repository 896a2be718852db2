"""QuantSpec, LayerPolicy and QuantPlan: the contract between recipes (decide) and passes (rewrite).

A plan is data: JSON with sorted keys, one layer per entry, so two plans diff line by line and a
saved plan reloads to the same quantized model without the calibration images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from hyfx.errors import HyfxError
from hyfx.files import write_text

MIN_BITS, MAX_BITS = 2, 8
PLAN_FORMAT = 1

Granularity = Literal["tensor", "channel"]
Scheme = Literal["symmetric", "asymmetric"]
Kind = Literal["uniform", "log2", "twin", "log_sqrt2"]
KINDS = ("uniform", "log2", "twin", "log_sqrt2")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise HyfxError(f"{where} {what}")


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise HyfxError(f"unsupported bit-width {bits!r}: hyfx quantizes with {MIN_BITS} to {MAX_BITS} bits")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized, and (once calibrated) with which parameters.

    uniform symmetric: signed narrow range [-(2^(b-1)-1), 2^(b-1)-1], zero point 0 (TensorRT's int8 rule).
    uniform asymmetric: unsigned [0, 2^b-1] with a zero point.
    log2 (post-softmax, EfficientQuant): codes of log2(x+eps) on a uniform grid; scale is Δ_log and
    zero_point is Z_a of the paper.
    twin (PTQ4ViT's twin uniform, post-softmax / post-GELU): two uniform ranges of b-1 bits each; scale is
    (Δ_R1, Δ_R2) and zero_point (0, 0). asymmetric = unsigned (post-softmax: R1 = [0, m·Δ_R1] for the small
    values, R2 = [0, m·Δ_R2], m = 2^(b-1)-1); symmetric = signed (post-GELU: R1 = [-2^(b-1)·Δ_R1, 0] for the
    negative tail, R2 = [0, m·Δ_R2]).
    log_sqrt2 (post-softmax, RepQ-ViT): codes round(−log_√2(x/Δ)) in [0, 2^b − 1], dequantized as Δ·2^(−q/2);
    scale is Δ, zero_point 0.
    """

    bits: int = 8
    granularity: Granularity = "tensor"
    scheme: Scheme = "symmetric"
    kind: Kind = "uniform"
    axis: int = 0
    eps: float = 1e-5
    scale: tuple[float, ...] | None = None
    zero_point: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.granularity not in ("tensor", "channel"):
            raise HyfxError(f"unknown granularity {self.granularity!r}: use 'tensor' or 'channel'")
        if self.scheme not in ("symmetric", "asymmetric"):
            raise HyfxError(f"unknown scheme {self.scheme!r}: use 'symmetric' or 'asymmetric'")
        if self.kind not in KINDS:
            raise HyfxError(f"unknown quantizer kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.kind != "uniform" and self.granularity != "tensor":
            raise HyfxError(f"{self.kind} quantization is per-tensor: set granularity='tensor'")

    @property
    def qmin(self) -> int:
        if self.kind == "twin":  # per range: b-1 bits of magnitude
            return 0 if self.scheme == "asymmetric" else -(2 ** (self.bits - 1))
        if self.kind in ("log2", "log_sqrt2") or self.scheme == "asymmetric":
            return 0
        return -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        if self.kind == "twin":
            return 2 ** (self.bits - 1) - 1
        if self.kind in ("log2", "log_sqrt2") or self.scheme == "asymmetric":
            return 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def calibrated(self) -> bool:
        return self.scale is not None and self.zero_point is not None

    def with_params(self, scale, zero_point) -> QuantSpec:
        return replace(self, scale=tuple(float(s) for s in scale), zero_point=tuple(int(z) for z in zero_point))

    def uncalibrated(self) -> QuantSpec:
        return replace(self, scale=None, zero_point=None)

    def short(self) -> str:
        if self.kind != "uniform":
            return f"{self.kind}{self.bits}"
        return f"{'s' if self.scheme == 'symmetric' else 'a'}{self.bits}/{self.granularity[:2]}"

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("scale", "zero_point"):
            data[key] = list(data[key]) if data[key] is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "spec") -> QuantSpec:
        """The spec a plan file holds, every field present and of its type (HyfxError naming `where` if not)."""
        _require(isinstance(data, dict), where, f"is a {type(data).__name__}, not an object")
        names = {f.name for f in fields(cls)}
        _require(names <= set(data), where, f"lacks {', '.join(sorted(names - set(data)))}")
        _require(set(data) <= names, where, f"has unknown fields {', '.join(sorted(set(data) - names))}")
        for key in ("bits", "axis"):
            _require(_is_int(data[key]), f"{where}.{key}", f"{data[key]!r} is not an integer")
        for key in ("granularity", "scheme", "kind"):
            _require(isinstance(data[key], str), f"{where}.{key}", f"{data[key]!r} is not a string")
        _require(_is_number(data["eps"]), f"{where}.eps", f"{data['eps']!r} is not a number")
        data = dict(data)
        for key, check in (("scale", _is_number), ("zero_point", _is_int)):
            if data[key] is not None:
                _require(isinstance(data[key], list) and data[key] and all(check(v) for v in data[key]),
                         f"{where}.{key}", f"{data[key]!r} is not a list of {'numbers' if key == 'scale' else 'integers'}")
                data[key] = tuple(data[key])
        _require((data["scale"] is None) == (data["zero_point"] is None) and
                 (data["scale"] is None or len(data["scale"]) == len(data["zero_point"])),
                 where, "scale and zero_point must both be given, with one value each per channel")
        return cls(**data)


@dataclass
class LayerPolicy:
    """Quantization of one layer: its weight, its activation inputs (by argument index), its output.

    `bias_correction` (per output channel, added to the layer's bias) undoes the mean output shift that
    rounding the weight causes (hyfx.refine.bias_correction); `weight_rounding` (hyfx.quant.rounding) is a
    learned rounding of the weight (hyfx.refine.adaround). Both belong to the weight spec they were made with.
    """

    weight: QuantSpec | None = None
    inputs: dict[int, QuantSpec] = field(default_factory=dict)
    output: QuantSpec | None = None
    bias_correction: tuple[float, ...] | None = None
    weight_rounding: str | None = None

    def is_empty(self) -> bool:
        return (self.weight is None and not self.inputs and self.output is None and self.bias_correction is None
                and self.weight_rounding is None)

    def set_weight(self, spec: QuantSpec | None) -> None:
        """Replace the weight spec; the bias correction and rounding made for the old one go unless it is equal."""
        if spec != self.weight:
            self.bias_correction = self.weight_rounding = None
        self.weight = spec

    def to_dict(self) -> dict:
        data = {
            "weight": self.weight.to_dict() if self.weight else None,
            "inputs": {str(k): v.to_dict() for k, v in sorted(self.inputs.items())},
            "output": self.output.to_dict() if self.output else None,
        }
        if self.bias_correction is not None:
            data["bias_correction"] = list(self.bias_correction)
        if self.weight_rounding is not None:
            data["weight_rounding"] = self.weight_rounding
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "layer") -> LayerPolicy:
        _require(isinstance(data, dict), where, f"is a {type(data).__name__}, not an object")
        known = {"weight", "inputs", "output", "bias_correction", "weight_rounding"}
        _require({"weight", "inputs", "output"} <= set(data), where, "needs weight, inputs and output (null if unused)")
        _require(set(data) <= known, where, f"has unknown fields {', '.join(sorted(set(data) - known))}")
        inputs = data["inputs"]
        _require(isinstance(inputs, dict) and all(str(k).isdigit() for k in inputs), f"{where}.inputs",
                 "must map argument indices to specs")
        correction = data.get("bias_correction")
        _require(correction is None or (isinstance(correction, list) and all(_is_number(v) for v in correction)),
                 f"{where}.bias_correction", "must be a list of numbers")
        _require(isinstance(data.get("weight_rounding"), (str, type(None))), f"{where}.weight_rounding",
                 "must be a string")
        return cls(
            weight=QuantSpec.from_dict(data["weight"], f"{where}.weight") if data["weight"] is not None else None,
            inputs={int(k): QuantSpec.from_dict(v, f"{where}.inputs.{k}") for k, v in inputs.items()},
            output=QuantSpec.from_dict(data["output"], f"{where}.output") if data["output"] is not None else None,
            bias_correction=tuple(float(v) for v in correction) if correction is not None else None,
            weight_rounding=data.get("weight_rounding"),
        )


@dataclass
class QuantPlan:
    """Per-layer policies keyed by hyfx layer names (the user's module paths), plus provenance."""

    recipe: str
    layers: dict[str, LayerPolicy] = field(default_factory=dict)
    model: str = ""
    target: str = "fake"  # "fake" (PyTorch), "ort", "tensorrt"
    meta: dict = field(default_factory=dict)

    def set(self, layer: str, policy: LayerPolicy) -> None:
        if not policy.is_empty():
            self.layers[layer] = policy

    def specs(self):
        """Yield (layer, role, spec) for every spec in the plan; role is 'weight', 'input{i}' or 'output'."""
        for name, policy in sorted(self.layers.items()):
            if policy.weight:
                yield name, "weight", policy.weight
            for idx, spec in sorted(policy.inputs.items()):
                yield name, f"input{idx}", spec
            if policy.output:
                yield name, "output", policy.output

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for _, role, spec in self.specs():
            key = f"{role.rstrip('0123456789')}:{spec.short()}"
            counts[key] = counts.get(key, 0) + 1
        corrected = sum(p.bias_correction is not None for p in self.layers.values())
        if corrected:
            counts["bias_correction"] = corrected
        rounded = sum(p.weight_rounding is not None for p in self.layers.values())
        if rounded:
            counts["weight_rounding"] = rounded
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "recipe": self.recipe,
            "model": self.model,
            "target": self.target,
            "meta": self.meta,
            "layers": {k: v.to_dict() for k, v in sorted(self.layers.items())},
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantPlan:
        if data.get("format") != PLAN_FORMAT:
            raise HyfxError(f"plan format {data.get('format')!r} is not {PLAN_FORMAT}: re-run `hyfx quantize` to remake it")
        for key, kind in (("recipe", str), ("model", str), ("target", str), ("meta", dict), ("layers", dict)):
            _require(key in data or key in ("model", "target", "meta"), "plan", f"lacks its {key!r} field")
            _require(key not in data or isinstance(data[key], kind), f"plan {key!r}",
                     f"{data.get(key)!r} is not a{'n object' if kind is dict else ' string'}")
        return cls(
            recipe=data["recipe"],
            layers={k: LayerPolicy.from_dict(v, f"layer {k}") for k, v in data["layers"].items()},
            model=data.get("model", ""),
            target=data.get("target", "fake"),
            meta=data.get("meta", {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"


def save_plan(plan: QuantPlan, path: str | Path) -> Path:
    """Write the plan as JSON, atomically (an interrupted save leaves the previous file as it was)."""
    return write_text(path, plan.to_json())


def load_plan(path: str | Path) -> QuantPlan:
    path = Path(path)
    if not path.is_file():
        raise HyfxError(f"plan file {path} does not exist: make one with `hyfx quantize ... --out {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HyfxError(f"plan file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return QuantPlan.from_dict(data)
    except HyfxError as exc:
        raise HyfxError(f"plan file {path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # fields removed or retyped by hand
        what = f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise HyfxError(f"plan file {path} is malformed ({what}): remake it with `hyfx quantize`") from None
