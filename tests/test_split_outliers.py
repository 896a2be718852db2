"""Outlier weight split: exact in float, finer low-bit weights, carried by the plan into quantize / export / ORT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hyfx
from hyfx import zoo
from hyfx.backends import ort as hort
from hyfx.cli import main
from hyfx.data import data_config, example_input, make_loader
from hyfx.evaluate import compare
from hyfx.meta import SPLIT_OUTLIERS as META_KEY
from hyfx.passes.split_outliers import outlier_mask, split_weight_outliers
from hyfx.pipelines.ort_cpu_plan import cpu_plan
from hyfx.splits import sample_split

aten = torch.ops.aten


class Fusion(torch.nn.Module):
    """MobileViT's fusion: 3×3 conv + BN over [shortcut, branch], learned as ≈1.4 × identity on the shortcut
    plus small weights (what lite0-vit-real's grafted blocks hold)."""

    def __init__(self, channels: int = 16, centre_only: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.branch = torch.nn.Conv2d(channels, channels, 1)
        self.conv = torch.nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.normal_(0, 0.04)
            for c in range(channels):
                self.conv.weight[c, c, 1, 1] = 1.4 if c % 2 else -1.2
            if not centre_only:
                self.conv.weight[0, 5, 0, 2] = 1.3
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(-1.5, 1.5)  # negative γ too: the outlier conv takes the BN factor's sign
        self.eval()

    def forward(self, x):
        return torch.relu(self.bn(self.conv(torch.cat([x, self.branch(x)], 1))))


def _captured(model: torch.nn.Module) -> torch.fx.GraphModule:
    return hyfx.capture(model, torch.randn(1, 16, 8, 8))


@pytest.mark.parametrize("centre_only", [True, False])
def test_split_is_exact_and_leaves_the_batchnorm_on_the_rest_conv(centre_only):
    gm = _captured(Fusion(centre_only=centre_only))
    split = split_weight_outliers(gm)
    x = torch.randn(4, 16, 8, 8)
    torch.testing.assert_close(split(x), gm(x), atol=1e-5, rtol=1e-5)
    info = split.meta[META_KEY]["layers"]["conv"]
    assert info["outliers"] == 16 + (0 if centre_only else 1)
    assert info["kernel"] == ([1, 1] if centre_only else [3, 3]) and info["range_gain"] > 10
    convs = [n for n in split.graph.nodes if n.target is aten.conv2d.default]
    rest = next(n for n in convs if n.args[1].target == "conv.weight")
    assert [u.target for u in rest.users] == [aten.batch_norm.default]  # BN still folds into the rest conv
    hg = hyfx.analyze(gm, split_outliers=16.0)
    assert hg.tags("conv.outliers")["kind"] == "conv" and hg.tags("conv")["kind"] == "conv"
    assert split_weight_outliers(split).meta[META_KEY]["layers"] == {}  # nothing left to split, twice is once


def test_ordinary_weights_are_not_split():
    model = Fusion()
    with torch.no_grad():
        model.conv.weight.normal_(0, 0.04)
    gm = _captured(model)
    split = split_weight_outliers(gm)
    assert split.meta[META_KEY]["layers"] == {}
    assert not outlier_mask(model.conv.weight, 16.0).any()
    with pytest.raises(hyfx.HyfxError, match="threshold 0 must be > 0"):
        split_weight_outliers(gm, threshold=0)


def test_split_plan_quantizes_better_and_every_consumer_applies_the_split(tmp_path):
    model = Fusion()
    gm = _captured(model)
    calib = [torch.randn(8, 16, 8, 8) for _ in range(2)]
    x = torch.randn(16, 16, 8, 8)
    plain = hyfx.recipes.minmax(gm, calib, w_bits=6, a_bits=8, progress=False)
    hg = hyfx.analyze(gm, split_outliers=16.0)
    plan = hyfx.make_plan("minmax", hg, calib, w_bits=6, a_bits=8, progress=False)
    assert plan.meta["split_outliers"] == 16.0 and "conv.outliers" in plan.layers
    reference = gm(x)
    err_plain = (hyfx.quantize(gm, plain)(x) - reference).pow(2).mean()
    err_split = (hyfx.quantize(gm, plan)(x) - reference).pow(2).mean()  # the captured graph is split as the plan says
    assert err_split < err_plain / 3
    hyfx.save_plan(plan, tmp_path / "plan.json")
    plan = hyfx.load_plan(tmp_path / "plan.json")
    with pytest.raises(hyfx.HyfxError, match="outlier weights split .*split_outliers=16.0"):
        hyfx.quantize(hyfx.analyze(gm), plan)
    result = hyfx.export(gm, plan, target="ort")
    got = hort.run(hort.session(result.model, optimize=False), x)
    np.testing.assert_allclose(got, result.reference(x).detach().numpy(), atol=1e-4, rtol=0)
    cpu, graph, _ = cpu_plan(gm, plan, calib)
    assert "conv.outliers" in cpu.layers and graph.gm.meta[META_KEY]["layers"]


@pytest.mark.skipif(not zoo.HYBRID_CHECKPOINT.is_file(), reason="lite0-vit-real checkpoint not built")
def test_split_cuts_the_w6_error_of_the_real_hybrid(sample_images):
    """lite0-vit-real's two fusion convs hold the outliers: their 6-bit weights (min-max, the rest of the model
    float) cost far less accuracy once the outliers are split out."""
    model = zoo.create("lite0-vit-real")
    config = data_config(model)
    calib, evaluation = sample_split("lite0-vit-real", sample_images.root, n_calib=16, n_eval=50)
    gm = hyfx.capture(model, example_input(config))
    loader = list(make_loader(calib, config, 16))
    hg = hyfx.analyze(gm, split_outliers=16.0)
    assert sorted(hg.gm.meta[META_KEY]["layers"]) == ["blocks.4.2.conv_fusion.conv", "blocks.5.3.conv_fusion.conv"]
    plans = {"plain": hyfx.recipes.minmax(gm, loader, w_bits=6, progress=False),
             "split": hyfx.make_plan("minmax", hg, loader, w_bits=6, progress=False)}
    for plan in plans.values():  # only the fusion convs' weights quantized
        plan.layers = {k: v for k, v in plan.layers.items() if ".conv_fusion." in k}
        for policy in plan.layers.values():
            policy.inputs = {}
    results = compare(gm, {k: hyfx.quantize(gm, p) for k, p in plans.items()}, make_loader(evaluation, config, 50),
                      progress=False)
    assert results["split"].kl < 0.1 * results["plain"].kl, {k: v.kl for k, v in results.items()}


def test_cli_refuses_a_non_positive_threshold(capsys):
    code = main(["quantize", "lite0-real", "--recipe", "minmax", "--calib", "x", "--split-outliers", "0"])
    assert code == 2 and "--split-outliers 0.0: give a positive number of standard deviations" in capsys.readouterr().err


@pytest.mark.skipif(not zoo.HYBRID_CHECKPOINT.is_file(), reason="lite0-vit-real checkpoint not built")
def test_inspect_names_the_convs_with_outliers(tmp_path, capsys):
    assert main(["inspect", "lite0-vit-real", "--json", str(tmp_path / "blocks.json")]) == 0
    out = capsys.readouterr().out
    assert "weight outliers: 2 convs" in out and "--split-outliers" in out
    found = json.loads((tmp_path / "blocks.json").read_text())["weight_outliers"]
    assert sorted(found) == ["blocks.4.2.conv_fusion.conv", "blocks.5.3.conv_fusion.conv"]


@pytest.mark.skipif(not zoo.HYBRID_CHECKPOINT.is_file(), reason="lite0-vit-real checkpoint not built")
def test_cli_quantize_hints_then_splits_and_eval_applies_the_plan(sample_images, tmp_path, capsys):
    data = str(sample_images.root)
    common = ["quantize", "lite0-vit-real", "--recipe", "minmax", "--bits", "8", "--calib", data, "--n-calib", "4"]
    assert main([*common, "--out", str(tmp_path / "plain.json")]) == 0
    assert "weight outliers: 2 convs" in capsys.readouterr().out
    assert main([*common, "--split-outliers", "--out", str(tmp_path / "split.json")]) == 0
    out = capsys.readouterr().out
    assert "outlier weights split out of 2 convs: blocks.4.2.conv_fusion.conv, blocks.5.3.conv_fusion.conv" in out
    plan = hyfx.load_plan(tmp_path / "split.json")
    assert plan.meta["split_outliers"] == 16.0 and "blocks.5.3.conv_fusion.conv.outliers" in plan.layers
    assert main(["eval", "lite0-vit-real", "--plan", str(tmp_path / "split.json"), "--data", data, "--n-eval", "20"]) == 0
    assert "minmax" in capsys.readouterr().out
