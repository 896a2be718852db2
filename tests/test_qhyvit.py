"""Q-HyViT: the Hessian-guided objective, the granularity / scheme choice, targets, bridge blocks, end to end."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from timm.models.byobnet import LayerFn
from timm.models.mobilevit import MobileVitBlock
from torch import nn

import hyfx
from hyfx import zoo
from hyfx.errors import HyfxError
from hyfx.ops import is_depthwise
from hyfx.quant.quantizers import fake_quant
from hyfx.quant.spec import QuantSpec
from hyfx.quant.targets import check_plan_target, cpu_weight_bits, get_target
from hyfx.search.candidates import HessianObjective, UniformCandidates, grid, search_side
from hyfx.search.layerwise import _kind
from hyfx.search.problems import Chain, ChainProblem, ConvLinearProblem, RowsProblem, Side, chain_nodes, uniform_spec
from hyfx.search.sampling import Request, sample_layers

# --------------------------------------------------------------------------------------------- the objective


def test_objective_equals_hand_computed_value_on_a_tiny_layer():
    """One linear layer as the whole classifier, 2-bit symmetric per-tensor weights, one image.

    W = [[0.5, -1], [0.25, 1]], x = [2, 1]: logits z = [0, 1.5], top-1 = class 1, so the task-loss gradient is
    g = softmax(z) - e_1 = [p0, -p0] with p0 = 1 / (1 + e^1.5). Quantized (scale 1, codes -1..1, round half
    to even): Wq = [[0, -1], [0, 1]], ΔO = (Wq - W)·x = [-1, -0.5]. Objective Σ g²·ΔO² = p0²·(1 + 0.25).
    """
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0], [0.25, 1.0]]))
    gm = hyfx.capture(nn.Sequential(layer).eval(), torch.randn(1, 2))
    hg = hyfx.analyze(gm)
    x = torch.tensor([[2.0, 1.0]])
    samples = sample_layers(hg.gm, [Request("0", hg.node("0"), "linear")], [x], damping=0.0, progress=False)["0"]
    problem = ConvLinearProblem("0", hg.node("0"), hg.gm, samples)
    p0 = 1 / (1 + math.exp(1.5))
    assert samples.g2[0].tolist() == pytest.approx([p0**2, p0**2], rel=1e-5)
    weight = problem.sides["weight"]
    candidates = UniformCandidates(QuantSpec(bits=2, scheme="symmetric"), weight.lo, weight.hi, torch.tensor([1.0]))
    wq = candidates.quantize(weight.data, torch.tensor([0]), 0, None)
    assert wq[0].tolist() == [[0.0, -1.0], [0.0, 1.0]]
    y = problem.evaluate("weight", wq, {"input0": problem.sides["input0"].data})
    objective = HessianObjective().partial(y, problem.target, problem.g2).sum()
    assert float(objective) == pytest.approx(p0**2 * (1.0 + 0.25), rel=1e-5)


# --------------------------------------------------------------------------------------------- option choice


@dataclass
class _Identity:
    """A layer that outputs its input: the objective is the (weighted) quantization error of the activation."""

    x: torch.Tensor  # (P, C)
    halves: tuple | None = None

    def __post_init__(self):
        lo, hi = self.x.amin(0), self.x.amax(0)
        self.sides = {"input0": Side(self.x, 1, None, lo, hi, 1, self.halves)}
        self.target = self.x
        self.g2 = None

    def evaluate(self, side, q, fixed):
        return q


def _options(side: Side, bits: int = 8) -> list[UniformCandidates]:
    factors = grid(0.01, 1.2, 100)
    return [UniformCandidates(uniform_spec(bits, g, s, 1), side.lo, side.hi, factors)
            for g in ("tensor", "channel") for s in ("symmetric", "asymmetric")]


def _brute_force(x: torch.Tensor, options: list[UniformCandidates]) -> tuple[str, str]:
    """The best (granularity, scheme) by scoring every candidate with the library's plain fake_quant."""
    best = None
    for opt in options:
        for i in range(opt.size):
            spec = opt.spec_at(torch.tensor(i))
            err = float((fake_quant(x, spec) - x).square().sum())
            if best is None or err < best[0]:
                best = (err, spec.granularity, spec.scheme)
    return best[1], best[2]


