"""The ORT layout rewrite: Reshape / Transpose chains recovered as one axis permutation and written back as
transposes ONNX Runtime copies by rows; bitwise-equal outputs."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import hyfx
from hyfx.backends import ort as hort
from hyfx.backends.onnx_layout import axis_permutation, fast_steps, fast_transposes, is_slow, merged
from hyfx.backends.onnx_lower import lower_marks


def _apply_steps(x: np.ndarray, sizes: list[int], steps: list) -> np.ndarray:
    x = x.reshape(sizes)
    for step_sizes, perm in steps:
        x = x.reshape(step_sizes).transpose(perm)
    return x.ravel()


@pytest.mark.parametrize("seed", range(20))
def test_axis_permutation_recovers_random_chains(seed):
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(1, 5, size=rng.integers(2, 6))]
    perm = [int(p) for p in rng.permutation(len(sizes))]
    index = np.arange(int(np.prod(sizes))).reshape(sizes).transpose(perm)
    found = axis_permutation(index.reshape(-1, *index.shape[-1:]))  # any output shape: the mapping is what counts
    assert found is not None
    found_sizes, found_perm = found
    want_sizes, want_perm = merged([s for s in sizes if s > 1], [p - sum(sizes[q] == 1 for q in range(p))
                                                                  for p in perm if sizes[p] > 1])
    assert (found_sizes, found_perm) == (want_sizes, want_perm)
    steps = fast_steps(found_sizes, found_perm)
    assert len(steps) <= 2
    assert np.array_equal(_apply_steps(np.arange(index.size), found_sizes, steps), index.ravel())


def test_axis_permutation_rejects_a_mapping_that_is_no_transpose():
    assert axis_permutation(np.arange(12)[::-1]) is None
    assert axis_permutation(np.array([0, 2, 1, 3, 5, 4])) is None


def test_mobilevit_unfold_becomes_two_row_copies():
    # [C, nh, ph, nw, pw] → [ph, pw, nh, nw, C]: MobileViT's unfold at C=64, 32×32, patch 2
    sizes, perm = [64, 16, 2, 16, 2], [2, 4, 1, 3, 0]
    assert is_slow(sizes, perm)
    steps = fast_steps(sizes, perm)
    assert steps == [([64, 1024], [1, 0]), ([16, 2, 16, 2, 64], [1, 3, 0, 2, 4])]
    assert not any(is_slow(s, p) for s, p in steps)
    fold = fast_steps([2, 2, 16, 16, 64], [4, 2, 0, 3, 1])  # and back
    assert not any(is_slow(s, p) for s, p in fold) and len(fold) == 2


def _chain_model(dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """timm MobileViT's unfold → Neg → fold, as the dynamo exporter writes them (dynamic batch)."""
    shapes = {"u1": [-1, 2, 16, 2], "u2": [-1, 64, 256, 4], "u3": [-1, 256, 64],
              "f1": [-1, 4, 256, 64], "f2": [-1, 16, 2, 2], "f3": [-1, 64, 32, 32]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in shapes.items()]
    nodes = [helper.make_node("Reshape", ["x", "u1"], ["a"]),
             helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["b", "u2"], ["c"]),
             helper.make_node("Transpose", ["c"], ["d"], perm=[0, 3, 2, 1]),
             helper.make_node("Reshape", ["d", "u3"], ["tokens"]),
             helper.make_node("Abs" if dtype == TensorProto.UINT8 else "Neg", ["tokens"], ["e"]),
             helper.make_node("Reshape", ["e", "f1"], ["g"]),
             helper.make_node("Transpose", ["g"], ["h"], perm=[0, 3, 2, 1]),
             helper.make_node("Reshape", ["h", "f2"], ["i"]),
             helper.make_node("Transpose", ["i"], ["j"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["j", "f3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, ["batch", 64, 32, 32])],
                              [helper.make_tensor_value_info("y", dtype, ["batch", 64, 32, 32]),
                               helper.make_tensor_value_info("tokens", dtype, [None, 256, 64])], inits)
    graph.value_info.append(helper.make_tensor_value_info("e", dtype, ["4*batch", 256, 64]))  # as the exporter writes
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _transposes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Transpose"]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.UINT8])
def test_unfold_fold_chains_rewritten_bitwise_equal(dtype):
    model = _chain_model(dtype)
    fast, rewritten = fast_transposes(model)
    onnx.checker.check_model(fast, full_check=True)
    assert rewritten == 2
    assert len(_transposes(fast)) == 4  # two per chain, each a single-axis move or a copy of 64-element rows
    np_type = np.float32 if dtype == TensorProto.FLOAT else np.uint8
    for batch in (1, 3):
        x = (np.random.default_rng(batch).random((batch, 64, 32, 32)) * 255).astype(np_type)
        want = hort.session(model, threads=1).run(None, {"x": x})
        got = hort.session(fast, threads=1).run(None, {"x": x})
        assert all(np.array_equal(w, g) for w, g in zip(want, got, strict=True))
    again, rewritten = fast_transposes(fast)  # nothing slow left
    assert rewritten == 0 and len(_transposes(again)) == 4


def test_chain_whose_batch_is_not_outermost_is_left_alone():
    # the attention's qkv split: [B·P, N, 3·h·d] → [3, B·P, h, N, d] moves the 3 outside the batch
    inits = [numpy_helper.from_array(np.array([-1, 256, 3, 4, 16], np.int64), "s")]
    nodes = [helper.make_node("Reshape", ["x", "s"], ["a"]),
             helper.make_node("Transpose", ["a"], ["y"], perm=[2, 0, 3, 1, 4])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256, 192])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fast_transposes(model)[1] == 0


def test_ort_export_of_a_mobilevit_block_is_rewritten_and_matches_pytorch():
    from timm.models.mobilevit import MobileVitBlock

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), MobileVitBlock(16, 16, patch_size=2,
                                transformer_dim=32, transformer_depth=1, num_heads=2),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    gm = hyfx.capture(model, calib[0][:1])
    plan = hyfx.recipes.minmax(gm, calib, progress=False)
    result = hyfx.export(gm, plan, target="ort")
    names = [n.name for n in result.model.graph.node]
    assert sum(name.startswith("hyfx_layout") and name.endswith("/out") for name in names) == 2  # unfold, fold
    assert result.report.layout_rewrites == 2 and "2 reshape / transpose chains rewritten" in result.report.summary()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        want = result.reference(x).numpy()
    got = hort.run(hort.session(result.model, optimize=False), x)  # ORT's Q/DQ ops as written: exact
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    plain = lower_marks(copy.deepcopy(result.marked), result.points)  # the same export, not rewritten
    assert not any(n.name.startswith("hyfx_layout") for n in plain.graph.node)
    assert np.array_equal(hort.run(hort.session(plain), x), hort.run(hort.session(result.model), x))  # int8 kernels


def test_mobilevit_v2_unfold_is_left_alone():
    # [B, C, nh, ph, nw, pw] → [B, C, ph, pw, nh, nw]: innermost axes of 2 and 16 elements, no fast split
    assert is_slow([64, 16, 2, 16, 2], [0, 2, 4, 1, 3])
    assert any(is_slow(s, p) for s, p in fast_steps([64, 16, 2, 16, 2], [0, 2, 4, 1, 3]))
    inits = [numpy_helper.from_array(np.array([-1, 64, 16, 2, 16, 2], np.int64), "s"),
             numpy_helper.from_array(np.array([-1, 64, 4, 256], np.int64), "t")]
    nodes = [helper.make_node("Reshape", ["x", "s"], ["a"]),
             helper.make_node("Transpose", ["a"], ["b"], perm=[0, 1, 3, 5, 2, 4]),
             helper.make_node("Reshape", ["b", "t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fast_transposes(model)[1] == 0
