"""HySquant: budgets, the ILP, the measured-feedback loop, Pareto fronts, and the real-weight pipeline."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import hyfx
from hyfx import zoo
from hyfx.data import data_config, example_input, make_loader, split
from hyfx.errors import HyfxError
from hyfx.evaluate import kl_divergence
from hyfx.hardware import PROFILES, BitConfig, model_bytes
from hyfx.mixed import (
    Budget,
    Constraint,
    Entry,
    Infeasible,
    SensitivityTable,
    build_table,
    collapse_pruning,
    fit_drop_per_kl,
    linear_drop,
    pareto_front,
    predicted_drop,
    run_hysquant,
    search,
    solve,
)
from hyfx.pipelines.hysquant import OrtTimer

W4, W8 = BitConfig(4, 8), BitConfig(8, 8)
REAL = "lite0-vit-real"


# ---------------------------------------------------------------------------------------------- budgets


def test_budget_parsing():
    assert Budget.parse("latency=0.8x") == Budget("latency", 0.8, True)
    assert Budget.parse("bytes=3MB") == Budget("bytes", 3e6)
    assert Budget.parse("latency=2ms").value == pytest.approx(2e-3)
    assert Budget.parse("top1-drop=0.5") == Budget("top1-drop", 0.5)
    assert Budget.parse("top1_drop=0") == Budget("top1-drop", 0.0)
    assert str(Budget.parse("top1=85")) == "top1 ≥ 85"
    for bad, match in [("speed=1", "METRIC=VALUE"), ("latency", "METRIC=VALUE"), ("top1=0.9x", "absolute"),
                       ("bytes=3GB", "unknown unit 'gb'"), ("bytes=abc", "bad budget value"), ("bytes=0", "positive")]:
        with pytest.raises(HyfxError, match=match):
            Budget.parse(bad)


# ---------------------------------------------------------------------------------------------- the ILP


def test_ilp_returns_the_known_optimum():
    # 3 layers × (cheap, mid, wide); minimise KL with Σ bytes ≤ 9. Worked by hand: (wide, cheap, mid), KL 0.35.
    kl = np.array([[0.50, 0.10, 0.0], [0.05, 0.02, 0.0], [0.40, 0.30, 0.0]])
    size = np.array([[1, 2, 4], [1, 2, 4], [3, 4, 8]], dtype=float)
    assert solve(kl, [Constraint("bytes ≤ 9", size, 9.0)]) == [2, 0, 1]
    # and it agrees with exhaustive search on random instances, with pruned cells and an offset
    rng = np.random.default_rng(0)
    for _ in range(20):
        kl, size = rng.random((5, 3)), rng.integers(1, 10, (5, 3)).astype(float)
        allowed = rng.random((5, 3)) > 0.2
        allowed[:, 2] = True
        limit = float(np.where(allowed, size, np.inf).min(axis=1).sum() + rng.integers(0, 10))
        best = min((c for c in itertools.product(range(3), repeat=5) if all(allowed[i, j] for i, j in enumerate(c))
                    and sum(size[i, j] for i, j in enumerate(c)) <= limit),
                   key=lambda c: sum(kl[i, j] for i, j in enumerate(c)))
        got = solve(kl, [Constraint("bytes", size, limit + 100.0, offset=100.0)], allowed)
        assert sum(kl[i, j] for i, j in enumerate(got)) == pytest.approx(sum(kl[i, j] for i, j in enumerate(best)))
        assert all(allowed[i, j] for i, j in enumerate(got))


def test_ilp_names_the_budget_that_cannot_be_met():
    kl = np.array([[0.5, 0.0], [0.3, 0.0]])
    size = np.array([[1.0, 4.0], [1.0, 4.0]])
    with pytest.raises(Infeasible, match=r"budget bytes ≤ 1 cannot be met: the lowest any plan reaches is 2"):
        solve(kl, [Constraint("kl ≤ 1", kl, 1.0), Constraint("bytes ≤ 1", size, 1.0)])
    # each reachable alone, not together: the one with the least room is named
    with pytest.raises(Infeasible, match=r"cannot all be met at once; the tightest is kl ≤ 0.1 "):
        solve(kl, [Constraint("bytes ≤ 6", size, 6.0), Constraint("kl ≤ 0.1", kl, 0.1)])


# ---------------------------------------------------------------------------------------------- hand-made table


def _table(kl4=(0.1, 0.2, 0.05, 0.3), alpha=10.0, fp32=80.0) -> SensitivityTable:
    """4 layers × {W4A8, W8A8}: W4A8 halves the weight bytes and (roofline) saves 20% of the layer's latency."""
    layers = [f"l{i}" for i in range(len(kl4))]
    entries = {}
    for layer, k in zip(layers, kl4, strict=True):
        for c, kl, lat, size in ((W4, k, 0.8, 50.0), (W8, 0.001, 1.0, 100.0)):
            entries[(layer, c.name)] = Entry(layer, c.name, kl, fp32 - predicted_drop(kl, alpha, fp32), 95.0, lat, lat, size)
    return SensitivityTable("toy", layers, [W4, W8], entries, {layer: "conv" for layer in layers},
                            {"top1": fp32, "top5": 95.0, "n_eval": 100, "n_calib": 32},
                            {"latency": 0.0, "energy": 0.0, "bytes": 0.0}, "roofline:toy", PROFILES["rtx3080"].to_dict())


