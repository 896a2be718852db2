"""Each graph pass on its own, on a tiny conv → tokens → attention model."""

from __future__ import annotations

import pytest
import torch

import hyfx
from hyfx.passes.bridges import find_bridges
from hyfx.passes.decompose_attention import decompose_attention
from hyfx.passes.insert_quant import insert_quant
from hyfx.passes.tag import tag
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec


class TinyBlock(torch.nn.Module):
    """conv_kxk → conv_1x1 → tokens → attention → fold → conv_proj: a MobileViT block in miniature."""

    def __init__(self):
        super().__init__()
        self.conv_kxk = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv_1x1 = torch.nn.Conv2d(8, 16, 1)
        self.norm = torch.nn.LayerNorm(16)
        self.qkv = torch.nn.Linear(16, 48)
        self.conv_proj = torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        t = self.conv_1x1(self.conv_kxk(x)).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(t)).reshape(b, h * w, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        t = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, 16)
        return self.conv_proj(t.transpose(1, 2).reshape(b, 16, h, w))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(TinyBlock())
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _captured():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(2, 3, 6, 6)
    return model, x, hyfx.capture(model, x)


def test_tag_names_blocks_and_kinds():
    _, _, gm = _captured()
    tagged = tag(decompose_attention(gm))
    names = {n.meta["hyfx"]["name"]: n.meta["hyfx"] for n in tagged.graph.nodes if "hyfx" in n.meta}
    assert names["stem"]["kind"] == "conv" and names["stem"]["block_kind"] == "cnn"
    assert names["blocks.0.conv_kxk"]["block"] == "blocks.0"
    assert names["blocks.0.softmax"]["kind"] == "softmax"
    assert {names["blocks.0.matmul_0"]["kind"], names["blocks.0.matmul_1"]["kind"]} == {"matmul"}
    assert names["blocks.0.qkv"]["region"] == "transformer" and names["blocks.0.qkv"]["token_op"]
    assert names["blocks.0.conv_kxk"]["block_kind"] == "transformer"
    assert names["head"]["block_kind"] == "other"  # a classifier on pooled features is not a transformer
    assert "hyfx" not in next(iter(gm.graph.nodes)).meta  # the input graph is untouched


def test_bridge_found_with_entry_and_exit():
    _, _, gm = _captured()
    (bridge,) = find_bridges(tag(decompose_attention(gm)))
    assert bridge.block == "blocks.0"
    assert bridge.layers == ["blocks.0.conv_kxk", "blocks.0.conv_1x1"]
    assert bridge.into == "blocks.0.norm"
    assert bridge.exit_layers == ["blocks.0.conv_proj"]


def test_insert_quant_weight_only_and_weight_plus_activation():
    model, x, gm = _captured()
    hg = hyfx.analyze(gm)
    weight_only = QuantPlan("t", {"stem": LayerPolicy(weight=QuantSpec(bits=3, granularity="channel"))})
    q1 = insert_quant(hg.gm, weight_only)
    targets = [str(n.target) for n in q1.graph.nodes]
    assert targets.count("quantized_decomposed.quantize_per_channel.default") == 1
    with torch.no_grad():
        assert not torch.allclose(q1(x), model(x))
    act = QuantSpec(scheme="asymmetric").with_params([0.05], [128])
    both = QuantPlan("t", {"blocks.0.qkv": LayerPolicy(weight=QuantSpec(), inputs={0: act}),
                           "blocks.0.softmax": LayerPolicy(output=QuantSpec(kind="log2").with_params([0.07], [240]))})
    q2 = insert_quant(hg.gm, both)
    kinds = [n.meta["hyfx"].get("role") for n in q2.graph.nodes if n.meta.get("hyfx", {}).get("kind") == "quant"]
    assert sorted(kinds) == ["input0", "input0", "output", "weight", "weight"]
    # the activation quantizer sits only on the edge into qkv: the norm output has its float consumer too
    with torch.no_grad():
        out = q2(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_fuse_qdq_runs_every_uniform_pair_as_one_op_with_the_same_values():
    from hyfx.passes.fuse_qdq import fuse_qdq

    model, x, gm = _captured()
    hg = hyfx.analyze(gm)
    calib = [torch.randn(4, 3, 6, 6) * 2 + 0.3 for _ in range(2)]
    plan = hyfx.recipes.minmax(hg, calib, progress=False)  # per-channel weights, per-tensor asymmetric inputs
    per_channel_act = QuantSpec(scheme="asymmetric", granularity="channel", axis=1).with_params(
        [0.011, 0.023, 0.0071, 0.05, 0.031, 0.017, 0.009, 0.04], [3, 250, 128, 0, 17, 99, 200, 128])
    plan.layers["blocks.0.conv_kxk"].inputs[0] = per_channel_act
    plan.set("blocks.0.softmax", LayerPolicy(output=QuantSpec(kind="log2").with_params([0.07], [240])))
    unfused = insert_quant(hg.gm, plan)
    fused = fuse_qdq(unfused)
    targets = [str(n.target) for n in fused.graph.nodes]
    pairs = sum(t.startswith("quantized_decomposed.quantize_per") for t in (str(n.target) for n in unfused.graph.nodes))
    assert pairs > 5 and not any(t.startswith("quantized_decomposed") for t in targets)
    per_channel = sum(spec.granularity == "channel" for _, _, spec in plan.specs())  # weights and the one input
    assert targets.count("hyfx.uniform_fake_quant_per_channel.default") == per_channel > 1
    assert targets.count("hyfx.log2_fake_quant.default") == 1  # single-op quantizers stay as they are
    assert sum(t.startswith("hyfx.uniform_fake_quant") for t in targets) == pairs
    with torch.no_grad():
        for batch in [x, *calib, torch.randn(3, 3, 6, 6) * 50]:  # clamped values too
            assert torch.equal(fused(batch), unfused(batch))
    assert [str(n.target) for n in unfused.graph.nodes].count("quantized_decomposed.quantize_per_tensor.default")
    assert torch.equal(hyfx.quantize(hg, plan)(x), fused(x))  # hyfx.quantize returns the fused form
    from hyfx.hardware import model_bytes

    assert model_bytes(fused) == model_bytes(unfused) < model_bytes(hg.gm) / 2  # weights read at their bits in both


def test_insert_quant_rejects_plans_for_other_models_and_uncalibrated_specs():
    _, _, gm = _captured()
    hg = hyfx.analyze(gm)
    with pytest.raises(hyfx.HyfxError, match="another model"):
        insert_quant(hg.gm, QuantPlan("t", {"stages.9.conv": LayerPolicy(weight=QuantSpec())}))
    with pytest.raises(hyfx.HyfxError, match="has no scale"):
        insert_quant(hg.gm, QuantPlan("t", {"head": LayerPolicy(inputs={0: QuantSpec()})}))
    with pytest.raises(hyfx.HyfxError, match="no constant weight"):
        insert_quant(hg.gm, QuantPlan("t", {"blocks.0.matmul_0": LayerPolicy(weight=QuantSpec())}))


def test_sequential_runs_passes_in_order_and_drops_switched_off_ones():
    from hyfx.passes.manager import sequential

    calls = []

    def first(gm):
        calls.append("first")
        return gm

    def second(gm):
        calls.append("second")
        return gm

    marker = object()
    assert sequential(first, None, second)(marker) is marker
    assert calls == ["first", "second"]
