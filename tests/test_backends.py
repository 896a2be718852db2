"""Backends: TensorRT-rule checks, ONNX QDQ export and its ORT parity, the CPU int8 lowering, torch.compile."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import hyfx
from hyfx import zoo
from hyfx.backends import ort as hort
from hyfx.backends import tensorrt as htrt
from hyfx.backends.onnx_lower import LOG2_MODES, log2_mode_graph
from hyfx.backends.qdq_rules import check_plan, check_qdq
from hyfx.cpu import cpu_info
from hyfx.data import data_config, example_input, make_loader, split
from hyfx.evaluate import logits
from hyfx.ops import is_depthwise
from hyfx.passes.fold_batchnorm import fold_batchnorm, folded_weight_spec
from hyfx.pipelines import ort_cpu
from hyfx.pipelines.ort_cpu_plan import cpu_graph, cpu_plan
from hyfx.quant.quantizers import fake_quant
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec
from hyfx.quant.symmetric import symmetric_plan
from hyfx.quant.targets import cpu_weight_bits


class Tiny(torch.nn.Module):
    """conv-BN-SiLU, conv-BN-ReLU, then a one-head attention over the pixels and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 10)
        for bn in (self.bn1, self.bn2):  # non-trivial statistics, so folding really changes the weights
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        x = torch.nn.functional.silu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return self.head((attn @ v).mean(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    calib = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    gm = hyfx.capture(model, calib[0][:1])
    return model, gm, calib


def _qdq_model(zero_point: int, dtype: int = TensorProto.INT8, weight_scales: int = 4, axis: int = 0,
               weight_zero_points: list[int] | None = None) -> onnx.ModelProto:
    """x → Q → DQ → Conv(DQ(int8 weight)) with the given activation zero point and weight quantization."""
    w = np.ones((4, 3, 1, 1), np.int8)
    wz = np.array(weight_zero_points or [0] * weight_scales, np.int8)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), helper.make_tensor("z", dtype, [], [zero_point]),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(weight_scales, 0.01, np.float32), "ws"),
             numpy_helper.from_array(wz, "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="act/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="act/DequantizeLinear"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="conv/weight/DequantizeLinear",
                              **({"axis": axis} if weight_scales > 1 else {})),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_checker_rejects_nonzero_zero_point_for_tensorrt():
    assert check_qdq(_qdq_model(0), "tensorrt")["weights"] == 1
    with pytest.raises(hyfx.HyfxError, match=r"act/QuantizeLinear.*zero point 3"):
        check_qdq(_qdq_model(3), "tensorrt")
    assert check_qdq(_qdq_model(3), "ort")["activations"] == 1  # ORT runs zero points
    with pytest.raises(hyfx.HyfxError, match="UINT8 quantization is not allowed for tensorrt"):
        check_qdq(_qdq_model(128, TensorProto.UINT8), "tensorrt")
    with pytest.raises(hyfx.HyfxError, match="conv/weight/DequantizeLinear: TensorRT weights must be quantized per output"):
        check_qdq(_qdq_model(0, weight_scales=1), "tensorrt")
    with pytest.raises(hyfx.HyfxError, match="axis 1 is not the output-channel axis 0"):
        check_qdq(_qdq_model(0, weight_scales=3, axis=1), "ort")
    # ORT's QLinearConv takes one weight zero point for all channels (onnxruntime#8890)
    assert check_qdq(_qdq_model(0, weight_zero_points=[2, 2, 2, 2]), "ort")["weights"] == 1
    with pytest.raises(hyfx.HyfxError, match="conv/weight/DequantizeLinear: per-channel weight zero points differ"):
        check_qdq(_qdq_model(0, weight_zero_points=[0, 5, 0, 0]), "ort")