def _fake_backend(table, interaction=2.0, latency_saves=True, alpha=10.0):
    """Measured KL = interaction × summed KL; drop from KL as the model has it; bytes exact; latency as the roofline
    (or flat)."""
    calls = []

    def evaluate(assignment):
        calls.append(dict(assignment))
        totals = table.totals(dict(assignment))
        kl = interaction * totals["kl"]
        ratio = totals["latency"] / len(table.layers) if latency_saves else 1.0
        drop = predicted_drop(kl, alpha, 80.0)
        return {"kl": kl, "top1": 80.0 - drop, "top1_drop": drop, "bytes": totals["bytes"], "latency_ratio": ratio}

    return evaluate, calls


def test_search_without_measurement_is_the_ilp_answer():
    table = _table()
    result = search(table, [Budget.parse("bytes=0.75x")])
    assert result.status == "predicted" and result.measured is None
    assert {k: str(v) for k, v in result.assignment.items()} == {"l0": "W4A8", "l1": "W8A8", "l2": "W4A8", "l3": "W8A8"}
    assert result.predicted["bytes"] == 300.0


def test_feedback_corrects_the_model_and_searches_again():
    table = _table()
    evaluate, calls = _fake_backend(table, interaction=2.0)
    lines = []
    result = search(table, [Budget.parse("top1-drop=2.5")], evaluate, minimize="bytes", report=lines.append)
    # iteration 1 trusts the single-layer sums (two W4 layers, predicted drop 1.51) and misses (measured 2.98);
    # the correction (β = 2) leaves room for one W4 layer, which meets the budget when measured
    first, second = result.iterations
    assert first["missed"] == ["top1-drop ≤ 2.5"] and first["configs"] == {"W4A8": 2, "W8A8": 2}
    assert first["predicted"]["top1_drop"] == pytest.approx(80 * (1 - np.exp(-10 * 0.152 / 80)))
    assert first["measured"]["top1_drop"] == pytest.approx(80 * (1 - np.exp(-10 * 0.304 / 80)))
    assert second["corrections"]["kl_scale"] == pytest.approx(2.0)
    assert second["corrections"]["drop_per_kl"] == pytest.approx(10.0)
    assert second["configs"] == {"W4A8": 1, "W8A8": 3} and not second["missed"]
    assert result.status == "met" and result.measured["top1_drop"] <= 2.5
    assert len(calls) == 3  # reference + two candidates
    assert any("missed: top1-drop ≤ 2.5" in line for line in lines)


def test_latency_that_does_not_drop_on_the_backend_is_reported_infeasible():
    table = _table()
    evaluate, _ = _fake_backend(table, interaction=1.0, latency_saves=False)
    with pytest.raises(Infeasible, match=r"budget latency ≤ 0.9x cannot be met.*save no time.*after 1 measured"):
        search(table, [Budget.parse("latency=0.9x")], evaluate)
    # with a backend that does speed up, the same budget is met at once
    evaluate, _ = _fake_backend(table, interaction=1.0, latency_saves=True)
    result = search(table, [Budget.parse("latency=0.9x")], evaluate)
    assert result.status == "met" and result.measured["latency_ratio"] <= 0.9 and len(result.iterations) == 1


def test_budgets_that_cannot_be_met_name_the_tightest():
    table = _table()
    with pytest.raises(Infeasible, match=r"budget bytes ≤ 0.1x cannot be met"):
        search(table, [Budget.parse("bytes=0.1x"), Budget.parse("kl=1")])
    with pytest.raises(Infeasible, match=r"tightest is kl ≤ 0.01 "):
        search(table, [Budget.parse("bytes=0.75x"), Budget.parse("kl=0.01")])


