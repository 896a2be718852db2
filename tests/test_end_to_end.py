"""The whole pipeline on real weights and real images: capture → recipe → quantize → evaluate."""

from __future__ import annotations

import pytest
import torch

import hyfx
from hyfx import zoo
from hyfx.data import data_config, example_input, make_loader, split
from hyfx.evaluate import compare, per_layer_sqnr
from hyfx.passes.insert_quant import getattr_path
from hyfx.quant.quantizers import fake_quant

N_CALIB, N_EVAL = 32, 200
N_MECHANICS = 50


def _distinct_values_ok(qgm: torch.fx.GraphModule, plan: hyfx.QuantPlan) -> int:
    """Check every quantized weight takes at most 2^b values per channel (or tensor); return how many were checked."""
    checked = 0
    for node in qgm.graph.nodes:
        info = node.meta.get("hyfx", {})
        if info.get("kind") != "quant" or info.get("role") != "weight" or "fake_quant" not in str(node.target):
            continue  # hyfx.quantize runs each weight's quantize → dequantize pair as one op (passes.fuse_qdq)
        spec = plan.layers[info["quantizes"]].weight
        with torch.no_grad():
            w, *args = [getattr_path(qgm, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args]
            dq = node.target(w, *args)
        per = dq.reshape(dq.shape[0], -1) if spec.granularity == "channel" else dq.reshape(1, -1)
        assert max(len(torch.unique(row)) for row in per) <= 2**spec.bits
        assert not torch.equal(dq, w), "weight left unchanged by its quantizer"
        checked += 1
    return checked


@pytest.fixture(scope="module")
def lite0_setup(sample_images):
    model = zoo.create("lite0-real")
    config = data_config(model)
    calib, evaluation = split(sample_images, N_CALIB, N_EVAL, seed=0)
    assert not set(calib.names()) & set(evaluation.names())
    gm = hyfx.capture(model, example_input(config))
    return model, gm, make_loader(calib, config, 16), make_loader(evaluation, config, 50)


def test_real_weights_efficientquant_and_minmax(lite0_setup):
    model, gm, calib, evaluation = lite0_setup
    plans = {"efficientquant": hyfx.recipes.efficientquant(gm, calib, progress=False),
             "minmax": hyfx.recipes.minmax(gm, calib, progress=False)}
    qgms = {name: hyfx.quantize(gm, plan) for name, plan in plans.items()}
    for name, qgm in qgms.items():
        weights = sum(1 for p in plans[name].layers.values() if p.weight is not None)
        assert _distinct_values_ok(qgm, plans[name]) == weights
    results = compare(gm, qgms, evaluation, progress=False)
    fp32 = results["fp32"]
    print({k: v.to_dict() for k, v in results.items()})
    assert fp32.n == N_EVAL and 80 <= fp32.top1 <= 95  # real ImageNet weights (≈88% on the full sample)
    for name in qgms:
        assert results[name].agreement is not None and results[name].kl is not None
        # 8-bit quantization of a real CNN keeps most predictions
        assert results[name].agreement >= 90, (name, results[name])
        assert results[name].top1 >= fp32.top1 - 6
    assert sum(p.weight is not None for p in plans["efficientquant"].layers.values()) == 49  # every conv
    sqnr = per_layer_sqnr(hyfx.analyze(gm).gm, qgms["minmax"], ["conv_stem", "conv_head"], calib, 1)
    assert sqnr["conv_stem"] > sqnr["conv_head"] > 5  # error accumulates with depth


def test_saved_plan_reloads_to_the_same_model(lite0_setup, tmp_path):
    _, gm, calib, evaluation = lite0_setup
    plan = hyfx.recipes.minmax(gm, calib, w_bits=4, a_bits=8, progress=False)
    again = hyfx.load_plan(hyfx.save_plan(plan, tmp_path / "plan.json"))
    x = next(iter(evaluation))[0][:4]
    with torch.no_grad():
        assert torch.equal(hyfx.quantize(gm, plan)(x), hyfx.quantize(gm, again)(x))


def test_quantize_is_pure(lite0_setup):
    _, gm, calib, _ = lite0_setup
    before = [n.format_node() for n in gm.graph.nodes]
    hg = hyfx.analyze(gm)
    tagged = [n.format_node() for n in hg.gm.graph.nodes]
    hyfx.quantize(hg, hyfx.recipes.efficientquant(hg, calib, progress=False))
    assert [n.format_node() for n in gm.graph.nodes] == before
    assert [n.format_node() for n in hg.gm.graph.nodes] == tagged


def test_mobilevit_pipeline_log2_softmax(sample_images):
    """The same pipeline on mobilevit_xxs (random init: parity and mechanics only, no accuracy claim)."""
    torch.manual_seed(0)
    model = zoo.create("mobilevit_xxs")
    config = data_config(model)
    calib, evaluation = split(sample_images, 16, N_MECHANICS, seed=1)  # random weights: no accuracy to measure
    gm = hyfx.capture(model, example_input(config))
    plan = hyfx.recipes.efficientquant(gm, make_loader(calib, config, 16), progress=False)
    softmax = [name for name, p in plan.layers.items() if p.output is not None]
    assert len(softmax) == 9 and all(plan.layers[s].output.kind == "log2" for s in softmax)
    assert plan.layers[softmax[0]].output.zero_point[0] > 0
    qgm = hyfx.quantize(gm, plan)
    assert _distinct_values_ok(qgm, plan) == 35
    log2_nodes = [n for n in qgm.graph.nodes if n.target is torch.ops.hyfx.log2_fake_quant.default]
    assert len(log2_nodes) == 9
    # the post-softmax quantizer really quantizes: at most 2^8 distinct values
    x = next(iter(make_loader(evaluation, config, 8)))[0]
    probs = hyfx.analyze(gm).gm
    name = hyfx.analyze(gm).node(softmax[0]).name
    from hyfx.quant.calibrate import collect

    p = collect(probs, [name], [x], progress=False)[name]
    assert len(torch.unique(fake_quant(p, plan.layers[softmax[0]].output))) <= 256
    results = compare(gm, {"efficientquant": qgm}, make_loader(evaluation, config, 50), progress=False)
    assert results["efficientquant"].n == N_MECHANICS
    assert results["efficientquant"].agreement is not None
