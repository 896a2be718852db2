"""Activation scales learned end to end: only activation scales change, and the prediction difference falls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hyfx
from hyfx.quant.spec import QuantSpec
from hyfx.refine.activation_scales import learn_activation_scales


def _kl(hg, plan, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = F.log_softmax(hg.gm(x), -1)
        got = F.log_softmax(hyfx.quantize(hg, plan)(x), -1)
    return float(F.kl_div(got, ref, log_target=True, reduction="batchmean"))


def _coarse_plan(hg, calib):
    """3-bit activations, the conv's input per channel with a scale 3× too large (a clear case to fix)."""
    plan = hyfx.recipes.minmax(hg, calib, w_bits=8, a_bits=3, progress=False)
    x = torch.cat(calib)
    lo, hi = x.amin((0, 2, 3)).clamp(max=0), x.amax((0, 2, 3))
    spec = QuantSpec(bits=3, granularity="channel", scheme="asymmetric", axis=1)
    scale = (hi - lo) / spec.qmax * 3
    plan.layers["conv"].inputs[0] = spec.with_params(scale.tolist(), torch.round(-lo / scale).tolist())
    return plan


def test_learned_scales_lower_the_prediction_difference_on_unseen_inputs(conv_head):
    _, hg, calib = conv_head
    plan = _coarse_plan(hg, calib)
    learned = learn_activation_scales(hg, plan, calib, steps=150, batch=8, lr=0.05, progress=False)
    meta = learned.meta["activation_scales"]
    assert meta["quantizers"] == 2 and meta["n_images"] == 12 and meta["loss_last"] < meta["loss_first"]
    torch.manual_seed(1)
    unseen = torch.randn(64, 3, 8, 8) + 0.5
    assert _kl(hg, learned, unseen) < 0.8 * _kl(hg, plan, unseen)


def test_only_activation_scales_change(conv_head):
    _, hg, calib = conv_head
    plan = _coarse_plan(hg, calib)
    learned = learn_activation_scales(hg, plan, calib, steps=5, batch=4, progress=False)
    assert learned.meta["activation_scales"]["steps"] == 5 and "activation_scales" not in plan.meta
    for layer, policy in plan.layers.items():
        new = learned.layers[layer]
        assert new.weight == policy.weight and new.output == policy.output
        for idx, spec in policy.inputs.items():
            got = new.inputs[idx]
            assert got.uncalibrated() == spec.uncalibrated() and got.zero_point == spec.zero_point
            assert len(got.scale) == len(spec.scale) and got.scale != spec.scale


def test_a_plan_without_activation_quantizers_is_refused(conv_head):
    _, hg, calib = conv_head
    plan = hyfx.recipes.minmax(hg, calib, w_bits=8, a_bits=8, progress=False)
    for policy in plan.layers.values():
        policy.inputs = {}
    with pytest.raises(hyfx.HyfxError, match="no activation with a uniform quantizer"):
        learn_activation_scales(hg, plan, calib, steps=2, progress=False)


def test_cli_learns_the_activation_scales_of_a_real_model(capsys, sample_images, lite0_real_w6_plan):
    """The wiring end to end on lite0-real (2 steps: what the steps buy is measured in the module's docstring)."""
    from hyfx import cli

    plan, _ = lite0_real_w6_plan("--learn-activations", "2")
    meta = plan.meta["activation_scales"]
    assert meta["steps"] == 2 and meta["n_images"] == 4
    assert meta["quantizers"] == sum(len(p.inputs) for p in plan.layers.values()) > 40
    code = cli.main(["quantize", "lite0-real", "--calib", str(sample_images.root), "--learn-activations", "0"])
    assert code == 2 and "--learn-activations 0: give a positive number of steps" in capsys.readouterr().err
