"""The baselines next to Q-HyViT: twin uniform quantization and PTQ4ViT, EasyQuant's cosine search."""

from __future__ import annotations

import pytest
import torch
from test_qhyvit import TinyHybrid, _Identity
from torch import nn

import hyfx
from hyfx.errors import HyfxError
from hyfx.quant.observers import spec_from_range
from hyfx.quant.quantizers import fake_quant, twin_fake_quant, twin_uniform, uniform_params
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec
from hyfx.recipes.ptq4vit import twin_softmax_candidates
from hyfx.search.candidates import CosineObjective, UniformCandidates, grid, search_side

# --------------------------------------------------------------------------------------------- twin uniform


def test_twin_unsigned_matches_hand_computed_codes():
    """4 bits: 3 bits of magnitude per range (m = 7). Δ1 = 0.01 covers [0, 0.07]; Δ2 = 1/7 covers [0, 1]."""
    x = torch.tensor([0.0, 0.03, 0.074, 0.55, 1.0])
    got = twin_uniform(x, 0.01, 1 / 7, 4, signed=False)
    # 0.074 < 7.5·Δ1 stays in R1 (clamped to 7·Δ1); 0.55 → round(3.85) = 4 steps of Δ2
    assert got.tolist() == pytest.approx([0.0, 0.03, 0.07, 4 / 7, 1.0])


def test_twin_signed_matches_hand_computed_codes():
    """Post-GELU, 4 bits: negatives on R1 = [-8·Δ1, 0] (Δ1 = 0.02), positives on R2 = [0, 7·Δ2] (Δ2 = 0.5)."""
    x = torch.tensor([-0.1, -0.3, 0.0, 1.2, 10.0])
    got = twin_uniform(x, 0.02, 0.5, 4, signed=True)
    assert got.tolist() == pytest.approx([-0.1, -0.16, 0.0, 1.0, 3.5])


def test_twin_spec_validates_round_trips_and_runs_as_a_graph_op(tmp_path):
    with pytest.raises(HyfxError, match="per-tensor"):
        QuantSpec(kind="twin", granularity="channel")
    spec = QuantSpec(bits=8, kind="twin", scheme="asymmetric").with_params([1 / 127 / 64, 1 / 127], [0, 0])
    assert (spec.qmin, spec.qmax, spec.short()) == (0, 127, "twin8")
    assert QuantSpec(bits=8, kind="twin", scheme="symmetric").signed
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    default = spec_from_range(QuantSpec(bits=8, kind="twin", scheme="symmetric"), torch.tensor(-0.2), torch.tensor(3.0))
    assert default.scale == pytest.approx((0.2 / 128, 3.0 / 127))
    # a linear layer fed by a softmax: the plan's twin quantizer becomes one hyfx::twin_fake_quant node
    model = nn.Sequential(nn.Softmax(dim=-1), nn.Linear(16, 4)).eval()
    gm = hyfx.capture(model, torch.randn(2, 16))
    hg = hyfx.analyze(gm)
    plan = QuantPlan("test", layers={"1": LayerPolicy(inputs={0: spec})})
    plan = hyfx.load_plan(hyfx.save_plan(plan, tmp_path / "plan.json"))
    qgm = hyfx.quantize(hg, plan)
    ops = [n for n in qgm.graph.nodes if n.target is torch.ops.hyfx.twin_fake_quant.default]
    assert len(ops) == 1 and ops[0].meta["hyfx"]["kind"] == "quant"
    x = torch.randn(3, 16) * 3
    with torch.no_grad():
        expected = model[1](twin_fake_quant(torch.softmax(x, -1), spec.scale[0], spec.scale[1], 8, False))
        assert torch.allclose(qgm(x), expected, atol=1e-6)