def _choose(x: torch.Tensor, halves=None, bits: int = 8):
    problem = _Identity(x, halves)
    options = _options(problem.sides["input0"], bits)
    choice = search_side(problem, "input0", options, {}, HessianObjective(), coarse=None)
    return choice, options


def test_channel_granularity_wins_when_channel_ranges_differ():
    torch.manual_seed(0)
    x = torch.randn(512, 8) * torch.logspace(-2, 1, 8)  # zero-mean channels, ranges 1000x apart
    choice, options = _choose(x)
    assert choice.spec.granularity == "channel"
    assert (choice.spec.granularity, choice.spec.scheme) == _brute_force(x, options)


def test_asymmetric_per_tensor_wins_on_one_sided_identical_channels():
    torch.manual_seed(0)
    x = torch.rand(512, 1).expand(512, 4).contiguous() * 6  # post-ReLU6-like, every channel the same range
    choice, options = _choose(x)
    assert (choice.spec.granularity, choice.spec.scheme) == ("tensor", "asymmetric")  # per-channel only ties
    assert (choice.spec.granularity, choice.spec.scheme) == _brute_force(x, options)


def test_zero_point_overflow_case_c2_keeps_zero_points_in_range():
    """Q-HyViT C2: all-positive, narrow channels (a bridge block's activations). A classic asymmetric per-channel
    quantizer (zero point = -min/scale) needs zero points far outside int8/uint8; hyfx keeps zero representable,
    so the searched choice is valid, zero stays exact, and it is the brute-force best."""
    torch.manual_seed(0)
    offsets = torch.tensor([0.5, 2.0, 8.0, 30.0])
    x = offsets + torch.rand(512, 4) * 0.1 * offsets
    lo, hi = x.amin(0), x.amax(0)
    naive_zero_point = -lo / ((hi - lo) / 255)
    assert bool((naive_zero_point < -128).all())  # would overflow any 8-bit zero point
    choice, options = _choose(x)
    spec = choice.spec
    assert spec.granularity == "channel"  # ranges 60x apart
    assert (spec.granularity, spec.scheme) == _brute_force(x, options)
    assert all(spec.qmin <= z <= spec.qmax for z in spec.zero_point)
    assert fake_quant(torch.zeros(1, 4), spec).abs().max() == 0


def test_cross_validation_rejects_per_channel_ranges_that_do_not_generalise():
    """Channel 0 fires only in the second half of the calibration batches: per-channel ranges from the first
    half would clip it there. In-sample (ranges from all data) per channel wins, for the small channels 1-2;
    cross-validated over the two halves, per tensor wins."""
    torch.manual_seed(0)
    x = torch.rand(512, 4) * torch.tensor([0.05, 0.05, 0.05, 4.0])
    x[256:, 0] = torch.rand(256) * 4
    in_sample, _ = _choose(x)
    assert in_sample.spec.granularity == "channel"
    halves = ((x[:256].amin(0), x[:256].amax(0)), (x[256:].amin(0), x[256:].amax(0)))
    validated, _ = _choose(x, halves)
    assert validated.spec.granularity == "tensor"