def test_plan_checker_names_the_layer():
    asym = QuantSpec(bits=8, scheme="asymmetric").with_params([0.1], [7])
    plan = QuantPlan("synthetic", {"blocks.0.conv": LayerPolicy(weight=QuantSpec(granularity="channel"), inputs={0: asym})})
    with pytest.raises(hyfx.HyfxError, match=r"blocks\.0\.conv \(input0, a8/te\).*zero point 0"):
        check_plan(plan, "tensorrt")
    check_plan(plan, "ort")
    per_tensor = QuantPlan("synthetic", {"fc": LayerPolicy(weight=QuantSpec(granularity="tensor"))})
    with pytest.raises(hyfx.HyfxError, match="fc .*per output channel"):
        check_plan(per_tensor, "tensorrt")
    asym_channel = QuantPlan("synthetic", {"fc": LayerPolicy(weight=QuantSpec(granularity="channel", scheme="asymmetric"))})
    with pytest.raises(hyfx.HyfxError, match="fc .*per-channel weights only with one zero point"):
        check_plan(asym_channel, "ort")
    four_bit = QuantPlan("synthetic", {"fc": LayerPolicy(weight=QuantSpec(bits=4, granularity="channel"))})
    with pytest.raises(hyfx.HyfxError, match="int8 only, not 4-bit"):
        check_plan(four_bit, "tensorrt")
    symmetric = symmetric_plan(plan)
    check_plan(symmetric, "tensorrt")
    # the symmetric activation covers the asymmetric one's range: [(0 - 7) * 0.1, (255 - 7) * 0.1]
    assert symmetric.layers["blocks.0.conv"].inputs[0].scale[0] == pytest.approx(24.8 / 127)


