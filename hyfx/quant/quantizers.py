"""Uniform and log2 quantize / dequantize math as pure tensor functions, and the graph ops that use it.

The graph ops are what the rewrite pass inserts: torch's `quantized_decomposed` quantize/dequantize
pairs for uniform QDQ (the form PT2E uses and ONNX exporters lower to QuantizeLinear/DequantizeLinear),
`hyfx::log2_fake_quant` for EfficientQuant's post-softmax quantizer, `hyfx::twin_fake_quant` for
PTQ4ViT's twin uniform quantizer and `hyfx::log_sqrt2_fake_quant` for RepQ-ViT's log√2 one.
`hyfx::uniform_fake_quant` / `hyfx::uniform_fake_quant_per_channel` are a quantize → dequantize pair as one op
(`hyfx.passes.fuse_qdq`, for running a quantized graph in PyTorch): the same float operations in the same order,
done in place on one buffer, without the uint8 round trip.
"""

from __future__ import annotations

import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

from hyfx.quant.spec import QuantSpec

MIN_SCALE = 1e-8
qd = torch.ops.quantized_decomposed


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [lo, hi] (scalars or per-channel vectors) on the spec's integer grid."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    if spec.scheme == "symmetric":
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / spec.qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int64)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # zero must be representable exactly (padding, ReLU)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(MIN_SCALE)
    zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int64)
    return scale, zero_point


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def fake_quant_uniform(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None,
                       ste: bool = False) -> torch.Tensor:
    """Quantize then dequantize; with `ste`, gradients pass straight through rounding (reconstruction)."""
    scale_b, zp_b = _broadcast(scale, x, axis), _broadcast(zero_point, x, axis)
    scaled = x / scale_b
    rounded = torch.round(scaled)
    if ste:
        rounded = scaled + (rounded - scaled).detach()
    return (torch.clamp(rounded + zp_b, qmin, qmax) - zp_b) * scale_b


@torch.library.custom_op("hyfx::uniform_fake_quant", mutates_args=())
def uniform_fake_quant(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """`dequantize_per_tensor(quantize_per_tensor(x))` bit for bit: the integer codes are exact in float32, so
    skipping their uint8 / int8 copy changes no value, and in-place steps spare three of the pair's eight passes."""
    out = x.float() * (1.0 / scale)  # a new tensor: the steps below may work in place
    return out.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


@uniform_fake_quant.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("hyfx::uniform_fake_quant_per_channel", mutates_args=())
def uniform_fake_quant_per_channel(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int,
                                   qmax: int) -> torch.Tensor:
    """`dequantize_per_channel(quantize_per_channel(x))` bit for bit (see uniform_fake_quant)."""
    scale_b, zp_b = _broadcast(scale, x, axis), _broadcast(zero_point, x, axis)
    out = x.float() * (1.0 / scale_b)
    return out.round_().add_(zp_b).clamp_(qmin, qmax).sub_(zp_b).mul_(scale_b)


@uniform_fake_quant_per_channel.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):
    return torch.empty_like(x, dtype=torch.float32)


def log2_params(lo: float, hi: float, bits: int, eps: float) -> tuple[float, int]:
    """EfficientQuant: on A = log2(x + eps), Δ_log = (A_max − A_min)/(2^b − 1) and Z_a = round(−A_min/Δ_log)."""
    a_min = torch.log2(torch.tensor(float(lo) + eps)).item()
    a_max = torch.log2(torch.tensor(float(hi) + eps)).item()
    delta = max((a_max - a_min) / (2**bits - 1), MIN_SCALE)
    return delta, int(round(-a_min / delta))


def quantize_log2(x: torch.Tensor, delta: float, zero_point: int, bits: int, eps: float) -> torch.Tensor:
    """Codes in [0, 2^b − 1]: clamp(round(log2(x + eps)/Δ_log) + Z_a)."""
    return torch.clamp(torch.round(torch.log2(x + eps) / delta) + zero_point, 0, 2**bits - 1)


def dequantize_log2(q: torch.Tensor, delta: float, zero_point: int, eps: float) -> torch.Tensor:
    """Inverse of quantize_log2: 2^((q − Z_a)·Δ_log) − eps, so the lowest code returns (about) zero."""
    return (torch.exp2((q - zero_point) * delta) - eps).clamp_min(0.0)


@torch.library.custom_op("hyfx::log2_fake_quant", mutates_args=())
def log2_fake_quant(x: torch.Tensor, delta: float, zero_point: int, bits: int, eps: float) -> torch.Tensor:
    """log2 quantize + dequantize of a non-negative tensor (post-softmax), as one graph op."""
    return dequantize_log2(quantize_log2(x, delta, zero_point, bits, eps), delta, zero_point, eps)


@log2_fake_quant.register_fake
def _(x, delta, zero_point, bits, eps):
    return torch.empty_like(x)


