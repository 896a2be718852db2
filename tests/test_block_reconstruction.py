"""Block reconstruction (BRECQ + QDrop): blocks cut right, only rounding and activation scales change, error falls."""

from __future__ import annotations

import pytest
import torch
from test_qhyvit import TinyHybrid

import hyfx
from hyfx.passes.insert_quant import insert_quant
from hyfx.refine.activation_scales import learnable_activations
from hyfx.refine.adaround import unrounded
from hyfx.refine.block_reconstruction import (
    _block_of,
    _learnable_weights,
    _Stream,
    _subgraph,
    reconstruct_blocks,
)


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    model = TinyHybrid().eval()
    gm = hyfx.capture(model, torch.randn(1, 3, 16, 16))
    hg = hyfx.analyze(gm)
    images = [torch.randn(8, 3, 16, 16) + 0.3 for _ in range(3)]
    plan = hyfx.recipes.minmax(hg, images, w_bits=3, a_bits=4, progress=False)
    return hg, images, plan


def _mse(hg, plan, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((hyfx.quantize(hg, plan)(x) - hg.gm(x)) ** 2).mean())


def test_a_block_cut_out_computes_what_the_whole_graph_computes_at_any_batch_size(hybrid):
    """The MobileViT block reads its batch size through shape arithmetic: the cut pulls it in with the block."""
    hg, images, plan = hybrid
    qgm = insert_quant(hg.gm, plan)
    learnable_activations(qgm)
    qgm.eval()
    members = [n for n in qgm.graph.nodes if _block_of(n, hg) == "block"]
    sub, inputs, outputs = _subgraph(qgm, members)
    assert len(outputs) == 1 and inputs
    x = torch.randn(5, 3, 16, 16)  # not the capture's batch size, nor the calibration's
    stream = _Stream(qgm, [x])
    with torch.no_grad():
        *xs, target = stream.take(inputs + outputs, stream.index[outputs[0]] + 1)
        (out,) = sub(*xs)
    torch.testing.assert_close(out, target)


