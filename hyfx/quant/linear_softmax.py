"""HyQ's hardware-friendly softmax: integer-only, with exp approximated by one linear function.

With S the logits' uint8 scale, x = round(logit / S) − row max (≤ 0) is split as x = q·x0 + r with
x0 = floor(−ln 2 / S) (−ln 2 in integer units), q = floor(x / x0) ≥ 0 and r in (x0, 0], so
exp(x·S) = 2^(−q) · exp(r·S). On [−ln 2, 0], exp(r·S) ≈ a·(r·S + b/a) (a = 0.0894760, b = 0.1212147: the least-squares
line, scaled by 1/8), so in integers exp ∝ (r + floor((b/a)/S)) · 2^(30−q): no multiplier wider than a shift, where
I-BERT's second-order polynomial needs two (HyQ's point: 1.8-2.1× fewer FPGA LUTs). x is clamped at 30·x0
first, so the shift stays within 30 bits. The output is HyQ's log-int form: k = round(log2(Σ/e)) on `bits` bits,
p̂ = 2^(−k), and 0 where k ≥ 2^bits; attn · v then needs shifts only.
"""

from __future__ import annotations

import math

import torch

LINE_A, LINE_B = 0.08947606, 0.12121466
MAX_SHIFT = 30


def linear_exp_int(x: torch.Tensor, scale: float, dim: int = -1) -> torch.Tensor:
    """Integer exp of logits `x` (float), up to one factor per row: the numerators of the integer softmax."""
    xi = torch.round(x.double() / scale)
    xi = xi - xi.amax(dim, keepdim=True)
    x0 = math.floor(-math.log(2.0) / scale)
    if x0 >= 0:  # a scale above ln 2: the range reduction has no integer step; one step then
        x0 = -1
    xi = torch.maximum(xi, torch.full_like(xi, MAX_SHIFT * x0))
    q = torch.floor(xi / x0)
    r = xi - q * x0
    z = r + math.floor(LINE_B / LINE_A / scale)
    return torch.clamp(torch.floor(z * torch.exp2(MAX_SHIFT - q)), min=0.0)


def log_int_softmax(x: torch.Tensor, scale: float, bits: int = 4, dim: int = -1) -> torch.Tensor:
    """HyQ's integer softmax of logits `x`: 2^(−k) with k = round(log2(Σe / e)) in [0, 2^bits − 1], else 0."""
    e = linear_exp_int(x, scale, dim)
    ratio = torch.round(e.sum(dim, keepdim=True) / e.clamp_min(1.0))
    ratio = torch.where(e > 0, ratio, torch.full_like(ratio, float("inf")))
    k = torch.floor(torch.log2(ratio.clamp_min(1.0)))
    k = k + ((ratio - torch.exp2(k)) >= torch.exp2(k - 1)).double()  # round log2 to nearest
    top = 2**bits
    p = torch.where(k >= top, torch.zeros_like(k), torch.exp2(-k.clamp(0, top - 1)))
    return p.to(x.dtype)


@torch.library.custom_op("hyfx::linear_softmax", mutates_args=())
def linear_softmax(x: torch.Tensor, dim: int, scale: float, bits: int) -> torch.Tensor:
    """`log_int_softmax` as one graph op, in place of a softmax (hyfx.passes.approximate_softmax)."""
    return log_int_softmax(x, scale, bits, dim)


@linear_softmax.register_fake
def _(x, dim, scale, bits):
    return torch.empty_like(x)
