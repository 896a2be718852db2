"""Empirical bias correction: measured shifts, how insert_quant applies them, and lowering through BN folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyfx
from hyfx import zoo
from hyfx.backends import ort as hort
from hyfx.data import data_config, example_input, make_loader, split
from hyfx.evaluate import compare
from hyfx.pipelines.ort_cpu_plan import cpu_plan
from hyfx.quant.calibrate import collect
from hyfx.quant.quantizers import calibrate_weight, fake_quant
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec
from hyfx.refine.bias_correction import correct_bias


def _weights_only(hg, bits: int = 3) -> QuantPlan:
    spec = QuantSpec(bits=bits, granularity="tensor", scheme="symmetric")
    return QuantPlan("weights", {"conv": LayerPolicy(weight=spec), "fc": LayerPolicy(weight=spec)})


def test_corrected_first_layer_has_the_float_channel_means_on_the_calibration_images(conv_head):
    model, hg, calib = conv_head
    plain = _weights_only(hg)
    corrected = correct_bias(hg, plain, calib)
    assert corrected.layers["conv"].bias_correction is not None and len(corrected.layers["conv"].bias_correction) == 6
    assert plain.layers["conv"].bias_correction is None  # the input plan is left alone
    node = hg.node("conv").name
    means = {label: collect(gm, [node], calib, progress=False)[node].double().mean((0, 2, 3))
             for label, gm in {"float": hg.gm, "plain": hyfx.quantize(hg, plain),
                               "corrected": hyfx.quantize(hg, corrected)}.items()}
    shift = (means["float"] - means["plain"]).abs().max()
    assert shift > 1e-3  # 3-bit rounding really shifts the means
    torch.testing.assert_close(means["corrected"], means["float"], atol=1e-5, rtol=0)
    # by hand: the correction is E[conv(x, W)] - E[conv(x, Q(W))] over the calibration images
    weight = model.conv.weight.detach()
    qweight = fake_quant(weight, calibrate_weight(weight, plain.layers["conv"].weight))
    x = torch.cat(calib)
    by_hand = (torch.nn.functional.conv2d(x, weight, padding=1) - torch.nn.functional.conv2d(x, qweight, padding=1))
    torch.testing.assert_close(torch.tensor(corrected.layers["conv"].bias_correction).double(),
                               by_hand.double().mean((0, 2, 3)), atol=1e-5, rtol=0)


def test_correction_goes_into_the_bias_and_survives_the_plan_file(conv_head, tmp_path):
    _, hg, calib = conv_head
    plan = correct_bias(hg, _weights_only(hg), calib)
    assert plan.summary()["bias_correction"] == 2 and plan.meta["bias_correction"]["n_images"] == 12
    hyfx.save_plan(plan, tmp_path / "plan.json")
    loaded = hyfx.load_plan(tmp_path / "plan.json")
    assert loaded.layers["fc"].bias_correction == pytest.approx(plan.layers["fc"].bias_correction)
    qgm = hyfx.quantize(hg, loaded)
    conv = next(n for n in qgm.graph.nodes if n.meta.get("hyfx", {}).get("name") == "conv")
    fc = next(n for n in qgm.graph.nodes if n.meta.get("hyfx", {}).get("name") == "fc")
    # the bias-less conv got the correction as its bias; the linear's bias was moved by it
    torch.testing.assert_close(getattr(qgm, conv.args[2].target), torch.tensor(plan.layers["conv"].bias_correction))
    torch.testing.assert_close(getattr(qgm, fc.args[2].target) - hg.gm.get_parameter(_bias_of(hg, "fc")),
                               torch.tensor(plan.layers["fc"].bias_correction))


def _bias_of(hg, layer: str) -> str:
    return hg.node(layer).args[2].target


def test_a_correction_with_the_wrong_channel_count_is_refused(conv_head):
    _, hg, _ = conv_head
    plan = _weights_only(hg)
    plan.layers["conv"].bias_correction = (0.1,) * 4
    with pytest.raises(hyfx.HyfxError, match="4 channels, the layer 6: the plan was made for another model"):
        hyfx.quantize(hg, plan)


def test_export_folds_batchnorm_into_the_corrected_bias(conv_head):
    """Through the BN fold the correction is scaled with the conv output; ORT's Q/DQ ops reproduce it."""
    _, hg, calib = conv_head
    plan = correct_bias(hg, hyfx.recipes.minmax(hg, calib, w_bits=4, a_bits=8, progress=False), calib)
    result = hyfx.export(hg, plan, target="ort")
    assert result.report.folded_bn == ["conv"]
    x = torch.randn(6, 3, 8, 8) + 0.5
    with torch.no_grad():
        unfolded = hyfx.quantize(hg, plan)(x).numpy()
        folded = result.reference(x).numpy()
    got = hort.run(hort.session(result.model, optimize=False), x)
    uncorrected = hyfx.export(hg, plan_without(plan), target="ort").reference(x).detach().numpy()
    effect = np.abs(uncorrected - unfolded).max()  # what the correction changes in the output
    assert effect > 1e-3
    # the folded graph is the corrected model, and ORT runs it (up to a rare activation rounding tie)
    assert np.abs(folded - unfolded).max() < 0.05 * effect
    assert np.abs(got - folded).max() < 0.05 * effect