def test_fold_batchnorm_keeps_outputs(tiny):
    _, gm, calib = tiny
    hg = hyfx.analyze(gm)
    folded, layers = fold_batchnorm(hg.gm)
    assert layers == ["conv1", "conv2"]
    assert not any(n.target is torch.ops.aten.batch_norm.default for n in folded.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(folded(calib[0]), hg.gm(calib[0]), rtol=1e-4, atol=1e-5)


def _searched_weight(weight: torch.Tensor, bits: int, factor: float = 0.8) -> QuantSpec:
    """A symmetric per-channel weight spec as a search calibrates it: factor × the min-max scale."""
    amax = weight.detach().reshape(weight.shape[0], -1).abs().amax(1)
    spec = QuantSpec(bits=bits, granularity="channel", scheme="symmetric", axis=0)
    return spec.with_params((amax * factor / spec.qmax).tolist(), [0] * weight.shape[0])


def test_folded_weight_spec_quantizes_exactly_as_before_folding(tiny):
    model, gm, calib = tiny
    folded, layers = fold_batchnorm(hyfx.analyze(gm).gm)
    factor = folded.meta["hyfx_bn_factors"]["conv1"]
    spec = _searched_weight(model.conv1.weight, 7)
    carried = folded_weight_spec(spec, factor)
    w = model.conv1.weight.detach()
    k = factor.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(fake_quant(w * k, carried), k * fake_quant(w, spec), rtol=1e-5, atol=1e-7)
    per_tensor = QuantSpec(bits=7, scheme="symmetric").with_params([0.01], [0])  # becomes per channel
    assert folded_weight_spec(per_tensor, factor).granularity == "channel"
    assert folded_weight_spec(QuantSpec(scheme="asymmetric").with_params([0.1], [3]), factor) is None
    plan = hyfx.recipes.minmax(gm, calib, w_bits=7, progress=False)
    plan.layers["conv1"] = LayerPolicy(weight=spec, inputs=plan.layers["conv2"].inputs)
    assert "conv1" not in hyfx.export(gm, plan, target="ort").report.reweighted  # the searched scales are kept


class ConvRelu6(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 8, 1)
        self.bn1.running_var.uniform_(0.5, 2.0)
        self.bn1.weight.data.uniform_(-1.5, 1.5)  # negative factors too: the carried scale takes |k|

    def forward(self, x):
        return self.conv2(torch.nn.functional.relu6(self.bn1(self.conv1(x))))


def test_cpu_lowering_keeps_searched_specs_and_still_fuses(monkeypatch):
    """A searched plan lowers as searched: its symmetric weights (through BatchNorm folding), its symmetric
    inputs as uint8 with zero point 128 (what the u8s8 kernels run), and a ReLU6 output range searched past 6
    fitted into [0, 6] so ORT still folds the clamp into QLinearConv (else the conv stays float)."""
    torch.manual_seed(0)
    model = ConvRelu6().eval()
    calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    gm = hyfx.capture(model, calib[0][:1])
    bits = cpu_weight_bits()
    plan = QuantPlan("searched", {
        "conv1": LayerPolicy(weight=_searched_weight(model.conv1.weight, bits),
                             inputs={0: QuantSpec(scheme="symmetric").with_params([0.03], [0])}),
        "conv2": LayerPolicy(weight=_searched_weight(model.conv2.weight, bits, 0.9),
                             inputs={0: QuantSpec(scheme="asymmetric").with_params([1.15 * 6 / 255], [0])})})
    full, hg, _ = cpu_plan(gm, plan, calib)
    assert full.layers["conv1"].inputs[0].zero_point == (128,) and full.layers["conv1"].inputs[0].scale == (0.03,)
    factor = hg.gm.meta["hyfx_bn_factors"]["conv1"]
    assert full.layers["conv1"].weight.scale == pytest.approx((torch.tensor(plan.layers["conv1"].weight.scale)
                                                               * factor.abs()).tolist())
    assert full.layers["conv2"].weight.scale == plan.layers["conv2"].weight.scale  # no BN: as searched
    act = next(p.output for name, p in full.layers.items() if name not in ("conv1", "conv2") and p.output)
    assert act.zero_point == (0,) and 255 * np.float32(act.scale[0]) <= np.float32(6.0)
    assert full.layers["conv2"].inputs[0] == act  # one set of parameters per tensor
    lowered = hyfx.export(hg, full, target="ort")
    fused = [n.op_type for n in onnx.load_from_string(_optimized(lowered.model)).graph.node]
    assert fused.count("QLinearConv") == 2 and "Clip" not in fused and "FusedConv" not in fused, fused
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = lowered.reference(x).numpy()
    got = hort.run(hort.session(lowered.model), x)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_tiny_export_matches_pytorch(tiny, tmp_path):
    _, gm, calib = tiny
    plan = hyfx.recipes.minmax(gm, calib, progress=False)
    result = hyfx.export(gm, plan, tmp_path / "tiny.onnx", target="ort")
    onnx.checker.check_model(onnx.load(str(tmp_path / "tiny.onnx")), full_check=True)
    counts = result.report.counts
    assert counts["weights"] == 4 and counts["QuantizeLinear"] == counts["activations"] == 8  # 4 layer inputs, 2 per matmul
    assert result.report.folded_bn == ["conv1", "conv2"]
    weight_dq = [n for n in result.model.graph.node if n.name.endswith("weight/DequantizeLinear")]
    assert all(next(a.i for a in n.attribute if a.name == "axis") in (0, 1) for n in weight_dq)
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = result.reference(x).numpy()
    # ORT's Q/DQ ops reproduce the PyTorch quantized graph up to an occasional rounding tie (x / s in ONNX,
    # x * (1 / s) in PyTorch) moving one code by one step
    got = hort.run(hort.session(result.model, optimize=False), x)
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
    with pytest.raises(hyfx.HyfxError, match="TensorRT needs symmetric int8"):
        hyfx.export(gm, plan, target="tensorrt")


def test_log2_softmax_lowerings(tiny):
    _, gm, calib = tiny
    plan = hyfx.recipes.efficientquant(gm, calib, progress=False)
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    outputs = {}
    exported = hyfx.export(gm, plan, target="ort")
    for mode in LOG2_MODES:
        result = exported.with_log2_mode(mode)
        assert result.report.log2_layers == 1 and result.report.log2_mode == mode
        ops = {n.op_type for n in result.model.graph.node}
        assert {"exact": {"Log", "Round", "Pow"}, "table": {"Log", "Gather"}, "uniform": {"QuantizeLinear"},
                "fp8": {"QuantizeLinear"}}[mode] <= ops
        got = hort.run(hort.session(result.model, optimize=False), x)
        with torch.no_grad():
            want = log2_mode_graph(result.reference, mode)(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max() + 1e-5)
        outputs[mode] = got
    np.testing.assert_allclose(outputs["exact"], outputs["table"], atol=1e-5 * np.abs(outputs["exact"]).max())
    assert not np.allclose(outputs["exact"], outputs["uniform"])  # the approximation is a different quantizer


def test_compile_backend_matches_quantized_graph(tiny):
    model, gm, calib = tiny
    backend = hyfx.backend("minmax", calib=calib)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = compiled(x)
        want = hyfx.quantize(gm, hyfx.recipes.minmax(gm, calib, progress=False))(x)
        fp32 = model(x)
    assert len(backend.compiled) == 1 and backend.compiled[0].plan.layers
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, fp32)  # it really runs quantized


