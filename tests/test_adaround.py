"""Learned weight rounding: the plan encoding, how insert_quant and the lowerings apply it, and the search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyfx
from hyfx.backends import ort as hort
from hyfx.passes.fold_batchnorm import folded_weight_spec
from hyfx.pipelines.ort_cpu_plan import cpu_plan
from hyfx.quant.quantizers import calibrate_weight, fake_quant
from hyfx.quant.rounding import decode_offsets, encode_offsets, flip_offsets, offsets_from_codes, rounded_weight
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec
from hyfx.refine.adaround import adaround, learn_rounding


def _spec(weight: torch.Tensor, bits: int = 3, scheme: str = "symmetric") -> QuantSpec:
    return calibrate_weight(weight, QuantSpec(bits=bits, granularity="channel", scheme=scheme, axis=0))


def test_offsets_round_trip_through_the_plan_text_and_refuse_another_shape():
    offsets = torch.randint(-1, 2, (6, 3, 3, 3), dtype=torch.int8)
    text = encode_offsets(offsets)
    assert torch.equal(decode_offsets(text, offsets.shape), offsets)
    with pytest.raises(hyfx.HyfxError, match="162 weights, the layer 54: the plan was made for another model"):
        decode_offsets(text, (6, 9))
    with pytest.raises(hyfx.HyfxError, match="weight rounding of conv is corrupt"):
        decode_offsets("not base64!", offsets.shape, "conv")


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_rounded_weight_is_on_the_grid_and_zero_offsets_are_round_to_nearest(scheme):
    torch.manual_seed(1)
    weight = torch.randn(6, 3, 3, 3)
    spec = _spec(weight, 4, scheme)
    nearest = rounded_weight(weight, spec, torch.zeros_like(weight, dtype=torch.int8))
    torch.testing.assert_close(nearest, fake_quant(weight, spec))
    offsets = torch.randint(-1, 2, weight.shape, dtype=torch.int8)
    rounded = rounded_weight(weight, spec, offsets)
    torch.testing.assert_close(fake_quant(rounded, spec), rounded)  # quantizing it again changes nothing
    scale = torch.tensor(spec.scale).reshape(-1, 1, 1, 1)
    zero_point = torch.tensor(spec.zero_point).reshape(-1, 1, 1, 1)
    unclamped = torch.round(weight / scale) + offsets + zero_point
    inside = (unclamped >= spec.qmin) & (unclamped <= spec.qmax)  # offsets past the grid's end are clamped away
    assert inside.float().mean() > 0.8
    codes = torch.round(rounded / scale)
    assert torch.equal(offsets_from_codes(weight, spec, codes)[inside], offsets[inside])


def test_flipped_offsets_round_the_negated_weight_the_same_way():
    torch.manual_seed(2)
    weight, factor = torch.randn(4, 8), torch.tensor([1.5, -0.5, 0.0, -2.0])
    spec = _spec(weight)
    offsets = torch.randint(-1, 2, weight.shape, dtype=torch.int8)
    folded = weight * factor[:, None]
    got = rounded_weight(folded, folded_weight_spec(spec, factor),
                         decode_offsets(flip_offsets(encode_offsets(offsets), factor), weight.shape))
    torch.testing.assert_close(got, rounded_weight(weight, spec, offsets) * factor[:, None])


def test_learned_rounding_beats_nearest_on_the_layer_output():
    """A linear layer whose inputs are correlated: rounding to nearest ignores that, AdaRound uses it."""
    torch.manual_seed(3)
    weight = torch.randn(16, 32)
    mix = torch.randn(32, 32) * 0.3 + torch.eye(32)
    x = torch.randn(256, 32) @ mix + 0.5
    spec = _spec(weight, 3)

    def layer(inp, w):
        return inp @ w.t()

    codes = learn_rounding(layer, weight, spec, x, layer(x, weight), -1, iters=1000, batch=64, lr=3e-2)
    learned = codes * torch.tensor(spec.scale)[:, None]
    nearest = fake_quant(weight, spec)
    held_out = torch.randn(256, 32) @ mix + 0.5
    error = {name: float(((layer(held_out, w) - layer(held_out, weight)) ** 2).mean())
             for name, w in {"learned": learned, "nearest": nearest}.items()}
    assert (codes - torch.floor(weight / torch.tensor(spec.scale)[:, None])).abs().max() <= 1  # floor or ceil
    assert error["learned"] < 0.9 * error["nearest"]  # measured: 0.85


def _weights_only(bits: int = 3) -> QuantPlan:
    spec = QuantSpec(bits=bits, granularity="channel", scheme="symmetric", axis=0)
    return QuantPlan("weights", {"conv": LayerPolicy(weight=spec), "fc": LayerPolicy(weight=spec)})


def test_adaround_plan_is_applied_by_insert_quant_and_survives_the_plan_file(conv_head, tmp_path):
    _, hg, calib = conv_head
    plan = adaround(hg, _weights_only(), calib, iters=50, batch=4, progress=False)
    assert plan.summary()["weight_rounding"] == 2 and plan.meta["adaround"]["n_images"] == 12
    assert all(p.weight.calibrated for p in plan.layers.values())
    hyfx.save_plan(plan, tmp_path / "plan.json")
    loaded = hyfx.load_plan(tmp_path / "plan.json")
    qgm = hyfx.quantize(hg, loaded)
    conv = next(n for n in qgm.graph.nodes if n.meta.get("hyfx", {}).get("name") == "conv")
    weight = hg.gm.get_parameter(hg.node("conv").args[1].target).detach()
    spec = loaded.layers["conv"].weight
    expected = rounded_weight(weight, spec, decode_offsets(loaded.layers["conv"].weight_rounding, weight.shape))
    with torch.no_grad():
        source = conv.args[1]
        while source.op != "get_attr":
            source = source.args[0]
        torch.testing.assert_close(getattr(qgm, source.target), expected)
    nearest = hyfx.quantize(hg, _weights_only())
    x = calib[0]
    assert not torch.equal(qgm(x), nearest(x))  # the rounding really differs from nearest somewhere


def test_adaround_lowers_reconstruction_error_against_fp32(conv_head):
    _, hg, calib = conv_head
    plain = hyfx.recipes.minmax(hg, calib, w_bits=3, a_bits=8, progress=False)
    learned = adaround(hg, plain, calib, iters=300, batch=4, progress=False)
    x = torch.cat(calib)
    with torch.no_grad():
        ref = hg.gm(x)
        errors = {k: float(((hyfx.quantize(hg, p)(x) - ref) ** 2).mean()) for k, p in
                  {"nearest": plain, "learned": learned}.items()}
    assert errors["learned"] < errors["nearest"]


def test_export_folds_batchnorm_with_the_learned_rounding(conv_head):
    """Negative BN factors flip the offsets through the fold; ORT reproduces the PyTorch quantized model."""
    _, hg, calib = conv_head
    plan = hyfx.recipes.minmax(hg, calib, w_bits=4, a_bits=8, progress=False)
    for policy in plan.layers.values():
        policy.weight = QuantSpec(bits=4, granularity="channel", scheme="symmetric", axis=0)
    plan = adaround(hg, plan, calib, iters=100, batch=4, progress=False)
    result = hyfx.export(hg, plan, target="ort")
    assert result.report.folded_bn == ["conv"] and result.report.reweighted == []
    x = torch.randn(6, 3, 8, 8) + 0.5
    with torch.no_grad():
        unfolded = hyfx.quantize(hg, plan)(x).numpy()
        folded = result.reference(x).numpy()
    got = hort.run(hort.session(result.model, optimize=False), x)
    assert np.abs(folded - unfolded).max() < 1e-4
    assert np.abs(got - folded).max() < 1e-4


def test_a_changed_weight_spec_drops_the_rounding_made_for_the_old_one(conv_head):
    _, hg, calib = conv_head
    plan = adaround(hg, _weights_only(), calib, iters=20, batch=4, progress=False)
    policy = plan.layers["conv"]
    policy.set_weight(policy.weight)
    assert policy.weight_rounding is not None
    policy.set_weight(QuantSpec(bits=8, granularity="channel", scheme="symmetric", axis=0))
    assert policy.weight_rounding is None and policy.bias_correction is None
    cpu, _, _ = cpu_plan(hg, adaround(hg, _weights_only(), calib, iters=20, batch=4, progress=False), calib,
                              weight_bits=4)
    assert cpu.layers["conv"].weight_rounding is not None  # 3-bit symmetric fits the 4-bit kernels: carried


def test_cli_learns_the_rounding_of_every_layer_of_a_real_model(capsys, sample_images, lite0_real_w6_plan):
    """The wiring end to end on lite0-real (2 steps per layer: what the steps buy is benchmarks/accuracy.py's)."""
    from hyfx import cli

    plan, out = lite0_real_w6_plan("--adaround", "2", "--bias-correction")
    weighted = [p for p in plan.layers.values() if p.weight is not None]
    assert len(weighted) == 50 and all(p.weight_rounding is not None and p.bias_correction is not None
                                       for p in weighted)
    assert plan.meta["adaround"]["iters"] == 2 and plan.meta["adaround"]["n_images"] == 4
    assert "weight_rounding" in out
    code = cli.main(["quantize", "lite0-real", "--calib", str(sample_images.root), "--adaround", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--adaround 0: give a positive number of steps" in err


def test_unknown_objective_is_refused(conv_head):
    _, hg, calib = conv_head
    with pytest.raises(hyfx.HyfxError, match="unknown AdaRound objective 'mse': use 'fp32' or 'layer'"):
        adaround(hg, _weights_only(), calib, objective="mse")