def test_accuracy_model_is_linear_when_small_and_saturates():
    assert predicted_drop(0.01, 10.0, 80.0) == pytest.approx(0.1, rel=1e-3)
    assert 79.9 < predicted_drop(100.0, 10.0, 80.0) <= 80.0  # never more than everything
    assert linear_drop(predicted_drop(0.3, 10.0, 80.0), 80.0) == pytest.approx(3.0)
    kl = np.array([0.1, 0.2, 0.4])
    assert fit_drop_per_kl(kl, predicted_drop(kl, 7.0, 70.0), 70.0) == pytest.approx(7.0)
    assert fit_drop_per_kl(kl, -kl, 70.0) == 0.0  # accuracy that rose is not a negative sensitivity


def test_reprice_swaps_latency_and_energy_only():
    from hyfx.mixed import reprice

    class Halves:
        source = "roofline:fake"

        def layer_latency(self, layer, config):
            return 0.5 if config.w_bits == 4 else 1.0

        def fixed_latency(self):
            return 2.0

    table, rtx = _table(), PROFILES["rtx3080"]
    priced = reprice(table, Halves(), rtx)
    assert priced.entry("l1", W4).latency == 0.5 and priced.entry("l1", W4).energy == rtx.energy(0.5)
    assert priced.entry("l1", W4).kl == table.entry("l1", W4).kl and priced.fixed["latency"] == 2.0
    assert priced.latency_source == "roofline:fake" and table.entry("l1", W4).latency == 0.8  # original untouched


def test_collapse_pruning_fixes_a_layer_to_a8():
    a4 = BitConfig(8, 4)
    layers = ["a", "b"]
    entries = {}
    for layer in layers:
        for c in (W8, a4, BitConfig(4, 4)):
            collapsed = layer == "b" and c.a_bits == 4
            entries[(layer, c.name)] = Entry(layer, c.name, 0.1, 40.0 if collapsed else 79.0, 90.0, 1.0, 1.0, 1.0)
    table = SensitivityTable("toy", layers, [W8, a4, BitConfig(4, 4)], entries, {"a": "conv", "b": "conv"},
                             {"top1": 80.0}, {"latency": 0, "energy": 0, "bytes": 0}, "x", {})
    pruned = collapse_pruning(table, collapse_drop=10.0)
    assert set(pruned) == {"b/W8A4", "b/W4A4"} and "collapses at A4" in pruned["b/W8A4"]


def test_pareto_front_is_monotone():
    table = _table()
    front = pareto_front(table, "bytes", points=9)
    sizes = [p["predicted"]["bytes"] for p in front]
    kls = [p["predicted"]["kl"] for p in front]
    assert sizes == sorted(sizes) and kls == sorted(kls, reverse=True)
    assert sizes[0] == 200.0 and front[-1]["configs"] == {"W8A8": 4}
    lat = pareto_front(table, "latency", points=5)
    assert lat[0]["predicted"]["latency_ratio"] == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def lite0(sample_images, tmp_path_factory):
    """The real-weight hybrid and its CI-sized table: every layer × {W4A8, W8A8} on 2 calibration + 2 table images."""
    model = zoo.create(REAL)
    config = data_config(model)
    hg = hyfx.analyze(hyfx.capture(model, example_input(config)))
    calib, rest = split(sample_images.without(zoo.training_images(REAL)), 2, seed=3)
    sens, val = split(rest, 2, 4, seed=3)
    loaders = {name: make_loader(images, config, 8) for name, images in
               (("calib", calib), ("sens", sens), ("val", val))}
    table, policies = build_table(hg, loaders["calib"], loaders["sens"], [W4, W8], model=REAL, progress=False)
    paths = table.save(tmp_path_factory.mktemp("table") / "table")
    return hg, loaders, table, policies, paths


def test_real_weight_table_has_every_layer_and_config(lite0):
    hg, loaders, table, policies, paths = lite0
    layers = hg.layers()
    assert table.layers == layers and len(layers) == 76  # 50 conv/linear + the grafted blocks' linears and matmuls
    assert set(table.entries) == {(layer, c.name) for layer in layers for c in (W4, W8)}  # every layer × config
    kl, size = table.matrix("kl"), table.matrix("weight_bytes")
    assert np.isfinite(kl).all() and (kl >= 0).all() and np.isfinite(table.matrix("top1")).all()
    weighted = size[:, 1] > 0  # attention matmuls have no weights: W4A8 and W8A8 are the same for them
    assert weighted.sum() == 68 and (kl[weighted, 0] > kl[weighted, 1]).mean() > 0.9  # 4-bit weights hurt more
    assert (size[weighted, 0] < size[weighted, 1]).all() and (table.matrix("latency") > 0).all()
    assert table.fp32["n_calib"] == 2 and table.fp32["n_eval"] == 2 and table.latency_source == "roofline:cpu"
    # the fast suffix evaluation equals quantizing the whole graph with a one-layer plan
    layer = layers[7]
    x = next(iter(loaders["calib"]))[0]
    with torch.no_grad():
        kl_full = kl_divergence(hg.gm(x), hyfx.quantize(hg, policies.plan({layer: W4}))(x))
    assert table.entry(layer, W4).kl == pytest.approx(kl_full, rel=1e-4)  # batch-size rounding only
    assert SensitivityTable.load(paths["json"]).entries == table.entries and paths["png"].stat().st_size > 0
    assert len(paths["csv"].read_text().splitlines()) == 1 + 2 * len(layers)


