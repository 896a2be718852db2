"""`hyfx bench`: one model through the papers' tables, the report beside the published numbers, bad input."""

from __future__ import annotations

import json
import math
import re

import pytest

from hyfx import cli
from hyfx.pipelines.bench import Variant, bench_model, variants
from hyfx.pipelines.bench_report import PAPER_TABLES, load_paper_tables, render


def _row(top1: float, fp32: float, table: str, agreement: float | None = 95.0) -> dict:
    return {"n": 500, "top1": top1, "top5": 95.0, "top1_ci95": (top1 - 3, top1 + 3), "agreement": agreement,
            "agreement_ci95": (agreement - 2, agreement + 2) if agreement else None, "kl": 0.01 if agreement else None,
            "drop_top1": round(fp32 - top1, 2), "plan_seconds": 1.0, "plan_vs_fp32_pass": 0.5, "table": table}


def _fake_result() -> dict:
    rows = {"fp32": {**_row(80.0, 80.0, "fp32", None), "drop_top1": 0.0}}
    for v in variants():
        rows[v.label] = _row(80.0 if v.recipe == "qhyvit" else 78.5, 80.0, v.table)
    return {"model": "toy", "real_weights": True, "images": {"calibration": 32, "evaluation": 500},
            "accuracy": {"fp32_pass_seconds": 2.0, "bits": {"8": rows}},
            "environment": {"cpu": "cpu", "cores": 2}}


def test_paper_tables_name_their_sources():
    paper = load_paper_tables()
    assert PAPER_TABLES.is_file() and paper
    for key, entry in paper.items():
        if key.startswith("_"):
            continue
        for name, table in entry.items():
            if not isinstance(table, dict) or "rows" not in table:
                continue
            assert table.get("source") and table.get("provenance"), (key, name)
            for model, row in table["rows"].items():
                for setting, values in row.items():
                    if setting.startswith("W"):
                        assert all(isinstance(v, (int, float)) and 0 <= v <= 100 for v in values.values()), model


def test_render_puts_published_rows_beside_ours():
    text = render([_fake_result()], load_paper_tables())
    assert "| toy | hyfx, this machine (n=500) | 80.00 |" in text
    assert "80.00 (+0.00)" in text and "-0.00" not in text  # an unchanged top-1 reads +0.00
    assert "78.50 (-1.50)" in text
    assert "MobileViTv1-xxs | Q-HyViT README †" in text and "68.20 (-0.80)" in text
    assert "† Q-HyViT README: authors' README" in text  # the provenance is printed under the table
    assert "not in hyfx" not in text  # every published column (RepQ-ViT, HyQ included) has a hyfx recipe
    assert "RepQ-ViT" in text and "HyQ" in text and "1.85 (-67.15)" in text  # RepQ-ViT's published xxs cell
    assert "No published numbers for this table are available here" in text  # EfficientQuant's Table 1
    assert "one per class" in text  # the evaluation set is described


def test_bench_model_on_real_weights(sample_images):
    rows = [Variant("minmax", "minmax"), Variant("minmax (full)", "minmax", {"full": True}, "full"),
            Variant("minmax + bias correction", "minmax", {"bias_correction": True}, "extension")]
    seen: list[int] = []
    result = bench_model("lite0-real", folder=sample_images.root, n_eval=60, bits=(8,), rows=rows,
                         ort_recipes=("minmax",), runs=3, batches=(1,), threads=2,
                         on_update=lambda r: seen.append(len(r)))
    assert seen and result["images"] == {"calibration": 32, "evaluation": 60, "excluded_training": 0}
    table = result["accuracy"]["bits"]["8"]
    assert 70 <= table["fp32"]["top1"] <= 100  # real ImageNet weights
    assert table["minmax"]["agreement"] >= 90 and table["minmax"]["table"] == "partial"
    assert table["minmax (full)"]["table"] == "full"
    assert table["minmax + bias correction"]["kl"] < table["minmax"]["kl"]  # measured: 0.0076 → 0.0028 on 968
    lo, hi = table["minmax"]["agreement_ci95"]
    assert lo <= table["minmax"]["agreement"] <= hi
    timings = result["ort"]["timings"]
    assert {"ort fp32", "hyfx int8 minmax"} <= set(timings)
    # how many layers stay int8 is decided by timing on this CPU (all of them where VNNI makes int8 pay; size of the
    # all-int8 export: test_backends); whichever it is, the model shrinks and the note says it
    int8, fp32_left = map(int, re.match(r"(\d+) layers int8, (\d+) FP32", result["ort"]["notes"]["hyfx int8 minmax"]).groups())
    assert int8 >= 1 and int8 + fp32_left == 50
    assert timings["hyfx int8 minmax"]["bytes"] < timings["ort fp32"]["bytes"]
    assert math.isclose(timings["ort fp32"]["bs1_x_fp32"], 1.0)
    assert result["ort"]["accuracy"]["hyfx int8 minmax"]["agreement"] >= 90
    json.dumps(result)  # the report is JSON as it stands
    text = render([result])
    assert "| lite0-real | real | hyfx int8 minmax |" in text


def test_bench_skips_accuracy_on_random_weights(sample_images):
    result = bench_model("mobilevit_xxs", folder=sample_images.root, latency=False)
    assert not result["real_weights"] and "accuracy" not in result and "ort" not in result


@pytest.mark.parametrize("argv, needle", [
    (["bench", "lite0-real", "--bits", "9"], "9"),
    (["bench", "not_a_model", "--no-latency"], "unknown model"),
])
def test_bench_cli_bad_input_is_one_line(capsys, argv, needle):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hyfx: error:") and needle in lines[0], err
