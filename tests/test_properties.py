"""Properties of the quantizer math and the plan files, over generated inputs (hypothesis)."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hyfx
from hyfx.quant.quantizers import calibrate_weight, fake_quant_uniform, log2_params, quantize_log2, uniform_params
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
bits = st.integers(2, 8)
schemes = st.sampled_from(["symmetric", "asymmetric"])
values = st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=2, max_size=64)


@SETTINGS
@given(values=values, bits=bits, scheme=schemes)
def test_uniform_round_trip_is_within_half_a_step_inside_the_range(values, bits, scheme):
    x = torch.tensor(values)
    spec = QuantSpec(bits=bits, scheme=scheme)
    scale, zero = uniform_params(x.min(), x.max(), spec)
    y = fake_quant_uniform(x, scale, zero, spec.qmin, spec.qmax)
    lo = (spec.qmin - zero) * scale
    hi = (spec.qmax - zero) * scale
    inside = (x >= lo) & (x <= hi)
    assert torch.all((y - x).abs()[inside] <= scale / 2 + 1e-6 * (1 + x.abs()[inside]))
    codes = torch.round(y / scale) + zero
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax


@SETTINGS
@given(values=st.lists(st.floats(0.0009765625, 1.0, width=32), min_size=2, max_size=64), bits=bits)
def test_log2_codes_lie_in_the_grid_and_round_trip_within_half_a_log_step(values, bits):
    x = torch.tensor(values)
    eps = 1e-5
    delta, zero = log2_params(float(x.min()), float(x.max()), bits, eps)
    codes = quantize_log2(x, delta, zero, bits, eps)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    inside = (codes > 0) & (codes < 2**bits - 1)
    log_x = torch.log2(x + eps) / delta + zero
    assert torch.all((codes - log_x).abs()[inside] <= 0.5 + 1e-4)


@SETTINGS
@given(rows=st.integers(1, 1), cols=st.integers(1, 20), bits=bits, scheme=schemes, data=st.data())
def test_per_channel_equals_per_tensor_on_one_channel(rows, cols, bits, scheme, data):
    w = torch.tensor(data.draw(st.lists(st.floats(-3, 3, width=32), min_size=cols, max_size=cols))).reshape(rows, cols)
    per_tensor = calibrate_weight(w, QuantSpec(bits=bits, scheme=scheme, granularity="tensor"))
    per_channel = calibrate_weight(w, QuantSpec(bits=bits, scheme=scheme, granularity="channel", axis=0))
    assert per_channel.scale == per_tensor.scale and per_channel.zero_point == per_tensor.zero_point


specs = st.builds(lambda b, g, s, scale: QuantSpec(bits=b, granularity=g, scheme=s, scale=(scale,), zero_point=(0,)),
                  bits, st.sampled_from(["tensor", "channel"]), schemes, st.floats(0.5, 10, width=32))
plans = st.builds(lambda layers, recipe: QuantPlan(recipe, layers={f"l{i}": LayerPolicy(weight=w, inputs={0: a})
                                                                   for i, (w, a) in enumerate(layers)}),
                  st.lists(st.tuples(specs, specs), min_size=1, max_size=6), st.sampled_from(["minmax", "qhyvit"]))


@SETTINGS
@given(plan=plans)
def test_plan_json_save_load_is_the_identity(tmp_path, plan):
    path = hyfx.save_plan(plan, tmp_path / "plan.json")
    assert hyfx.load_plan(path).to_dict() == plan.to_dict()


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))


@SETTINGS
@given(plan=plans, data=st.data(), retype=st.sampled_from([None, "text", 3.5, [1], {"a": 1}]))
def test_plan_files_with_a_field_removed_or_retyped_are_refused_cleanly(tmp_path, plan, data, retype):
    tree = json.loads(plan.to_json())
    where = data.draw(st.sampled_from([p for p in _paths(tree) if p[0] != "meta"]))
    parent = tree
    for key in where[:-1]:
        parent = parent[key]
    if retype is None:
        del parent[where[-1]]
    else:
        parent[where[-1]] = retype
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(tree))
    try:
        loaded = hyfx.load_plan(path)
    except hyfx.HyfxError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    # or it loads exactly what the file says (an optional top-level field removed takes its default)
    written = json.loads(loaded.to_json())
    if retype is None and len(where) == 1:
        written.pop(where[0])
    assert written == tree