def test_twin_beats_uniform_on_softmax_outputs_at_4_bits():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(64, 64) * 3, dim=-1)
    uni = QuantSpec(bits=4, scheme="asymmetric")
    s, z = uniform_params(torch.tensor(0.0), torch.tensor(1.0), uni)
    uni = fake_quant(probs, uni.with_params([s], [z]))
    twins = twin_softmax_candidates(4)
    errs = [(twins.apply(probs, torch.tensor(i), None, None) - probs).square().sum() for i in range(twins.size)]
    best = int(torch.stack(errs).argmin())
    assert errs[best] < 0.9 * (uni - probs).square().sum()  # same 4 bits: 16 codes, spent where the mass is
    d1, d2 = twins.deltas[best].tolist()
    assert d2 == pytest.approx(1 / 7) and (d2 / d1) in {2.0**k for k in range(20)}  # power-of-two ratio


# --------------------------------------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def tiny_silu():
    torch.manual_seed(1)
    gm = hyfx.capture(TinyHybrid(nn.SiLU).eval(), torch.randn(1, 3, 16, 16))
    return gm, hyfx.analyze(gm), [torch.randn(4, 3, 16, 16) for _ in range(2)]


def test_ptq4vit_puts_twin_quantizers_after_softmax_and_gelu_like_activations(tiny_silu):
    gm, hg, images = tiny_silu
    plan = hyfx.recipes.ptq4vit(hg, images, n=20, samples=64, rounds=2, progress=False)
    twins = plan.meta["twin"]
    assert twins == {"block.transformer.0.attn.matmul_1.input0": "softmax", "block.transformer.0.mlp.fc2.input0": "gelu"}
    softmax_spec = plan.layers["block.transformer.0.attn.matmul_1"].inputs[0]
    assert softmax_spec.kind == "twin" and not softmax_spec.signed
    assert softmax_spec.scale[1] == pytest.approx(1 / 127)
    gelu_spec = plan.layers["block.transformer.0.mlp.fc2"].inputs[0]
    assert gelu_spec.kind == "twin" and gelu_spec.signed
    for layer, role, spec in plan.specs():
        if spec.kind == "uniform":
            assert spec.scheme == "symmetric"
            if role != "weight":
                assert spec.granularity == "tensor"
        if role == "weight":
            expected = "channel" if hg.tags(layer)["kind"] == "conv" else "tensor"
            assert spec.granularity == expected, layer
    assert plan.meta["objective"] == "hessian" and plan.meta["alpha"] == 0.0
    x = images[0]
    with torch.no_grad():
        qgm = hyfx.quantize(hg, plan)
        assert sum(n.target is torch.ops.hyfx.twin_fake_quant.default for n in qgm.graph.nodes) == 2
        assert torch.allclose(qgm(x), gm(x), atol=0.2)


def test_easyquant_searches_symmetric_scales_by_cosine_similarity(tiny_silu):
    _, hg, images = tiny_silu
    plan = hyfx.recipes.easyquant(hg, images, n=20, samples=64, rounds=2, progress=False)
    assert plan.meta["objective"] == "cosine" and (plan.meta["alpha"], plan.meta["beta"]) == (0.5, 1.2)
    for layer, role, spec in plan.specs():
        assert spec.scheme == "symmetric" and spec.kind == "uniform"
        assert spec.granularity == ("channel" if role == "weight" else "tensor"), (layer, role)
    assert set(plan.layers) == set(hg.layers())


def test_cosine_objective_picks_the_brute_force_best_scale():
    torch.manual_seed(0)
    x = torch.randn(256, 6) ** 3  # heavy tails: clipping pays
    problem = _Identity(x)
    side = problem.sides["input0"]
    opt = UniformCandidates(QuantSpec(bits=4, scheme="symmetric"), side.lo, side.hi, grid(0.5, 1.2, 100))
    choice = search_side(problem, "input0", [opt], {}, CosineObjective(), coarse=None)
    cos = [float(torch.nn.functional.cosine_similarity(fake_quant(x, opt.spec_at(torch.tensor(i))).flatten(),
                                                       x.flatten(), dim=0)) for i in range(opt.size)]
    assert choice.spec.scale[0] == pytest.approx(opt.spec_at(torch.tensor(max(range(opt.size), key=cos.__getitem__))).scale[0])
    assert choice.factor < 1.0  # the search clips the tails