def test_cpu_int8_lowering_runs_int8_kernels(tiny):
    _, gm, calib = tiny
    plan = hyfx.recipes.minmax(gm, calib, progress=False)
    result = ort_cpu.compile_cpu(gm, plan, calib, thresholds=(0.0, 5.0), runs=3)
    info = result.info
    assert info.weight_bits == (8 if cpu_info().vnni else 7)
    assert [t["threshold"] for t in info.tuning] == [0.0, 5.0] and info.threshold in (0.0, 5.0)
    if info.threshold == 0.0:
        assert set(info.int8_layers) == set(plan.layers) and "act.sigmoid" in " ".join(info.int8_ops)
    full = cpu_plan(gm, plan, calib)[0]  # every layer int8: the SiLU runs as QLinearSigmoid + QLinearMul
    assert any(layer.endswith(".sigmoid") for layer in full.layers)
    lowered = hyfx.export(cpu_graph(gm), full, target="ort")
    weights = [numpy_helper.to_array(t) for t in lowered.model.graph.initializer if "_quantized" in t.name]
    signed = [w for w in weights if w.dtype == np.int8]
    assert len(weights) == 4 and max(int(np.abs(w.astype(np.int32)).max()) for w in signed) == 2 ** (info.weight_bits - 1) - 1
    # the transformer layers keep 8-bit weights: uint8 around zero point 128 (u8u8 kernels) where GEMMs need 7 bits
    exact = cpu_graph(gm).exact_weight_layers()
    assert set(exact) == {"conv2", "qkv"}  # the bridge conv and the attention projection
    assert full.meta["ort"]["uint8_weights"] == (sorted(exact) if info.weight_bits < 8 else [])
    unsigned = [w for w in weights if w.dtype == np.uint8]
    assert len(unsigned) == len(full.meta["ort"]["uint8_weights"])
    assert all(int(np.abs(w.astype(np.int32) - 128).max()) == 127 for w in unsigned)
    fused = {n.op_type for n in onnx.load_from_string(_optimized(lowered.model)).graph.node}
    assert {"QLinearConv", "QLinearSigmoid", "QLinearMul"} <= fused
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    got = hort.run(hort.session(lowered.model), x)
    with torch.no_grad():
        want = lowered.reference(x).numpy()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.75 and np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_compile_cpu_prefers_more_int8_layers_among_equally_fast_models():
    timings = {0.0: [1.02, 1.03, 1.01], 0.95: [1.00, 1.00, 1.01], 1.2: [0.90, 2.0, 0.91]}
    assert ort_cpu.fastest_with_most_int8(timings, {0.0: 50, 0.95: 7, 1.2: 3}) == 1.2  # 10% faster: it wins
    del timings[1.2]
    assert ort_cpu.fastest_with_most_int8(timings, {0.0: 50, 0.95: 7}) == 0.0  # 2% is a tie: the smaller model
    assert ort_cpu.fastest_with_most_int8(timings, {0.0: 50, 0.95: 7}, tie=0.01) == 0.95


