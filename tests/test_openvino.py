"""OpenVINO lowering: IR that OpenVINO loads, int8 kernels it really runs, numerics equal to PyTorch fake quant."""

from __future__ import annotations

import json
import re

import pytest
import torch

import hyfx
from hyfx import cli
from hyfx.backends import openvino
from hyfx.quant.quantizers import calibrate_weight


@pytest.fixture(scope="module")
def lowered(conv_head, tmp_path_factory):
    _, hg, calib = conv_head
    plan = hyfx.recipes.minmax(hg, calib, progress=False)
    path = tmp_path_factory.mktemp("ov") / "model.xml"
    return hg, calib, plan, hyfx.export(hg, plan, path, target="openvino"), path


def test_ir_loads_and_runs_int8_convs_and_linears(lowered):
    _, calib, _, result, path = lowered
    assert path.is_file() and path.with_suffix(".bin").is_file()
    compiled = openvino.compile_model(openvino.core().read_model(str(path)), "f32")
    precisions = openvino.runtime_precisions(compiled)
    assert set(precisions) >= {"Convolution", "FullyConnected"}, precisions
    assert openvino.int8_fraction(precisions) == 1.0, precisions  # every conv / linear in an int8 kernel
    assert openvino.inference_precision(compiled) == "f32"


@pytest.mark.parametrize("precision", openvino.PRECISIONS)
def test_openvino_matches_the_pytorch_quantized_graph(lowered, precision):
    _, calib, _, result, _ = lowered
    compiled = openvino.compile_model(result.model, precision)
    loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib]
    parity = openvino.parity(compiled, result.reference, loader)
    assert parity.runtime.startswith("OpenVINO") and parity.n == sum(len(x) for x in calib)
    with torch.no_grad():
        scale = max(float(result.reference(x).abs().max()) for x in calib)
    # int8 kernels accumulate exactly; what differs is float rounding of the dequantized output (bf16 where default)
    assert parity.max_abs_diff < (0.02 if precision == "f32" else 0.1) * scale, parity


def test_a_plan_openvino_cannot_run_is_refused_naming_the_layer(conv_head):
    _, hg, calib = conv_head
    plan = hyfx.recipes.efficientquant(hg, calib, progress=False)  # asymmetric weights
    with pytest.raises(hyfx.HyfxError, match=r"plan entry conv .*OpenVINO's int8 kernels take symmetric weights"):
        hyfx.export(hg, plan, target="openvino")
    with pytest.raises(hyfx.HyfxError, match=r"written as \.xml \+ \.bin"):
        hyfx.export(hg, hyfx.recipes.minmax(hg, calib, progress=False), "model.onnx", target="openvino")