def test_depthwise_activation_is_scored_on_a_subset_of_groups(monkeypatch):
    """A depthwise conv's activation objective is a sum over channels, so it is scored on a random subset of
    them; the chosen spec still covers every channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 5, padding=2, groups=16)).eval()
    gm = hyfx.capture(model, torch.randn(1, 16, 12, 12))
    hg = hyfx.analyze(gm)
    images = [torch.randn(4, 16, 12, 12) * torch.logspace(-1, 1, 16)[:, None, None] for _ in range(2)]
    data = sample_layers(hg.gm, [Request("0", hg.node("0"), "conv")], images, samples=64, hessian=False,
                         progress=False)
    problem = ConvLinearProblem("0", hg.node("0"), hg.gm, data["0"])
    monkeypatch.setattr("hyfx.search.problems.GROUP_SUBSET_ELEMENTS", 64 * 25 * 4)
    view = problem.view("input0")
    assert view.groups == 4 and view.sides["input0"].data.shape == (64, 4 * 25)
    assert problem.view("weight") is problem
    weight = problem.sides["weight"].data
    y = view.evaluate("input0", view.sides["input0"].data[None], {"weight": weight})
    assert torch.allclose(y[0], view.target, atol=1e-4)  # FP32 candidate: zero error on the kept channels
    options = _options(problem.sides["input0"])
    choice = search_side(problem, "input0", options, {"weight": weight}, HessianObjective())
    assert choice.value.shape == problem.sides["input0"].data.shape
    if choice.spec.granularity == "channel":
        assert len(choice.spec.scale) == 16


# --------------------------------------------------------------------------------------------- tiny hybrid


class TinyHybrid(nn.Module):
    """Conv stem, one MobileViT block (bridge: conv_kxk → conv_1x1 → transformer), linear head."""

    def __init__(self, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), act())
        self.block = MobileVitBlock(8, 8, transformer_dim=16, transformer_depth=1, patch_size=2, num_heads=2,
                                    layers=LayerFn(act=act))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


SMALL = {"n": 20, "samples": 64, "progress": False}  # a coarse grid: these tests check mechanics, not accuracy


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyHybrid().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    gm = hyfx.capture(model, torch.randn(1, 3, 16, 16))
    images = [torch.randn(4, 3, 16, 16) + 0.3 for _ in range(2)]
    hg = hyfx.analyze(gm)
    plans = {target: hyfx.recipes.qhyvit(hg, images, target=target, full=True, **SMALL)
             for target in ("fake", "ort", "tensorrt", "openvino")}
    return gm, hg, images, plans


def test_tensorrt_target_never_emits_a_zero_point(tiny):
    gm, hg, images, plans = tiny
    plan = plans["tensorrt"]
    assert plan.target == "tensorrt"
    specs = list(plan.specs())
    assert len(specs) > 20
    for layer, role, spec in specs:
        assert spec.scheme == "symmetric" and set(spec.zero_point) == {0}, (layer, role, spec)
        if role != "weight":
            assert spec.granularity == "tensor"
    check_plan_target(plan, "tensorrt")
    x = images[0]
    with torch.no_grad():
        assert torch.allclose(hyfx.quantize(hg, plan)(x), gm(x), atol=0.2)
    with pytest.raises(HyfxError, match="int8 only"):
        hyfx.recipes.qhyvit(hg, images, w_bits=6, a_bits=6, target="tensorrt", progress=False)


def test_openvino_target_searches_symmetric_weights_and_per_tensor_activations_and_lowers(tiny):
    gm, hg, images, plans = tiny
    plan = plans["openvino"]
    specs = list(plan.specs())
    assert plan.target == "openvino" and len(specs) > 20
    for layer, role, spec in specs:
        if role == "weight":
            assert spec.scheme == "symmetric" and set(spec.zero_point) == {0}, (layer, spec)
        elif spec.kind == "uniform":
            assert spec.granularity == "tensor", (layer, role, spec)
    acts = [s for _, role, s in specs if role != "weight" and s.kind == "uniform"]
    assert any(s.scheme == "asymmetric" for s in acts)  # u8 activations with a zero point stay in the space
    # a MatMul of two activations runs int8 in OpenVINO only without zero points (else a float Subtract and a
    # float attention): the search keeps them zero-point free there, and would not otherwise
    def matmul_zero_points(p):
        return [zp for layer, policy in p.layers.items() if policy.weight is None and 1 in policy.inputs
                for spec in policy.inputs.values() for zp in spec.zero_point]

    assert matmul_zero_points(plan) and set(matmul_zero_points(plan)) == {0}
    assert set(matmul_zero_points(plans["fake"])) != {0}
    with pytest.raises(HyfxError, match="openvino cannot run"):
        check_plan_target(plans["fake"], "openvino")
    from hyfx.backends import openvino

    lowered = hyfx.export(hg, plan, target="openvino")
    got = torch.from_numpy(openvino.run(openvino.compile_model(lowered.model, "f32"), images[0]))
    with torch.no_grad():
        want = lowered.reference(images[0])
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_ort_target_uses_asymmetric_per_tensor_activations_and_fake_uses_everything(tiny):
    _, hg, images, plans = tiny
    acts = [spec for _, role, spec in plans["ort"].specs() if role != "weight"]
    assert all(s.granularity == "tensor" for s in acts)
    assert any(s.scheme == "asymmetric" and s.zero_point[0] > 0 for s in acts)  # uint8 with a zero point
    check_plan_target(plans["ort"], "ort")
    with pytest.raises(HyfxError, match="tensorrt cannot run"):
        check_plan_target(plans["ort"], "tensorrt")
    # weights in the format ORT's CPU kernels run here: symmetric (QLinearConv takes one weight zero point),
    # at the bits they run exactly (7 without VNNI), so the int8 lowering keeps the searched scales
    weights = {layer: spec for layer, role, spec in plans["ort"].specs() if role == "weight"}
    exact = set(hg.exact_weight_layers())  # the lowering keeps these 8-bit (u8u8 kernels without VNNI)
    assert exact and set(weights) - exact
    eight = exact | {layer for layer in weights if is_depthwise(hg.node(layer), hg.gm)}  # depthwise: 32-bit sums
    wrong = {layer: s.short() for layer, s in weights.items()
             if not (s.scheme == "symmetric" and s.calibrated and s.bits == (8 if layer in eight else cpu_weight_bits()))}
    assert not wrong
    assert plans["ort"].meta["searched_weight_bits"] == {"gemm": cpu_weight_bits(), "depthwise and exact": 8}
    fake = plans["fake"]
    assert fake.meta["space"]["input"] == {"granularity": ["tensor", "channel"], "scheme": ["symmetric", "asymmetric"]}
    assert {s.scheme for _, _, s in fake.specs()} == {"symmetric", "asymmetric"}


def test_ort_rules_take_narrower_weights_but_no_per_channel_zero_points():
    rules = get_target("ort")
    seven = QuantSpec(bits=7, granularity="channel", scheme="symmetric")
    assert rules.violation(seven, "weight") is None
    assert "runs int8 only" in rules.violation(QuantSpec(bits=7, scheme="asymmetric"), "input0")
    assert "per-channel asymmetric weight" in rules.violation(QuantSpec(granularity="channel", scheme="asymmetric"),
                                                               "weight")
    assert rules.violation(QuantSpec(granularity="tensor", scheme="asymmetric"), "weight") is None
    assert "runs int8 only" in get_target("tensorrt").violation(seven, "weight")


def test_bridge_layers_are_scored_at_the_bridge_block_output(tiny):
    gm, hg, images, plans = tiny
    bridge = hg.bridges[0]
    first, last = (hg.node(layer) for layer in bridge.layers)
    nodes = chain_nodes(first, last)
    assert nodes is not None and nodes[0] is first and nodes[-1] is last
    requests = [Request(bridge.layers[0], first, "conv"),
                Request(bridge.layers[0], first, "conv", objective=last, key="block")]
    data = sample_layers(hg.gm, requests, images, samples=64, progress=False)
    base = ConvLinearProblem(bridge.layers[0], first, hg.gm, data[bridge.layers[0]], x=data["block"].inputs[0])
    problem = ChainProblem(base, Chain(hg.gm, nodes), first, last, data["block"])
    fp = {"input0": base.sides["input0"].data}
    y = problem.evaluate("weight", base.sides["weight"].data[None], fp)
    assert y.shape[-1] == problem.target.shape[-1] == 16  # the transformer width, not the conv's 8
    assert torch.allclose(y[0], problem.target, atol=1e-4)  # FP32 candidates reproduce the block output
    assert plans["fake"].meta["bridge_objective"] == sorted(bridge.layers)
    no_bridge = hyfx.recipes.qhyvit(hg, images, bridge=False, rounds=1, **SMALL)
    assert no_bridge.meta["bridge_objective"] == []


def test_full_quantization_adds_norm_and_softmax_inputs(tiny, tmp_path):
    _, hg, images, plans = tiny
    plan = plans["fake"]
    kinds = {hg.tags(layer)["sub"] for layer in plan.layers}
    assert {"softmax", "layer_norm", "batch_norm"} <= kinds
    norms = [layer for layer in plan.layers if hg.tags(layer)["kind"] in ("norm", "softmax")]
    assert all(set(plan.layers[layer].inputs) == {0} for layer in norms)
    partial = hyfx.recipes.qhyvit(hg, images, rounds=1, **SMALL)
    assert partial.layers and not any(hg.tags(layer)["kind"] in ("norm", "softmax") for layer in partial.layers)
    again = hyfx.load_plan(hyfx.save_plan(plan, tmp_path / "plan.json"))
    assert again.to_json() == plan.to_json()
    x = images[0]
    with torch.no_grad():
        assert torch.equal(hyfx.quantize(hg, again)(x), hyfx.quantize(hg, plan)(x))


class _BnInplaceAct(nn.Module):
    """conv → BN → in-place ReLU6, as timm's BatchNormAct2d captures (hardtanh_ on the norm's output)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6(inplace=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))).mean((2, 3)))