@pytest.mark.skipif(not htrt.available(), reason=f"TensorRT not run: {htrt.unavailable_reason()}")
def test_tensorrt_engine_builds_and_times(tiny):
    _, gm, calib = tiny
    plan = symmetric_plan(hyfx.recipes.minmax(gm, calib, progress=False))
    result = hyfx.export(gm, plan, target="tensorrt")
    reports = htrt.benchmark(result.model, batches=(1, 4), runs=20)
    assert [r.batch for r in reports] == [1, 4] and all(r.median_ms > 0 and r.engine_bytes > 0 for r in reports)


@pytest.fixture(scope="module")
def lite0(sample_images):
    model = zoo.create("lite0-real")
    config = data_config(model)
    calib, evaluation = split(sample_images, 16, 100, seed=0)
    gm = hyfx.capture(model, example_input(config))
    return gm, make_loader(calib, config, 16), list(make_loader(evaluation, config, 50))


def test_ort_parity_on_real_images(lite0):
    """The exported lite0-real agrees with the PyTorch quantized graph in ORT, as Q/DQ ops and as int8 kernels.

    7-bit weights: this CPU has no VNNI, where ORT's u8s8 kernels saturate 16-bit pair sums for 8-bit weights
    (hyfx.pipelines.ort_cpu docstring). The int8 kernels' integer arithmetic rounds differently from float
    fake quantization, which moves a few near-tied predictions; the Q/DQ-op run shows the lowering is exact.
    """
    gm, calib, evaluation = lite0
    plan = hyfx.recipes.minmax(gm, calib, w_bits=7, a_bits=8, progress=False)
    result = hyfx.export(gm, plan, target="ort")
    reference = logits(result.reference, evaluation)
    exact = hort.parity(hort.session(result.model, optimize=False), reference, evaluation)
    kernels = hort.parity(hort.session(result.model), reference, evaluation)
    print("Q/DQ ops:", exact.summary(), "| int8 kernels:", kernels.summary())
    assert exact.n == kernels.n == 100 and exact.agreement >= 99.0 and exact.max_abs_diff < 1.0
    assert 75 <= exact.top1_torch <= 95  # real weights: a working 8-bit model
    weights = sum(p.numel() for p in gm.parameters())
    assert result.report.model_bytes < 4 * weights / 3  # int8 weights (FP32: 4 bytes each), plus scales and graph
    assert kernels.agreement >= 95.0
    fused = {n.op_type for n in onnx.load_from_string(_optimized(result.model)).graph.node}
    assert "QLinearConv" in fused  # the Q/DQ really became int8 kernels


def _optimized(model: onnx.ModelProto) -> bytes:
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = f"{tmp}/opt.onnx"
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return open(f"{tmp}/opt.onnx", "rb").read()


