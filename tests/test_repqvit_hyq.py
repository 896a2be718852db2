"""RepQ-ViT and HyQ: the properties that define them (exact reparameterizations, their quantizers), end to end."""

from __future__ import annotations

import pytest
import torch
from test_qhyvit import TinyHybrid
from timm.models.byobnet import LayerFn
from timm.models.mobilevit import MobileVitV2Block
from torch import nn

import hyfx
from hyfx.errors import HyfxError
from hyfx.passes.approximate_softmax import approximate_softmax
from hyfx.passes.reparameterize import norm_channel_dim, reparameterize_norms, scale_input_channels
from hyfx.quant.calibrate import collect
from hyfx.quant.linear_softmax import linear_exp_int, log_int_softmax
from hyfx.quant.observers import spec_from_range
from hyfx.quant.quantizers import dequantize_log_sqrt2, fake_quant, log_sqrt2_codes
from hyfx.quant.spec import QuantPlan, QuantSpec, load_plan, save_plan
from hyfx.recipes.hyq import qads_layers
from hyfx.recipes.repqvit import reparameterizable, reparameterization


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        self.conv_pw = nn.Sequential(nn.Conv2d(c, c * expand, 1, bias=False), nn.BatchNorm2d(c * expand), nn.ReLU6())
        self.conv_dw = nn.Sequential(nn.Conv2d(c * expand, c * expand, 3, 1, 1, groups=c * expand, bias=False),
                                     nn.BatchNorm2d(c * expand), nn.ReLU6())
        self.conv_pwl = nn.Sequential(nn.Conv2d(c * expand, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv_pwl(self.conv_dw(self.conv_pw(x)))


class TinyV2(nn.Module):
    """Stem, an inverted residual, a MobileViTv2 block (GroupNorm, separable attention), linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.ir = InvertedResidual(8)
        self.block = MobileVitV2Block(8, 8, transformer_depth=1, patch_size=2, layers=LayerFn())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.block(self.ir(self.stem(x))).mean((2, 3)))


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and norm affines, so reparameterizations have something to move."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.uniform_(0.2, 3.0)
                m.bias.uniform_(-1.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module", params=["v1", "v2"])
def model(request):
    torch.manual_seed(0)
    net = _randomise_norms(TinyHybrid() if request.param == "v1" else TinyV2())
    gm = hyfx.capture(net, torch.randn(1, 3, 16, 16))
    images = [torch.randn(4, 3, 16, 16) + 0.3 for _ in range(2)]
    return request.param, hyfx.analyze(gm), images


# ------------------------------------------------------------------------------------------------ RepQ-ViT


def test_log_sqrt2_deployable_form_is_the_definition():
    """Shift by ceil(q/2), times √2 for odd codes, equals Δ·2^(−q/2); codes past the range dequantize to 0."""
    x = torch.rand(10_000) ** 4
    codes = log_sqrt2_codes(x, 0.9, 4)
    got = dequantize_log_sqrt2(codes, 0.9, 4)
    inside = codes < 16
    assert inside.any() and (~inside).any()
    assert torch.allclose(got[inside], 0.9 * torch.exp2(-codes[inside] / 2), rtol=1e-6)
    assert (got[~inside] == 0).all()
    assert got.max() <= 0.9 + 1e-7  # values above Δ clamp to code 0
    spec = QuantSpec(bits=4, kind="log_sqrt2", scheme="asymmetric").with_params([0.9], [0])
    assert torch.equal(fake_quant(x, spec), got) and spec.short() == "log_sqrt24"


def test_reparameterization_is_exact_in_float_and_its_per_tensor_quantizer_is_the_per_channel_one(model):
    _, hg, images = model
    norms = reparameterizable(hg)
    assert norms, "the model has norms feeding linears / 1x1 convs"
    act = QuantSpec(bits=8, scheme="asymmetric")
    records, specs = {}, {}
    for norm, consumers in norms.items():
        node = hg.node(norm)
        dim = norm_channel_dim(node)
        x = collect(hg.gm, [node.name], [images[0]], progress=False)[node.name]
        flat = x.transpose(0, dim).reshape(x.shape[dim], -1)
        lo, hi = flat.min(1).values, flat.max(1).values
        record, spec = reparameterization(lo, hi, act)
        records[norm] = {"consumers": consumers, **record}
        specs[norm] = (spec, lo, hi, dim, x)
        assert max(record["ratio"]) / min(record["ratio"]) > 1.5  # channels really differ
    rgm = reparameterize_norms(hg.gm, records)
    for x in images:
        with torch.no_grad():
            assert torch.allclose(rgm(x), hg.gm(x), atol=1e-4, rtol=1e-4)
    # quantizing x̃ per tensor with (s̃, z̃) is quantizing x per channel with (s_c, z_c)
    for norm, (spec, lo, hi, dim, x) in specs.items():
        record = records[norm]
        ratio, shift = torch.tensor(record["ratio"]), torch.tensor(record["shift"])
        shape = [1] * x.dim()
        shape[dim] = -1
        x_tilde = (x + shift.reshape(shape)) / ratio.reshape(shape)
        per_channel = spec_from_range(QuantSpec(bits=8, scheme="asymmetric", granularity="channel",
                                                axis=dim % x.dim()), lo, hi)
        back = fake_quant(x_tilde, spec) * ratio.reshape(shape) - shift.reshape(shape)
        assert torch.allclose(back, fake_quant(x, per_channel), atol=1e-4)


def test_repqvit_plans_apply_through_quantize_and_reload(model, tmp_path):
    kind, hg, images = model
    plan = hyfx.make_plan("repqvit", hg, images, progress=False)
    assert plan.meta["reparameterized"]
    kinds = {spec.kind for _, _, spec in plan.specs()}
    assert ("log_sqrt2" in kinds) == (kind == "v1")  # v2's softmax feeds a reduction, not a matmul
    assert all(s.granularity == "tensor" for _, role, s in plan.specs() if role != "weight")
    qgm = hyfx.quantize(hg.gm, load_plan(save_plan(plan, tmp_path / "p.json")))
    x = images[0]
    with torch.no_grad():
        ref, got = hg.gm(x), qgm(x)
    assert 0 < (got - ref).abs().max() < 0.5 * ref.abs().max()
    # the plan is refused by a graph it was not rewritten for
    with pytest.raises(HyfxError, match="rewrite"):
        hyfx.passes.insert_quant.insert_quant(hg.gm, plan)


def test_repqvit_targets_restrict_it(model):
    kind, hg, images = model
    plan = hyfx.make_plan("repqvit", hg, images, target="openvino", progress=False)
    assert plan.target == "openvino"
    for _, role, spec in plan.specs():
        assert spec.kind == "uniform" and spec.granularity == ("channel" if role == "weight" else "tensor")
        if role == "weight":
            assert spec.scheme == "symmetric"
    trt = hyfx.make_plan("repqvit", hg, images, target="tensorrt", progress=False)
    assert all(set(s.zero_point) == {0} for _, _, s in trt.specs())
    with pytest.raises(HyfxError, match="bit"):
        hyfx.make_plan("repqvit", hg, images, target="ort", w_bits=6, a_bits=6, progress=False)


# ------------------------------------------------------------------------------------------------ HyQ


def test_linear_exp_tracks_exp_and_log_int_softmax_is_powers_of_two():
    torch.manual_seed(0)
    x = torch.randn(8, 64) * 3
    scale = float((x.max() - x.min()) / 255)
    e = linear_exp_int(x, scale)
    approx = e / e.sum(-1, keepdim=True)
    assert (approx - torch.softmax(x.double(), -1)).abs().max() < 0.1  # the linear piece: within a few % of exp
    p = log_int_softmax(x, scale, bits=4)
    nonzero = p[p > 0]
    assert torch.equal(torch.log2(nonzero), torch.round(torch.log2(nonzero)))
    assert nonzero.min() >= 2.0**-15 and p.max() <= 1.0
    assert torch.equal(p.argmax(-1), x.argmax(-1))


def test_qads_scaling_is_exact_in_float_and_picks_the_pointwise_convs():
    torch.manual_seed(0)
    net = _randomise_norms(TinyV2())
    hg = hyfx.analyze(hyfx.capture(net, torch.randn(1, 3, 16, 16)))
    layers = qads_layers(hg)
    assert set(layers) == {"ir.conv_pw.0", "ir.conv_pwl.0"}
    scales = {layer: (torch.rand(hyfx.ops.getattr_path(hg.gm, hyfx.ops.weight_arg(hg.node(layer)).target)
                                 .shape[1]) * 4 + 0.1).tolist() for layer in layers}
    scaled = scale_input_channels(hg.gm, scales)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(scaled(x), hg.gm(x), atol=1e-5)


def test_hyq_plan_learns_alpha_approximates_softmax_and_reloads(tmp_path):
    torch.manual_seed(0)
    net = _randomise_norms(TinyHybrid())
    hg = hyfx.analyze(hyfx.capture(net, torch.randn(1, 3, 16, 16)))
    images = [torch.randn(4, 3, 16, 16) + 0.3 for _ in range(2)]
    plan = hyfx.make_plan("hyq", hg, images, qads_iters=20, progress=False)
    approx = plan.meta["softmax_approximation"]
    assert approx and all(r["bits"] == 4 and r["scale"] > 0 for r in approx.values())
    rewritten = approximate_softmax(hg.gm, approx)
    assert any("linear_softmax" in str(n.target) for n in rewritten.graph.nodes)
    assert not any("softmax" in str(n.target) and "linear" not in str(n.target) for n in rewritten.graph.nodes)
    qgm = hyfx.quantize(hg.gm, load_plan(save_plan(plan, tmp_path / "hyq.json")))
    with torch.no_grad():
        ref, got = hg.gm(images[0]), qgm(images[0])
    assert 0 < (got - ref).abs().max() < ref.abs().max()
    with pytest.raises(HyfxError, match="fake quantization only"):
        hyfx.make_plan("hyq", hg, images, target="openvino", progress=False)


def test_learned_alpha_lowers_the_quantized_conv_error():
    """A 1x1 conv whose input channels differ 100× in range: QADS must beat α = 1 by a margin."""
    from hyfx.recipes.hyq import learn_alpha

    torch.manual_seed(0)
    x = torch.randn(1024, 32) * torch.logspace(-1, 1, 32)
    weight = torch.randn(16, 32, 1, 1) * 0.1
    alpha, base, best = learn_alpha(x, weight, 8, 8, iters=60, lr=0.05)
    assert best < 0.7 * base and alpha.shape == (32,) and (alpha > 0).all()


def test_rewrite_records_are_plan_data():
    plan = QuantPlan(recipe="x", meta={"reparameterized": {"a": {"consumers": ["b"], "ratio": [1.0], "shift": [0.0]}}})
    assert QuantPlan.from_dict(plan.to_dict()).meta == plan.meta
