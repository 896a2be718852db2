"""A new method and a new backend target plug in from outside the package, through the public registries alone."""

from __future__ import annotations

import pytest

import hyfx
from hyfx import cli
from hyfx.quant import targets
from hyfx.recipes import registry


@pytest.fixture
def toy(monkeypatch):
    """A toy target (per-tensor 8-bit weights and activations, no log2) and a toy recipe that searches within it,
    registered for one test (the registries are restored after it)."""
    monkeypatch.setattr(registry.RECIPES, "_items", dict(registry.RECIPES._items))
    monkeypatch.setattr(targets.TARGETS, "_items", dict(targets.TARGETS._items))

    hyfx.register_target(hyfx.Target("toy", weight_granularities=("tensor",), act_granularities=("tensor",), bits=8,
                                     kinds=("uniform",)))

    @hyfx.recipes.register("toy-minmax", targets=("toy",))
    def toy_minmax(gm, calib, w_bits=8, a_bits=8, target="fake", progress=True):
        """Min-max with the weight granularity the target allows."""
        granularity = hyfx.get_target(target).weight_granularities[-1]
        plan = hyfx.recipes.minmax(gm, calib, w_bits, a_bits, weight_granularity=granularity, progress=progress)
        plan.recipe = "toy-minmax"
        return plan


def test_toy_recipe_and_target_run_through_hyfx_quantize(toy, capsys, tmp_path, sample_images):
    out = tmp_path / "plan.json"
    code = cli.main(["quantize", "lite0-real", "--recipe", "toy-minmax", "--target", "toy", "--calib",
                     str(sample_images.root), "--n-calib", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = hyfx.load_plan(out)
    assert plan.recipe == "toy-minmax" and plan.target == "toy"
    weights = [spec for _, role, spec in plan.specs() if role == "weight"]
    assert weights and all(s.granularity == "tensor" and s.bits == 8 for s in weights)
    assert "toy-minmax" in hyfx.recipes.available() and "toy" in hyfx.available_targets()


def test_a_plan_the_toy_target_cannot_run_is_refused_in_one_line(toy, capsys, tmp_path, sample_images):
    out = tmp_path / "plan.json"
    code = cli.main(["quantize", "lite0-real", "--recipe", "minmax", "--target", "toy", "--calib",
                     str(sample_images.root), "--n-calib", "4", "--out", str(out)])
    last = capsys.readouterr().err.strip().split("\r")[-1]  # after the calibration progress bar
    assert code == 2 and last.startswith("hyfx: error:") and "\n" not in last
    assert "per-channel weight" in last and "toy cannot run" in last
    assert not out.exists()


def test_a_target_without_lowering_says_so_on_export(toy):
    with pytest.raises(hyfx.HyfxError, match="has no lowering"):
        hyfx.export(None, hyfx.QuantPlan("minmax"), target="toy")


def test_registry_lookups_name_what_exists():
    with pytest.raises(hyfx.HyfxError, match="unknown recipe 'nope': choose one of .*qhyvit"):
        hyfx.recipes.get("nope")
    with pytest.raises(hyfx.HyfxError, match="unknown target 'nope': choose one of fake, ort, tensorrt"):
        hyfx.get_target("nope")
    assert hyfx.recipes.get("qhyvit").searches("tensorrt") and not hyfx.recipes.get("minmax").searches("ort")


def test_refine_composes_the_refiners_it_is_asked_for(conv_head):
    _, hg, calib = conv_head
    plan = hyfx.recipes.minmax(hg, calib, w_bits=4, a_bits=8, progress=False)
    assert hyfx.refine(hg, plan, calib) is plan  # nothing asked, nothing changed
    refined = hyfx.refine(hg, plan, calib, bias_correction=True)
    assert refined.to_dict() == hyfx.refine.correct_bias(hg, plan, calib).to_dict()
    with pytest.raises(hyfx.HyfxError, match="ask for one of them"):
        hyfx.refine(hg, plan, calib, rounding_iters=5, block_iters=5)