def log_sqrt2_codes(x: torch.Tensor, delta: float, bits: int) -> torch.Tensor:
    """RepQ-ViT's log√2 codes of a non-negative tensor: round(−log_√2(x/Δ)) = round(−2·log2(x/Δ)), clamped to
    [0, 2^b − 1]; codes past the range (values below Δ·2^(−(2^b − 1)/2), zero included) are returned as 2^b."""
    top = 2**bits
    codes = torch.round(-2.0 * torch.log2(x.clamp_min(0.0) / delta))
    return torch.where(codes >= top, torch.full_like(codes, float(top)), codes.clamp_min(0.0))


def dequantize_log_sqrt2(codes: torch.Tensor, delta: float, bits: int) -> torch.Tensor:
    """Δ·2^(−q/2) in its deployable form: a shift by ceil(q/2) and, for odd q, one multiply by √2; code 2^b is 0."""
    odd = torch.remainder(codes, 2.0)
    value = delta * torch.exp2(-torch.ceil(codes / 2.0)) * (1.0 + odd * (2.0**0.5 - 1.0))
    return torch.where(codes >= 2**bits, torch.zeros_like(value), value)


@torch.library.custom_op("hyfx::log_sqrt2_fake_quant", mutates_args=())
def log_sqrt2_fake_quant(x: torch.Tensor, delta: float, bits: int) -> torch.Tensor:
    """log√2 quantize + dequantize of a non-negative tensor (post-softmax, RepQ-ViT), as one graph op."""
    return dequantize_log_sqrt2(log_sqrt2_codes(x, delta, bits), delta, bits)


@log_sqrt2_fake_quant.register_fake
def _(x, delta, bits):
    return torch.empty_like(x)


def twin_uniform(x: torch.Tensor, delta1, delta2, bits: int, signed: bool) -> torch.Tensor:
    """PTQ4ViT's twin uniform quantize + dequantize; `delta1`/`delta2` may be tensors broadcasting against x.

    Each range spends b-1 bits on magnitude (the last bit says which range a value is in). Unsigned (post-softmax):
    values below the top of R1 = [0, m·Δ1] use the fine step Δ1, the rest the coarse Δ2 (m = 2^(b-1)-1).
    Signed (post-GELU): negative values use Δ1 on [-2^(b-1)·Δ1, 0], the others Δ2 on [0, m·Δ2].
    """
    m = 2 ** (bits - 1) - 1
    high = torch.clamp(torch.round(x / delta2), 0, m) * delta2
    if signed:
        low = torch.clamp(torch.round(x / delta1), -(m + 1), 0) * delta1
        return torch.where(x < 0, low, high)
    low = torch.clamp(torch.round(x / delta1), 0, m) * delta1
    # past (m + 1/2)·Δ1 the coarse range rounds closer than R1's clamp
    return torch.where(x < (m + 0.5) * delta1, low, high)


def twin_params(lo: float, hi: float, bits: int, signed: bool) -> tuple[float, float]:
    """Default (Δ1, Δ2) covering [lo, hi]: signed, R1 spans the negative tail; unsigned, R1 = R2 / 2^(b-1)."""
    m = 2 ** (bits - 1) - 1
    delta2 = max(float(hi), 0.0) / m
    delta1 = -min(float(lo), 0.0) / (m + 1) if signed else delta2 / 2 ** (bits - 1)
    return max(delta1, MIN_SCALE), max(delta2, MIN_SCALE)


@torch.library.custom_op("hyfx::twin_fake_quant", mutates_args=())
def twin_fake_quant(x: torch.Tensor, delta1: float, delta2: float, bits: int, signed: bool) -> torch.Tensor:
    """Twin uniform quantize + dequantize (post-softmax unsigned, post-GELU signed), as one graph op."""
    return twin_uniform(x, delta1, delta2, bits, signed)


@twin_fake_quant.register_fake
def _(x, delta1, delta2, bits, signed):
    return torch.empty_like(x)


def fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Apply a calibrated spec to a tensor eagerly (used by observers, searches and tests)."""
    if spec.kind == "log2":
        return log2_fake_quant(x, spec.scale[0], spec.zero_point[0], spec.bits, spec.eps)
    if spec.kind == "twin":
        return twin_fake_quant(x, spec.scale[0], spec.scale[1], spec.bits, spec.signed)
    if spec.kind == "log_sqrt2":
        return log_sqrt2_fake_quant(x, spec.scale[0], spec.bits)
    scale = torch.tensor(spec.scale, dtype=torch.float32)
    zero_point = torch.tensor(spec.zero_point, dtype=torch.float32)
    axis = spec.axis if spec.granularity == "channel" else None
    return fake_quant_uniform(x, scale, zero_point, spec.qmin, spec.qmax, axis)


def weight_range(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max range of a weight, per output channel (axis 0) or per tensor."""
    if spec.granularity == "channel":
        flat = weight.detach().transpose(0, spec.axis).reshape(weight.shape[spec.axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values
    return weight.detach().min(), weight.detach().max()


def calibrate_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantSpec:
    """Min-max parameters for a weight spec that has none."""
    if spec.calibrated:
        return spec
    lo, hi = weight_range(weight, spec)
    scale, zero_point = uniform_params(lo, hi, spec)
    return spec.with_params(scale.reshape(-1).tolist(), zero_point.reshape(-1).tolist())