def test_norm_rows_are_recorded_before_an_inplace_activation():
    torch.manual_seed(0)
    model = _BnInplaceAct().eval()
    with torch.no_grad():
        model.bn.weight.mul_(20.0)  # BN outputs well outside ReLU6's [0, 6]
    gm = hyfx.capture(model, torch.randn(1, 3, 8, 8))
    hg = hyfx.analyze(gm)
    assert any(str(n.target) == "aten.hardtanh_.default" for n in gm.graph.nodes)
    bn = next(layer for layer in hg.layers(("norm",)))
    images = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    data = sample_layers(hg.gm, [Request(bn, hg.node(bn), "rows")], images, samples=64, progress=False)
    problem = RowsProblem(bn, hg.node(bn), hg.gm, data[bn])
    target = problem.target
    assert target.min() < 0 and target.max() > 6  # the norm's own output, not the clamped activation
    x = problem.sides["input0"].data
    assert torch.allclose(problem.evaluate("input0", x[None], {})[0], target, atol=1e-4)
    with torch.no_grad():  # the forward pass itself is unchanged by recording
        assert torch.allclose(hg.gm(images[0]), model(images[0]), atol=1e-5)


def test_minmax_full_quantization_baseline(tiny):
    _, hg, images, _ = tiny
    full = hyfx.recipes.minmax(hg, images, full=True, progress=False)
    partial = hyfx.recipes.minmax(hg, images, progress=False)
    extra = set(full.layers) - set(partial.layers)
    assert extra and {hg.tags(layer)["kind"] for layer in extra} == {"norm", "softmax"}
    assert all(full.layers[layer].inputs[0].calibrated for layer in extra)
    x = images[0]
    with torch.no_grad():  # quantizing the norm / softmax inputs changes the output
        assert not torch.equal(hyfx.quantize(hg, full)(x), hyfx.quantize(hg, partial)(x))


