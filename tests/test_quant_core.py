"""Quantizer math, spec validation and plan serialisation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hyfx.errors import HyfxError
from hyfx.quant.quantizers import (
    calibrate_weight,
    dequantize_log2,
    fake_quant,
    log2_fake_quant,
    log2_params,
    quantize_log2,
    uniform_params,
)
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec, load_plan, save_plan


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_uniform_round_trip_error_is_at_most_half_a_step_inside_range(bits, scheme):
    torch.manual_seed(bits)
    x = torch.randn(4096) * 3 + (1.0 if scheme == "asymmetric" else 0.0)
    spec = QuantSpec(bits=bits, scheme=scheme)
    scale, zp = uniform_params(x.min(), x.max(), spec)
    spec = spec.with_params([scale], [zp])
    err = (fake_quant(x, spec) - x).abs()
    assert float(err.max()) <= float(scale) / 2 + 1e-6
    assert len(torch.unique(fake_quant(x, spec))) <= 2**bits


def test_symmetric_has_zero_zero_point_and_narrow_range():
    spec = QuantSpec(bits=8, scheme="symmetric")
    assert (spec.qmin, spec.qmax) == (-127, 127)
    _, zp = uniform_params(torch.tensor(-1.0), torch.tensor(3.0), spec)
    assert int(zp) == 0


def test_per_channel_weight_takes_at_most_2b_values_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.01, 2, 16)[:, None, None, None]
    spec = calibrate_weight(w, QuantSpec(bits=4, granularity="channel", scheme="asymmetric"))
    q = fake_quant(w, spec)
    assert all(len(torch.unique(q[c])) <= 16 for c in range(16))
    assert len(spec.scale) == 16


def test_log2_matches_the_papers_equations_on_hand_computed_values():
    eps, bits = 1e-5, 8
    delta, zp = log2_params(0.0, 1.0, bits, eps)
    a_min, a_max = math.log2(eps), math.log2(1 + eps)
    assert delta == pytest.approx((a_max - a_min) / 255)
    assert zp == round(-a_min / delta)
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    q = quantize_log2(x, delta, zp, bits, eps)
    expected = [max(0, min(255, round(math.log2(v + eps) / delta) + zp)) for v in x.tolist()]
    assert q.tolist() == expected
    assert q[0] == 0 and q[-1] == 255
    back = dequantize_log2(q, delta, zp, eps)
    assert back[0] == pytest.approx(0.0, abs=1e-6)
    # relative error of log2 quantization is bounded by the log-domain step
    assert torch.allclose(back[1:], x[1:], rtol=2 ** (delta / 2) - 1 + 1e-6)
    assert torch.equal(log2_fake_quant(x, delta, zp, bits, eps), back)


def test_log2_resolves_small_probabilities_better_than_uniform():
    probs = torch.softmax(torch.randn(64, 64) * 4, dim=-1)
    delta, zp = log2_params(float(probs.min()), float(probs.max()), 4, 1e-5)
    log_err = (log2_fake_quant(probs, delta, zp, 4, 1e-5) - probs).abs()
    uni = QuantSpec(bits=4, scheme="asymmetric")
    s, z = uniform_params(probs.min(), probs.max(), uni)
    uni_err = (fake_quant(probs, uni.with_params([s], [z])) - probs).abs()
    small = probs < probs.median()
    assert log_err[small].mean() < uni_err[small].mean()


@pytest.mark.parametrize("bits", [1, 9, 16, 0])
def test_unsupported_bits_are_rejected_with_one_line(bits):
    with pytest.raises(HyfxError, match="unsupported bit-width") as info:
        QuantSpec(bits=bits)
    assert "\n" not in str(info.value)


def test_plan_json_round_trip_is_stable(tmp_path):
    plan = QuantPlan(recipe="test", model="m", target="ort", meta={"note": 1})
    plan.set("a.conv", LayerPolicy(weight=QuantSpec(bits=6, granularity="channel").with_params([0.1, 0.2], [0, 0]),
                                   inputs={0: QuantSpec(scheme="asymmetric").with_params([0.5], [128])}))
    plan.set("a.softmax", LayerPolicy(output=QuantSpec(kind="log2").with_params([0.06], [255])))
    plan.set("empty", LayerPolicy())
    path = save_plan(plan, tmp_path / "plan.json")
    again = load_plan(path)
    assert again.to_json() == plan.to_json()
    assert "empty" not in again.layers
    data = json.loads(path.read_text())
    assert list(data["layers"]) == sorted(data["layers"])
    assert again.layers["a.conv"].inputs[0].zero_point == (128,)


def test_load_plan_errors_are_one_line(tmp_path):
    with pytest.raises(HyfxError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HyfxError, match="not valid JSON"):
        load_plan(bad)
