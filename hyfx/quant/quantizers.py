"""Uniform and log2 quantize / dequantize math as pure tensor functions, and the graph ops that use it.

The graph ops are what the rewrite pass inserts: torch's `quantized_decomposed` quantize/dequantize
pairs for uniform QDQ (the form PT2E uses and ONNX exporters lower to QuantizeLinear/DequantizeLinear),
and `hyfx::log2_fake_quant` for EfficientQuant's post-softmax quantizer.
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


def quantize_uniform(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    scale, zero_point = _broadcast(scale, x, axis), _broadcast(zero_point, x, axis)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize_uniform(q, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    scale, zero_point = _broadcast(scale, q, axis), _broadcast(zero_point, q, axis)
    return (q - zero_point) * scale


def fake_quant_uniform(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None,
                       ste: bool = False) -> torch.Tensor:
    """Quantize then dequantize; with `ste`, gradients pass straight through rounding (reconstruction)."""
    scale_b, zp_b = _broadcast(scale, x, axis), _broadcast(zero_point, x, axis)
    scaled = x / scale_b
    rounded = torch.round(scaled)
    if ste:
        rounded = scaled + (rounded - scaled).detach()
    return (torch.clamp(rounded + zp_b, qmin, qmax) - zp_b) * scale_b


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


def fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Apply a calibrated spec to a tensor eagerly (used by observers, searches and tests)."""
    if spec.kind == "log2":
        return log2_fake_quant(x, spec.scale[0], spec.zero_point[0], spec.bits, spec.eps)
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
