"""hyfx.hardware: device profiles, the paper's energy model, layer work from shapes, latency models, bytes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import hyfx
from hyfx.errors import HyfxError
from hyfx.hardware import (
    PROFILES,
    BitConfig,
    DeviceProfile,
    MeasuredLatency,
    RooflineLatency,
    energy,
    get_profile,
    graph_work,
    model_bytes,
    power_per_flop,
    this_cpu,
)
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec


def test_energy_on_the_papers_rtx3080_numbers():
    rtx = PROFILES["rtx3080"]
    assert (rtx.max_power_w, rtx.memory_power_w, rtx.peak_flops) == (320.0, 80.0, 28.77e12)
    # p_f = 320 W / 28.77 TFLOPS = 1.11227e-11 W per FLOP/s
    assert rtx.power_per_flop == pytest.approx(1.112269725e-11, rel=1e-9)
    assert power_per_flop(320.0, 28.77e12) == rtx.power_per_flop
    # E = p_f × latency: 2 ms on the RTX 3080
    assert rtx.energy(2e-3) == pytest.approx(2.22453945e-14, rel=1e-8)
    assert energy(2e-3, 320.0, 28.77e12) == rtx.energy(2e-3)
    # a device with twice the power at the same peak costs twice the energy for the same latency
    assert energy(1e-3, 640.0, 28.77e12) == pytest.approx(2 * rtx.energy(1e-3))
    with pytest.raises(HyfxError, match="positive"):
        power_per_flop(0, 1e12)


def test_compute_rate_uses_the_narrowest_container():
    rtx, h100 = PROFILES["rtx3080"], PROFILES["h100"]
    assert rtx.compute_rate(4) == 476e12 and rtx.compute_rate(3) == 476e12
    assert rtx.compute_rate(6) == 238e12 and rtx.compute_rate(8) == 238e12
    assert h100.compute_rate(4) == h100.compute_rate(8) == 1979e12  # no int4 tensor cores on Hopper
    assert DeviceProfile("x", 10, 1e9, 1e9).compute_rate(8) == 1e9  # no integer units: FP32 peak


def test_profiles_by_name_and_from_json(tmp_path):
    cpu = this_cpu(threads=2)
    assert cpu.peak_flops > 1e9 and cpu.max_power_w > 0 and cpu.int_ops[8] >= cpu.peak_flops
    assert get_profile("h100") is PROFILES["h100"]
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(PROFILES["rtx3080"].to_dict()))
    assert get_profile(str(path)) == PROFILES["rtx3080"]
    with pytest.raises(HyfxError, match="unknown device 'tpu'"):
        get_profile("tpu")


def test_bit_config_parse():
    assert BitConfig.parse("w4a8") == BitConfig(4, 8) and str(BitConfig(8, 4)) == "W8A4"
    for bad in ("W4", "4A8", "W9A8", "WxA8"):
        with pytest.raises(HyfxError):
            BitConfig.parse(bad)


class _Tiny(nn.Module):
    """conv (3→8, 3×3) on 8×8, then a linear 8→6 over the 64 positions and a q·kᵀ matmul."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # B × 64 × 8
        q = self.fc(t)  # B × 64 × 6
        return torch.matmul(q, q.transpose(1, 2)).mean(dim=(1, 2))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = _Tiny().eval()
    gm = hyfx.capture(model, torch.randn(2, 3, 8, 8))
    return hyfx.analyze(gm)


def test_graph_work_counts_macs_weights_and_activations(tiny):
    work = graph_work(tiny.gm)
    conv, fc, mm = (work.layers[n] for n in tiny.layers())
    assert (conv.kind, conv.macs, conv.weight_numel, conv.weight_channels) == ("conv", 8 * 64 * 27, 216, 8)
    assert conv.input_numel == (3 * 64,) and conv.output_numel == 8 * 64
    assert (fc.macs, fc.weight_numel, fc.output_numel) == (64 * 6 * 8, 48, 64 * 6)
    assert (mm.kind, mm.macs, mm.weight_numel, mm.input_numel) == ("matmul", 64 * 64 * 6, 0, (64 * 6, 6 * 64))
    assert work.fixed_bytes == 8 * 4  # the conv bias stays FP32
    assert conv.weight_bytes(4) == 108 + 4 * 8 and mm.weight_bytes(4) == 0


def test_roofline_takes_the_slower_of_compute_and_memory(tiny):
    work = graph_work(tiny.gm)
    profile = DeviceProfile("toy", 1.0, peak_flops=1e6, memory_bandwidth=1e9, int_ops={8: 2e6, 4: 4e6})
    model = RooflineLatency(work, profile)
    conv = work.layers[tiny.layers()[0]]
    assert model.layer_latency(conv.name, BitConfig(8, 8)) == pytest.approx(2 * conv.macs / 2e6)
    assert model.layer_latency(conv.name, BitConfig(4, 4)) == pytest.approx(2 * conv.macs / 4e6)
    assert model.layer_latency(conv.name, BitConfig(4, 8)) == model.layer_latency(conv.name, BitConfig(8, 8))
    slow_memory = RooflineLatency(work, DeviceProfile("mem", 1.0, peak_flops=1e15, memory_bandwidth=1e3))
    w8, w4 = (slow_memory.layer_latency(conv.name, BitConfig(w, 8)) for w in (8, 4))
    assert w8 == pytest.approx(conv.traffic_bytes(BitConfig(8, 8)) / 1e3) and w4 < w8
    assert model.source == "roofline:toy" and model.fixed_latency() > 0


def test_measured_latency_is_whole_model_deltas(tiny):
    layers = tiny.layers()
    cost = {BitConfig(8, 8): 3.0, BitConfig(4, 8): 2.0, BitConfig(4, 4): 1.0}
    calls = []

    def timer(assignment):
        calls.append(dict(assignment))
        return 10.0 + sum(cost[c] * (i + 1) for i, c in enumerate(assignment[layer] for layer in layers))

    model = MeasuredLatency(timer, layers, BitConfig(8, 8), "fake")
    assert model.fixed_latency() == 10.0 + 3.0 * (1 + 2 + 3)
    assert model.layer_latency(layers[1], BitConfig(4, 4)) == pytest.approx((1.0 - 3.0) * 2)
    assert model.layer_latency(layers[2], BitConfig(8, 8)) == 0.0
    model.layer_latency(layers[1], BitConfig(4, 4))
    assert len(calls) == 2 and model.source == "measured:fake"  # reference once, then cached


def test_model_bytes_of_the_quantized_graph_matches_the_prediction(tiny):
    calibrated = QuantSpec(bits=8, scheme="asymmetric").with_params([0.05], [128])
    plan = QuantPlan("test")
    conv, fc, mm = tiny.layers()
    plan.set(conv, LayerPolicy(weight=QuantSpec(bits=4, granularity="channel"), inputs={0: calibrated}))
    plan.set(fc, LayerPolicy(weight=QuantSpec(bits=6, granularity="channel")))
    plan.set(mm, LayerPolicy(inputs={0: calibrated, 1: calibrated}))
    measured = model_bytes(hyfx.quantize(tiny, plan))
    work = graph_work(tiny.gm)
    predicted = work.fixed_bytes + work.layers[conv].weight_bytes(4) + work.layers[fc].weight_bytes(6)
    assert measured == predicted == (108 + 32) + (36 + 24) + 32
    assert model_bytes(tiny.gm) == (216 + 8 + 48) * 4  # float graph: every constant at FP32
    assert math.isclose(model_bytes(hyfx.quantize(tiny, QuantPlan("none"))), model_bytes(tiny.gm))