def test_cli_export_tensorrt(capsys, tmp_path, sample_images):
    from hyfx import cli

    plan = tmp_path / "plan.json"
    assert cli.main(["quantize", "test_vit", "--recipe", "minmax", "--calib", str(sample_images.root), "--n-calib", "4",
                     "--out", str(plan)]) == 0
    capsys.readouterr()
    code = cli.main(["export", "test_vit", "--plan", str(plan), "--target", "tensorrt", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "TensorRT needs symmetric int8" in err and "input0" in err
    out, report = tmp_path / "m.onnx", tmp_path / "export.json"
    assert cli.main(["export", "test_vit", "--plan", str(plan), "--target", "tensorrt", "--symmetric", "--out", str(out),
                     "--check", str(sample_images.root), "--n-check", "20", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "target tensorrt" in text and "top-1 agreement" in text
    data = json.loads(report.read_text())
    # random-weight test_vit: logits within ±0.6, top-2 gaps ~0.01, so top-1 agreement is a coin flip here (the
    # real-weight parity test checks agreement); a wrong scale or layout moves logits by their whole range
    assert data["target"] == "tensorrt" and data["parity"]["n"] == 20 and data["parity"]["max_abs_diff"] < 0.3
    check_qdq(onnx.load(str(out)), "tensorrt")


def test_cli_cpu_int8_fast_weights_drops_the_exact_8_bit_layers(capsys, tmp_path, sample_images, monkeypatch):
    from hyfx import cli

    plan = tmp_path / "plan.json"
    assert cli.main(["quantize", "test_vit", "--recipe", "minmax", "--calib", str(sample_images.root), "--n-calib", "4",
                     "--out", str(plan)]) == 0
    seen = []

    def fake_compile_cpu(*args, **kwargs):
        seen.append(kwargs.get("exact_weights", "missing"))
        raise hyfx.HyfxError("stopped before lowering")

    monkeypatch.setattr(ort_cpu, "compile_cpu", fake_compile_cpu)
    for extra in ([], ["--fast-weights"]):
        assert cli.main(["export", "test_vit", "--plan", str(plan), "--cpu-int8", "--calib", str(sample_images.root),
                         "--out", str(tmp_path / "m.onnx"), *extra]) == 2
    assert seen == [None, []]  # default: transformer / bridge layers 8-bit; --fast-weights: none


def _int8_conv_error(groups: int, channels: int, kernel: int, out_scale: float, uint8_weights: bool = False) -> float:
    """Max |ORT int8 kernel − exact| for a conv with all-127 weights on uint8 inputs ≥ 200 (worst case for
    16-bit pair sums), through QLinearConv (fused) against the unfused Q/DQ graph."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = np.full((channels, channels // groups, kernel, kernel), 127, np.int8)
    x = rng.integers(200, 256, size=(1, channels, 6, 6)).astype(np.uint8)
    weight = numpy_helper.from_array((w.astype(np.int32) + 128).astype(np.uint8) if uint8_weights else w, "w")
    zero = np.full(channels, 128, np.uint8) if uint8_weights else np.zeros(channels, np.int8)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             weight, numpy_helper.from_array(np.ones(channels, np.float32), "ws"), numpy_helper.from_array(zero, "wz"),
             numpy_helper.from_array(np.array(out_scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], group=groups, pads=[kernel // 2] * 4),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString()
    assert "QLinearConv" in {n.op_type for n in onnx.load_from_string(_optimized(onnx.load_from_string(model))).graph.node}
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = ort.InferenceSession(model, plain, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(np.abs(fused - exact).max())


def test_cpu_weight_bits_match_what_the_int8_kernels_run_exactly():
    """The premises of cpu_weight_bits / exact_weight_layers, checked on this machine's ORT: depthwise convs
    and uint8 (u8u8) weights are exact with 8-bit weights; a 1x1 conv's u8s8 GEMM saturates without VNNI."""
    assert _int8_conv_error(groups=8, channels=8, kernel=3, out_scale=1200) == 0  # depthwise: 32-bit sums
    assert _int8_conv_error(groups=1, channels=4, kernel=1, out_scale=600, uint8_weights=True) == 0
    if not cpu_info().vnni:
        assert _int8_conv_error(groups=1, channels=4, kernel=1, out_scale=600) > 600  # VPMADDUBSW saturates
    assert cpu_weight_bits(depthwise=True) == 8
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)).eval()
    gm = hyfx.capture(model, torch.randn(1, 3, 8, 8))
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert [is_depthwise(n, gm) for n in convs] == [False, True, False]