def test_low_bit_widths_build_a_plan(tiny):
    _, hg, images, _ = tiny
    plan = hyfx.recipes.qhyvit(hg, images, w_bits=3, a_bits=2, rounds=1, **SMALL)
    assert {spec.bits for _, role, spec in plan.specs() if role == "weight"} == {3}
    assert {spec.bits for _, role, spec in plan.specs() if role != "weight"} == {2}
    for _, role, spec in plan.specs():
        if role != "weight" and spec.granularity == "tensor":
            assert len(set(fake_quant(torch.linspace(-3, 3, 999), spec).tolist())) <= 4


def test_edge_layers_are_the_stem_and_the_head_and_edge_bits_keep_them_wider(tiny):
    gm, hg, images, _ = tiny
    assert hg.edge_layers() == ["stem.0", "head"]  # not the transformer's layers, whose reshapes read the batch size
    plan = hyfx.recipes.qhyvit(hg, images, w_bits=4, a_bits=4, edge_bits=8, rounds=1, **SMALL)
    assert plan.meta["edge_layers"] == ["head", "stem.0"] and plan.meta["edge_bits"] == 8
    for layer, role, spec in plan.specs():
        assert spec.bits == (8 if layer in ("stem.0", "head") else 4), (layer, role, spec)
    with pytest.raises(HyfxError, match="int8 only"):
        hyfx.recipes.qhyvit(hg, images, edge_bits=6, target="tensorrt", progress=False)


