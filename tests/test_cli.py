"""The command line: the main job end to end, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from hyfx import cli, zoo


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hyfx: error:"), err
    assert needle in lines[0], lines[0]


def test_inspect_prints_blocks_and_bridges(capsys, tmp_path):
    dot, png = tmp_path / "g.dot", tmp_path / "g.png"
    code, out, _ = _run(capsys, "inspect", "mobilevit_xxs", "--graph", str(dot), str(png), "--json",
                        str(tmp_path / "g.json"))
    assert code == 0
    assert "9 CNN blocks, 3 Transformer blocks, 3 bridge blocks" in out
    assert "stages.2.1.conv_kxk.conv → stages.2.1.conv_1x1" in out
    assert dot.read_text().startswith("digraph") and png.stat().st_size > 1000
    data = json.loads((tmp_path / "g.json").read_text())
    assert len(data["bridges"]) == 3


def test_quantize_then_eval_on_real_weights(capsys, tmp_path, sample_images):
    plan = tmp_path / "plan.json"
    code, out, _ = _run(capsys, "quantize", "lite0-real", "--recipe", "minmax", "--calib", str(sample_images.root),
                        "--n-calib", "8", "--bias-correction", "--out", str(plan))
    assert code == 0 and plan.is_file(), out
    saved = json.loads(plan.read_text())
    assert saved["model"] == "lite0-real" and len(saved["meta"]["calibration"]["images"]) == 8
    assert saved["meta"]["calibration"]["source"] == "held-out"
    assert saved["meta"]["bias_correction"]["n_images"] == 8 and "bias_correction" in saved["layers"]["conv_stem"]
    result = tmp_path / "eval.json"
    code, out, _ = _run(capsys, "eval", "lite0-real", "--plan", str(plan), "--data", str(sample_images.root),
                        "--n-eval", "40", "--json", str(result))
    assert code == 0, out
    assert "fp32" in out and "minmax" in out
    payload = json.loads(result.read_text())
    assert payload["images"] == 40 and payload["results"]["minmax"]["agreement"] is not None


def test_calibration_from_the_hybrids_training_images(capsys, tmp_path, sample_images):
    """The papers' protocol (calibrate on train, evaluate on val) for a zoo hybrid: calibration images come from its
    distillation set only, so none of the held-out images is spent on calibration."""
    plan = tmp_path / "plan.json"
    code, out, _ = _run(capsys, "quantize", "lite0-vit-real", "--recipe", "minmax", "--calib", str(sample_images.root),
                        "--calib-from-training", "--n-calib", "4", "--out", str(plan))
    assert code == 0, out
    calibration = json.loads(plan.read_text())["meta"]["calibration"]
    trained = set(zoo.training_images("lite0-vit-real"))
    assert len(calibration["images"]) == 4 and set(calibration["images"]) <= trained
    assert calibration["source"] == "training"
    code, _, err = _run(capsys, "quantize", "lite0-real", "--calib", str(sample_images.root), "--calib-from-training")
    _one_line_error(code, err, "lite0-real records no training images")
    code, _, err = _run(capsys, "quantize", "lite0-vit-real", "--calib", str(sample_images.root),
                        "--calib-from-training", "--n-calib", "5000")
    _one_line_error(code, err, f"holds {len(trained)} of lite0-vit-real's training images, fewer than the 5000 asked for")


def test_unknown_model(capsys):
    code, _, err = _run(capsys, "inspect", "no_such_model_xyz")
    _one_line_error(code, err, "unknown model 'no_such_model_xyz'")


def test_missing_and_empty_and_corrupt_data(capsys, tmp_path):
    code, _, err = _run(capsys, "quantize", "lite0-real", "--calib", str(tmp_path / "nope"))
    _one_line_error(code, err, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "quantize", "lite0-real", "--calib", str(empty))
    _one_line_error(code, err, "holds no images")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"img{i}.jpg").write_bytes(b"not a jpeg at all")
    code, _, err = _run(capsys, "quantize", "lite0-real", "--calib", str(corrupt), "--n-calib", "2")
    _one_line_error(code, err, "cannot read image")


def test_checkpoint_that_does_not_fit(capsys, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save(torch.nn.Linear(3, 3).state_dict(), bad)
    code, _, err = _run(capsys, "inspect", "mobilevit_xxs", "--checkpoint", str(bad))
    _one_line_error(code, err, str(bad))


def test_bits_outside_range(capsys, sample_images, tmp_path):
    code, _, err = _run(capsys, "quantize", "lite0-real", "--calib", str(sample_images.root), "--bits", "9",
                        "--out", str(tmp_path / "p.json"))
    _one_line_error(code, err, "unsupported bit-width 9")


def test_plan_for_another_model(capsys, tmp_path, sample_images):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": 1, "recipe": "minmax", "model": "mobilevit_xxs", "layers": {}}))
    code, _, err = _run(capsys, "eval", "lite0-real", "--plan", str(plan), "--data", str(sample_images.root))
    _one_line_error(code, err, "was made for mobilevit_xxs")


@pytest.mark.parametrize("name", zoo.list_models())
def test_zoo_entries_have_real_weights_and_are_listed_in_help(name):
    assert zoo.is_real_weights(name)
    subparsers = cli.build_parser()._subparsers._group_actions[0].choices
    assert name in subparsers["quantize"].format_help()


def test_checkpoint_that_fits_is_loaded(capsys, tmp_path):
    torch.manual_seed(1)
    model = zoo.create("mobilevit_xxs")
    good = tmp_path / "good.pth"
    torch.save({"state_dict": model.state_dict()}, good)
    loaded = zoo.create("mobilevit_xxs", checkpoint=str(good))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
    code, out, _ = _run(capsys, "inspect", "mobilevit_xxs", "--checkpoint", str(good))
    assert code == 0 and "3 bridge blocks" in out