def test_real_weight_search_meets_a_bytes_budget_after_quantization(lite0, tmp_path):
    hg, loaders, table, policies, _ = lite0
    layers = hg.layers()
    lines = []
    run = run_hysquant(hg, loaders["calib"], ["bytes=0.7x"], val_loader=loaders["val"], table=table, policies=policies,
                       model=REAL, report=lines.append, progress=False)
    plan = hyfx.load_plan(hyfx.save_plan(run.plan, tmp_path / "plan.json"))
    measured = model_bytes(hyfx.quantize(hg, plan))
    reference = run.result.reference["bytes"]  # measured on the all-W8A8 model by the search
    assert reference == pytest.approx(table.totals({layer: W8 for layer in layers})["bytes"])
    assert measured <= 0.7 * reference  # the budget holds on the quantized model, not just in the table
    assert measured == pytest.approx(run.result.predicted["bytes"])
    bits = {p.weight.bits for p in plan.layers.values() if p.weight is not None}
    assert bits == {4, 8} and len(plan.layers) == len(layers)
    meta = json.loads((tmp_path / "plan.json").read_text())["meta"]["search"]
    assert meta["status"] == "met" and meta["iterations"][-1]["measured"]["bytes"] == measured
    assert meta["iterations"][-1]["measured"]["n_val"] == 4 and lines[0].startswith("reference (all W8A8)")
    # the registered recipe (calibration images only: KL and bytes) gives a plan under its budget too
    recipe_plan = hyfx.recipes.get("hysquant")(hg, loaders["calib"], budgets=["bytes=0.8x"], table=table,
                                                  policies=policies, progress=False)
    assert model_bytes(hyfx.quantize(hg, recipe_plan)) <= 0.8 * reference


def test_cli_search_reuses_a_table_and_writes_plan_and_fronts(lite0, capsys, tmp_path, sample_images):
    from hyfx import cli

    _, _, _, _, paths = lite0
    out, front = tmp_path / "plan.json", tmp_path / "front.json"
    code = cli.main(["search", REAL, "--calib", str(sample_images.root), "--table", str(paths["json"]),
                     "--configs", "W4A8,W8A8", "--budget", "bytes=0.75x", "--n-calib", "2", "--n-eval", "0",
                     "--n-val", "0", "--out", str(out), "--front", str(front)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "reusing sensitivity table" in text and "bytes ≤ 0.75x: met (measured)" in text
    saved = json.loads(out.read_text())
    assert saved["model"] == REAL and len(saved["meta"]["calibration"]["images"]) == 2
    fronts = json.loads(front.read_text())["fronts"]
    assert set(fronts) == {"latency", "bytes"} and front.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("argv, needle", [
    (["--budget", "speed=2"], "bad budget 'speed=2'"),
    (["--budget", "bytes=1x", "--configs", "W4A9"], "unsupported bit-width 9"),
    ([], "give at least one --budget"),
])
def test_cli_search_bad_input_is_one_line(capsys, argv, needle):
    from hyfx import cli

    code = cli.main(["search", "lite0-real", "--calib", "/nonexistent", *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_ort_timer_measures_plans_on_int8_kernels(lite0):
    """The feedback loop's latency from ONNX Runtime: each plan exported as QDQ and timed against all-W8A8."""
    hg, loaders, table, policies, _ = lite0
    run = run_hysquant(hg, loaders["calib"], ["bytes=0.8x"], table=table, policies=policies, timer=OrtTimer,
                       model=REAL, progress=False)
    measured = run.result.iterations[-1]["measured"]
    assert run.result.status == "met" and measured["latency_source"] == "measured:ort-cpu-int8"
    # a mix of 4- and 8-bit weights: its ratio to the all-W8A8 session timed in the same loop
    assert {p.weight.bits for p in run.plan.layers.values() if p.weight is not None} == {4, 8}
    assert 0 < measured["reference_latency_s"] < 1 and 0.3 < measured["latency_ratio"] < 5
