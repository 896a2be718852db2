"""Learned weight rounding as plan data: per-weight integer offsets from round-to-nearest.

A rounding search (hyfx.refine.adaround) decides, per weight, to round up or down instead of to nearest. The
plan stores the decision as offsets d ∈ {-1, 0, 1} from round(w / s), int8, zlib-compressed and base64-encoded
(most offsets are 0), so a plan stays one JSON file that reloads without the calibration images. An offset
belongs to the weight spec it was learned with, like a bias correction: a pass that changes the spec drops it.
Offsets from nearest rather than from floor survive a sign flip of the weight (a negative BatchNorm factor
folded into the conv): round(-x) = -round(x), so the offset just changes sign.
"""

from __future__ import annotations

import base64
import zlib

import torch

from hyfx.errors import HyfxError
from hyfx.quant.quantizers import _broadcast
from hyfx.quant.spec import QuantSpec


def encode_offsets(offsets: torch.Tensor) -> str:
    data = offsets.detach().to(torch.int8).contiguous().reshape(-1).numpy().tobytes()
    return base64.b64encode(zlib.compress(data, 9)).decode("ascii")


def _decode(text: str, layer: str) -> torch.Tensor:
    try:
        data = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, zlib.error) as exc:
        raise HyfxError(f"plan's weight rounding of {layer} is corrupt ({exc}): re-run `hyfx quantize`") from None
    return torch.frombuffer(bytearray(data), dtype=torch.int8)


def decode_offsets(text: str, shape: torch.Size | tuple[int, ...], layer: str = "") -> torch.Tensor:
    offsets = _decode(text, layer)
    numel = int(torch.Size(shape).numel())
    if offsets.numel() != numel:
        raise HyfxError(f"plan's weight rounding of {layer} has {offsets.numel()} weights, the layer {numel}: "
                        "the plan was made for another model")
    return offsets.reshape(shape)


def weight_grid(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's scale and zero point, shaped to broadcast against `weight`."""
    if spec.kind != "uniform" or not spec.calibrated:
        raise HyfxError(f"weight rounding needs a calibrated uniform weight spec, not {spec.short()}")
    axis = spec.axis if spec.granularity == "channel" else None
    scale = _broadcast(torch.tensor(spec.scale, dtype=weight.dtype), weight, axis)
    zero_point = _broadcast(torch.tensor(spec.zero_point, dtype=weight.dtype), weight, axis)
    return scale, zero_point


def rounded_weight(weight: torch.Tensor, spec: QuantSpec, offsets: torch.Tensor) -> torch.Tensor:
    """The weight on the spec's grid with the given rounding: quantizing it with `spec` again is exact."""
    scale, zero_point = weight_grid(weight, spec)
    codes = torch.clamp(torch.round(weight / scale) + offsets.to(weight.dtype) + zero_point, spec.qmin, spec.qmax)
    return (codes - zero_point) * scale


def offsets_from_codes(weight: torch.Tensor, spec: QuantSpec, codes: torch.Tensor) -> torch.Tensor:
    """Offsets from round-to-nearest of integer codes chosen for `weight` (codes without the zero point)."""
    scale, _ = weight_grid(weight, spec)
    return (codes - torch.round(weight / scale)).clamp(-1, 1).to(torch.int8)


def flip_offsets(text: str, factor: torch.Tensor | None, layer: str = "") -> str:
    """The offsets for the weight scaled by `factor` per output channel (axis 0): negated where it is negative,
    zero where it is zero (a zeroed channel must stay zero); no factor (no fold): the offsets as they are."""
    if factor is None:
        return text
    offsets = _decode(text, layer)
    if offsets.numel() % factor.numel():
        raise HyfxError(f"plan's weight rounding of {layer} does not match its {factor.numel()} output channels: "
                        "the plan was made for another model")
    sign = torch.sign(factor).to(torch.int8).reshape(-1, 1)
    return encode_offsets(offsets.reshape(factor.numel(), -1) * sign)