def plan_without(plan: QuantPlan) -> QuantPlan:
    out = QuantPlan.from_dict(plan.to_dict())
    for policy in out.layers.values():
        policy.bias_correction = None
    return out


def test_cpu_lowering_measures_the_correction_again_for_its_own_weights(conv_head):
    _, hg, calib = conv_head
    plan = correct_bias(hg, hyfx.recipes.minmax(hg, calib, w_bits=8, a_bits=8, progress=False), calib)
    cpu, _, _ = cpu_plan(hg, plan, calib, weight_bits=4)
    assert cpu.layers["conv"].weight.bits == 4 and cpu.layers["conv"].bias_correction is not None
    assert cpu.layers["conv"].bias_correction != plan.layers["conv"].bias_correction
    uncorrected, _, _ = cpu_plan(hg, plan_without(plan), calib, weight_bits=4)
    assert all(p.bias_correction is None for p in uncorrected.layers.values())


def test_bench_recipe_names_with_bc_get_bias_correction(conv_head):
    from hyfx.pipelines.bench import _ort_plan

    _, hg, calib = conv_head
    assert _ort_plan(hg, "minmax+bc", calib).layers["conv"].bias_correction is not None
    assert _ort_plan(hg, "minmax", calib).layers["conv"].bias_correction is None


@pytest.mark.slow
def test_bias_correction_brings_6_bit_weights_closer_to_fp32_on_real_weights(sample_images):
    """lite0-real at W6A8 min-max (depthwise convs: few weights per channel, rounding shifts do not average out)."""
    model = zoo.create("lite0-real")
    config = data_config(model)
    calib, evaluation = split(sample_images, 16, 100, seed=1)
    hg = hyfx.analyze(hyfx.capture(model, example_input(config)))
    loader = make_loader(calib, config, 16)
    plan = hyfx.recipes.minmax(hg, loader, w_bits=6, a_bits=8, progress=False)
    corrected = correct_bias(hg, plan, loader)
    results = compare(hg.gm, {"minmax": hyfx.quantize(hg, plan), "corrected": hyfx.quantize(hg, corrected)},
                      make_loader(evaluation, config, 50), progress=False)
    print({k: (round(v.top1, 1), v.agreement, v.kl) for k, v in results.items()})
    # measured: KL 0.31 → 0.05, agreement 78% → 91%
    assert results["corrected"].kl < 0.5 * results["minmax"].kl
    assert results["corrected"].agreement > results["minmax"].agreement + 5
