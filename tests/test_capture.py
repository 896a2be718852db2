"""Capture parity on the hybrid zoo, attention decomposition, bridge counts, and the fx fallback."""

from __future__ import annotations

import importlib

import pytest
import timm
import torch

import hyfx
from hyfx.capture import capture_report
from hyfx.data import data_config, example_input
from hyfx.ops import ATTENTION, SOFTMAX, op_kind

MODELS = [
    "mobilevit_xxs", "mobilevit_xs", "mobilevit_s", "mobilevitv2_050", "mobilevitv2_100", "mobilevitv2_200",
    "efficientformer_l1", "efficientformerv2_s0", "efficientvit_b0", "fastvit_t8", "levit_128s",
    "edgenext_xx_small", "repvit_m0_9", "deit_tiny_patch16_224",
]
# Q-HyViT Table 4: MobileViT v1/v2 have 3 bridge blocks, EfficientFormerV1 1, EfficientFormerV2 2.
BRIDGES = {"mobilevit_xxs": 3, "mobilevit_xs": 3, "mobilevit_s": 3, "mobilevitv2_050": 3, "mobilevitv2_100": 3,
           "mobilevitv2_200": 3, "efficientformer_l1": 1, "efficientformerv2_s0": 2}


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    return model, example_input(data_config(model), batch_size=2)


@pytest.mark.parametrize("name", MODELS)
def test_capture_matches_eager_and_analysis_runs(name):
    model, x = _model(name)
    gm = hyfx.capture(model, x)
    report = capture_report(gm)
    assert report.ok and report.max_abs_diff <= 1e-5
    hg = hyfx.analyze(gm)
    with torch.no_grad():
        expected = model(x)
        assert (gm(x) - expected).abs().max() <= 1e-5
        # decomposed attention agrees with the fused kernel to float rounding
        assert (hg.gm(x) - expected).abs().max() <= 1e-4
    assert not any(op_kind(n, hg.gm)[0] == ATTENTION for n in hg.gm.graph.nodes)
    assert hg.blocks and hg.layers()
    if name in BRIDGES:
        assert len(hg.bridges) == BRIDGES[name], [b.describe() for b in hg.bridges]


def test_mobilevit_bridges_are_kxk_to_1x1_and_names_keep_module_paths():
    model, x = _model("mobilevit_xxs")
    hg = hyfx.analyze(hyfx.capture(model, x))
    assert [b.layers for b in hg.bridges] == [
        [f"stages.{i}.1.conv_kxk.conv", f"stages.{i}.1.conv_1x1"] for i in (2, 3, 4)
    ]
    assert hg.tags("stages.2.1.conv_kxk.conv")["kind"] == "conv"
    assert hg.tags("stages.2.1.transformer.0.attn.softmax")["kind"] == "softmax"
    assert hg.tags("stages.2.1.transformer.0.attn.qkv")["region"] == "transformer"
    assert set(hg.transformer_blocks()) == {"stages.2.1", "stages.3.1", "stages.4.1"}
    assert "stages.1.0" in hg.cnn_blocks()
    graph = hg.to_networkx()
    assert graph.number_of_nodes() == len(hg.gm.graph.nodes)
    softmax = [n for n, a in graph.nodes(data=True) if a.get("kind") == SOFTMAX]
    assert len(softmax) == 9


def test_capture_accepts_any_batch_size():
    model, x = _model("mobilevit_xxs")
    gm = hyfx.capture(model, x[:1])
    batch = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        assert (gm(batch) - model(batch)).abs().max() <= 1e-5


class _Gate(torch.nn.Module):
    """Branches on a tensor value: neither torch.export nor fx can trace this."""

    def forward(self, x):
        if x.mean() > 0:
            return x * 2
        return x - 1


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gate = _Gate()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


def test_value_dependent_control_flow_falls_back_to_fx_with_leaf():
    model = _DataDependent().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = hyfx.capture(model, x)
    report = capture_report(gm)
    assert report.method == "fx.symbolic_trace"
    assert report.leaf_modules == ["gate"]
    assert report.export_error
    hg = hyfx.analyze(gm)
    assert {"conv", "fc"} <= set(hg.layers())
    with torch.no_grad():
        for batch in (x, -x.abs() - 1):  # both branches
            assert torch.allclose(gm(batch), model(batch), atol=1e-6)


def test_capture_without_fallback_reports_export_error():
    with pytest.raises(hyfx.HyfxError, match="torch.export failed"):
        hyfx.capture(_DataDependent().eval(), torch.randn(2, 3, 8, 8), allow_fallback=False)


def test_capture_rejects_graph_that_disagrees_with_eager(monkeypatch):
    cap = importlib.import_module("hyfx.capture")  # the module, not the function hyfx.capture

    real = cap._export

    def corrupt(model, example):
        gm, dynamic = real(model, example)
        for node in gm.graph.nodes:
            if node.op == "output":
                with gm.graph.inserting_before(node):
                    bumped = gm.graph.call_function(torch.add, (node.args[0][0], 1e-3))
                node.args = ((bumped,),)
        gm.recompile()
        return gm, dynamic

    monkeypatch.setattr(cap, "_export", corrupt)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(hyfx.HyfxError, match="disagrees with eager"):
        hyfx.capture(model, torch.randn(2, 3, 8, 8))


def test_decompose_attention_keeps_numerics_with_mask():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            q = self.proj(x).reshape(x.shape[0], 6, 2, 8).transpose(1, 2)
            return self.attn(q, q, q)

    model = Wrap().eval()
    x = torch.randn(2, 6, 16)
    hg = hyfx.analyze(hyfx.capture(model, x))
    kinds = [n.meta["hyfx"]["kind"] for n in hg.nodes()]
    assert kinds.count("softmax") == 1 and kinds.count("matmul") == 2
    with torch.no_grad():
        assert (hg.gm(x) - model(x)).abs().max() <= 1e-5