def test_the_stream_hands_each_block_what_a_fresh_run_computes_after_earlier_blocks_changed(hybrid):
    """Inputs come from one pass kept between blocks; a weight's rounding, passed at the top of the graph before
    its block was trained, must be recomputed where it is used, not kept."""
    hg, images, plan = hybrid
    plan, specs = unrounded(hg, plan)
    qgm = insert_quant(hg.gm, plan)
    roundings = _learnable_weights(qgm, specs)
    qgm.eval()
    stream = _Stream(qgm, images[:2])
    blocks = {b: [n for n in qgm.graph.nodes if _block_of(n, hg) == b] for b in ("block", "head")}
    starts = {b: min(stream.index[n] for n in ns if n not in stream.constant) for b, ns in blocks.items()}
    with torch.no_grad():
        for block in ("block", "head"):
            _, inputs, _ = _subgraph(qgm, blocks[block])
            streamed = stream.take(inputs, starts[block])
            fresh = _Stream(qgm, images[:2]).take(inputs, starts[block])
            for a, b in zip(streamed, fresh, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            for name, layer in roundings.items():  # "train" this block's rounding: the next block's inputs change
                if hg.tags(layer)["block"] == block:
                    qgm.get_submodule(name).v.add_(torch.randn_like(qgm.get_submodule(name).v) * 3)
    assert len(stream.envs[0]) <= 4  # only values still read downstream are kept


def test_reconstruction_lowers_the_error_on_unseen_inputs(hybrid):
    hg, images, plan = hybrid
    learned = reconstruct_blocks(hg, plan, images, iters=300, batch=8, progress=False)
    meta = learned.meta["block_reconstruction"]
    weighted = sum(p.weight is not None for p in plan.layers.values())
    assert meta["roundings"] == weighted and meta["activation_scales"] > 10 and meta["n_images"] == 24
    assert [b for b, _, _ in meta["loss"]] == ["stem.0", "block", "head"]  # graph order: inputs already reconstructed
    losses = [(before, after) for _, before, after in meta["loss"]]  # a block that got worse is put back
    assert all(after <= before for before, after in losses) and sum(after < before for before, after in losses) >= 2
    torch.manual_seed(1)
    unseen = torch.randn(32, 3, 16, 16) + 0.3
    assert _mse(hg, learned, unseen) < 0.5 * _mse(hg, plan, unseen)


def test_only_rounding_and_activation_scales_change_and_the_plan_file_keeps_them(hybrid, tmp_path):
    hg, images, plan = hybrid
    learned = reconstruct_blocks(hg, plan, images, iters=10, batch=8, progress=False)
    for layer, policy in plan.layers.items():
        new = learned.layers[layer]
        if policy.weight is not None:
            assert new.weight.uncalibrated() == policy.weight.uncalibrated() and new.weight_rounding is not None
        for idx, spec in policy.inputs.items():
            got = new.inputs[idx]
            assert got.uncalibrated() == spec.uncalibrated() and got.zero_point == spec.zero_point
    hyfx.save_plan(learned, tmp_path / "plan.json")
    x = images[0]
    with torch.no_grad():
        torch.testing.assert_close(hyfx.quantize(hg, hyfx.load_plan(tmp_path / "plan.json"))(x),
                                   hyfx.quantize(hg, learned)(x))


def test_a_block_that_gets_worse_is_put_back_as_the_recipe_left_it(hybrid):
    hg, images, plan = hybrid
    wrecked = reconstruct_blocks(hg, plan, images, iters=5, batch=8, lr=100.0, scale_lr=20.0, progress=False)
    assert all(after == before for _, before, after in wrecked.meta["block_reconstruction"]["loss"])
    x = images[1]
    with torch.no_grad():
        torch.testing.assert_close(hyfx.quantize(hg, wrecked)(x), hyfx.quantize(hg, plan)(x))


def test_bad_settings_are_refused(hybrid):
    hg, images, plan = hybrid
    with pytest.raises(hyfx.HyfxError, match="iters ≥ 1"):
        reconstruct_blocks(hg, plan, images, iters=0, progress=False)
    with pytest.raises(hyfx.HyfxError, match="drop probability"):
        reconstruct_blocks(hg, plan, images, drop=1.0, progress=False)
    with pytest.raises(hyfx.HyfxError, match="ask for one of them"):
        hyfx.make_plan("minmax", hg, images, rounding_iters=5, block_iters=5, progress=False)
    empty = hyfx.recipes.minmax(hg, images, progress=False)
    for policy in empty.layers.values():
        policy.inputs, policy.weight, policy.output = {}, None, None
    with pytest.raises(hyfx.HyfxError, match="nothing to reconstruct"):
        reconstruct_blocks(hg, empty, images, progress=False)


def test_cli_reconstructs_every_block_of_a_real_model(capsys, sample_images, lite0_real_w6_plan):
    """The wiring end to end on lite0-real (2 steps per block: what the steps buy is in the README's table)."""
    from hyfx import cli

    plan, _ = lite0_real_w6_plan("--reconstruct-blocks", "2")
    meta = plan.meta["block_reconstruction"]
    assert meta["iters"] == 2 and meta["n_images"] == 4 and meta["roundings"] == 50
    order = [block for block, _, _ in meta["loss"]]  # [block, loss before, loss after] in graph order
    assert order[:2] == ["conv_stem", "blocks.0.0"] and order[-1] == "classifier" and len(order) == 19
    assert all(p.weight_rounding is not None for p in plan.layers.values() if p.weight is not None)
    for extra, message in ((["--reconstruct-blocks", "0"], "give a positive number of steps per block"),
                           (["--reconstruct-blocks", "--adaround"], "give one of them")):
        code = cli.main(["quantize", "lite0-real", "--calib", str(sample_images.root), *extra])
        assert code == 2 and message in capsys.readouterr().err