def test_cli_refuses_edge_bits_for_a_recipe_without_them(capsys, tmp_path):
    from hyfx import cli

    code = cli.main(["quantize", "lite0-real", "--recipe", "minmax", "--edge-bits", "8", "--calib", str(tmp_path)])
    assert code == 2 and "--edge-bits is an option of the qhyvit recipe, not of minmax" in capsys.readouterr().err
    code = cli.main(["quantize", "lite0-real", "--recipe", "qhyvit", "--edge-bits", "9", "--calib", str(tmp_path)])
    assert code == 2 and "unsupported bit-width 9" in capsys.readouterr().err


def test_requests_cover_every_quantizable_kind(tiny):
    hg = tiny[1]
    kinds = {_kind(hg, layer) for layer in hg.layers(("conv", "linear", "matmul", "norm", "softmax"))}
    assert kinds == {"conv", "linear", "matmul", "rows"}


# --------------------------------------------------------------------------------------------- end to end

N_CALIB, N_EVAL = 32, 200


def _real_model() -> str:
    """The real-weight hybrid when its checkpoint exists, else the real-weight CNN."""
    return "lite0-vit-real" if zoo.HYBRID_CHECKPOINT.is_file() else "lite0-real"


@pytest.mark.slow
def test_qhyvit_agrees_with_fp32_better_than_minmax_on_real_weights(sample_images):
    from hyfx.data import data_config, example_input, make_loader, split
    from hyfx.evaluate import compare

    name = _real_model()
    model = zoo.create(name)
    config = data_config(model)
    pool = sample_images.without(zoo.training_images(name))
    calib, evaluation = split(pool, N_CALIB, N_EVAL, seed=0)
    gm = hyfx.capture(model, example_input(config))
    hg = hyfx.analyze(gm)
    loader = make_loader(calib, config, 16)
    qgms = {}
    for bits in (8, 6):
        plan = hyfx.recipes.qhyvit(hg, loader, w_bits=bits, a_bits=bits, samples=128, rounds=2, progress=False)
        qgms[f"qhyvit{bits}"] = hyfx.quantize(hg, plan)
        qgms[f"minmax{bits}"] = hyfx.quantize(hg, hyfx.recipes.minmax(hg, loader, w_bits=bits, a_bits=bits,
                                                                      progress=False))
    results = compare(gm, qgms, make_loader(evaluation, config, 50), progress=False)
    print(name, {k: (round(v.top1, 1), v.agreement) for k, v in results.items()})
    for bits in (8, 6):
        assert results[f"qhyvit{bits}"].agreement > results[f"minmax{bits}"].agreement, (bits, results)