def test_cli_exports_ir_and_evaluates_it_in_openvino(capsys, tmp_path, sample_images):
    plan, xml = tmp_path / "plan.json", tmp_path / "model.xml"
    root = str(sample_images.root)
    assert cli.main(["quantize", "lite0-real", "--recipe", "minmax", "--target", "openvino", "--calib", root,
                     "--n-calib", "4", "--out", str(plan)]) == 0
    assert cli.main(["export", "lite0-real", "--plan", str(plan), "--target", "openvino", "--cpu-int8", "--out",
                     str(xml), "--check", root, "--n-check", "25", "--json", str(tmp_path / "x.json")]) == 0
    out = capsys.readouterr().out
    assert xml.is_file() and "OpenVINO (" in out and "vs PyTorch quantized on 25 images" in out
    assert "OpenVINO CPU int8: " in out and "left float" in out
    chosen = json.loads((tmp_path / "x.json").read_text())["cpu_int8"]
    assert chosen["int8_layers"] or chosen["float_layers"]
    assert cli.main(["eval", "lite0-real", "--plan", str(plan), "--data", root, "--n-eval", "25", "--backend",
                     "openvino", "--precision", "f32", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "minmax (OpenVINO f32" in out and "fp32" in out  # ", 7-bit weights: no VNNI" on CPUs without it
    data = json.loads((tmp_path / "r.json").read_text())
    (label,) = [k for k in data["results"] if k.startswith("minmax (OpenVINO f32")]
    assert data["backend"] == "openvino" and data["results"][label]["agreement"] >= 80
    # the file itself, as deployed (its float layers exact, so at least as close to FP32 as a rule)
    assert cli.main(["eval", "lite0-real", "--plan", str(plan), "--data", root, "--n-eval", "25", "--deployed",
                     str(xml), "--precision", "f32", "--json", str(tmp_path / "d.json")]) == 0
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["deployed"] == str(xml) and data["results"]["model.xml (OpenVINO f32)"]["agreement"] >= 80
    bad = tmp_path / "broken.xml"
    bad.write_text("not an IR")
    for path, message in ((tmp_path / "missing.xml", "no such file"), (plan, r"expected an ONNX model \(.onnx\)"),
                          (bad, "OpenVINO cannot load it")):
        capsys.readouterr()
        assert cli.main(["eval", "lite0-real", "--plan", str(plan), "--data", root, "--n-eval", "2", "--deployed",
                         str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_profile_says_which_kernels_ran_int8_and_where_the_time_went(lowered):
    from hyfx.backends import openvino_profile

    _, calib, _, result, _ = lowered
    x = calib[0][:1].numpy()
    times = openvino_profile.layer_times(result.model, x, "f32", runs=3, warmup=1)
    convs = [t for t in times if t.node_type in ("Convolution", "FullyConnected")]
    assert convs and all(t.precision in ("i8", "u8") for t in convs), convs
    summary = openvino_profile.summary(times, top=3)
    assert summary["total_ms"] > 0 and 0 < summary["int8_ms_share"] <= 1
    assert abs(sum(v["share"] for v in summary["by_kind"].values()) - 1) < 0.01
    assert len(summary["slowest"]) == 3 and summary["slowest"][0]["ms"] >= summary["slowest"][-1]["ms"]
    from hyfx.backends import ort

    float_times = openvino_profile.layer_times(openvino.read_onnx(ort.fp32_model(lowered[0])), x, "f32", runs=2,
                                               warmup=1)
    assert not any(t.precision in ("i8", "u8") for t in float_times)
    assert openvino_profile.kernel_precision("brgconv_avx512_amx_I8") == "i8"
    assert openvino_profile.kernel_precision("jit_avx512_FP32") == "f32"
    assert openvino_profile.kernel_precision("undef") == ""


def test_weights_are_narrowed_to_what_the_cpu_multiplies_exactly(conv_head):
    """Without VNNI, OpenVINO's int8 kernels saturate 8-bit weights: the export narrows them over the same range."""
    _, hg, calib = conv_head
    plan = hyfx.recipes.minmax(hg, calib, progress=False)
    layer, policy = next((k, p) for k, p in plan.layers.items() if p.weight is not None)
    weight = hyfx.ops.getattr_path(hg.gm, hyfx.ops.weight_arg(hg.node(layer)).target)
    policy.weight = calibrate_weight(weight, policy.weight)  # a searched plan carries its scales
    narrowed, layers = openvino.weights_for_this_cpu(plan, bits=7)
    assert layer in layers and narrowed.meta["narrowed_weights"]["bits"] == 7
    for name, p in narrowed.layers.items():
        if p.weight is not None:
            assert p.weight.bits == 7 and p.weight.qmax == 63
            old = plan.layers[name].weight
            if old.calibrated:  # same range: scale × 127 / 63
                assert [s * 63 for s in p.weight.scale] == pytest.approx([s * 127 for s in old.scale])
    same, none = openvino.weights_for_this_cpu(plan, bits=8)
    assert none == [] and same.layers.keys() == plan.layers.keys()
    assert plan.layers[layer].weight.bits == 8  # the plan given is not changed


def test_layers_left_float_lose_every_quantizer_and_keep_the_rest(conv_head):
    from hyfx.pipelines.openvino_cpu import keep_layers

    _, hg, calib = conv_head
    plan = hyfx.recipes.minmax(hg, calib, progress=False)
    layers = sorted(plan.layers)
    kept = keep_layers(plan, layers, layers[:1])
    assert sorted(kept.layers) == layers[:1] and kept.layers[layers[0]] is plan.layers[layers[0]]
    assert kept.meta["float_layers"]["layers"] == len(layers) - 1 and sorted(plan.layers) == layers
    assert "float_layers" not in keep_layers(plan, layers, layers).meta


@pytest.mark.parametrize("thresholds", [(), (0.0,)], ids=["all-float-only", "timed"])
def test_cpu_int8_runs_int8_exactly_the_layers_it_reports(conv_head, thresholds, monkeypatch):
    """Whatever the timing picks, the compiled model runs int8 in the layers the result names and nowhere else,
    and matches its reference (the plan as deployed); with no threshold, every layer is float and the model is the
    FP32 one, bias correction included (the float layers get their own weights back)."""
    from hyfx.pipelines.openvino_cpu import compile_openvino

    _, hg, calib = conv_head
    if not thresholds:  # no int8 kernel runs: 8-bit weights as on a CPU with VNNI, so their bias correction stays
        monkeypatch.setattr(openvino, "cpu_weight_bits", lambda: 8)  # (narrowing to 7 bits would drop it)
    plan = hyfx.make_plan("minmax", hg, calib, target="openvino", bias_correction=True, progress=False)
    assert any(p.bias_correction is not None for p in plan.layers.values())
    result = compile_openvino(hg, plan, precision="f32", thresholds=thresholds, runs=5)
    info = result.info
    assert sorted(info.int8_layers + info.float_layers) == sorted(plan.layers)
    assert sorted(result.plan.layers) == sorted(info.int8_layers)
    assert {t["int8_layers"] for t in info.tuning} >= {0} and len(info.latency) == len(plan.layers)
    compiled = openvino.compile_model(result.export.model, "f32")
    precisions = openvino.runtime_precisions(compiled)
    n_int8 = sum(n for c in precisions.values() for p, n in c.items() if p in openvino.INT8)
    assert n_int8 == len(info.int8_layers), (precisions, info.int8_layers)
    loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib]
    parity = openvino.parity(compiled, result.export.reference, loader)
    with torch.no_grad():
        scale = max(float(hg.gm(x).abs().max()) for x in calib)
    assert parity.max_abs_diff < 0.02 * scale, parity
    if not thresholds:
        assert info.threshold is None and not info.int8_layers
        with torch.no_grad():
            for x in calib:
                torch.testing.assert_close(torch.from_numpy(openvino.run(compiled, x)), hg.gm(x), atol=1e-6, rtol=1e-5)
