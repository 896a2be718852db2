"""Bad input through the CLI, as a new user makes it: exit code 2 (130 for Ctrl-C), one line on stderr that names the
problem and what to do, no traceback, and no output file left behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import hyfx
from hyfx import cli

TINY = "test_efficientnet"  # a timm test model: builds and captures in about a second


def _bad(capsys, argv: list[str], needle: str, code: int = 2, leaves: tuple = ()) -> str:
    got = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]  # no bars
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("hyfx: "), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    for path in leaves:
        assert not path.exists(), path
    print(f"\nBAD INPUT {' '.join(str(a) for a in argv)[:150]}\n  -> {lines[0]}")  # the answers, for -s
    return lines[0]


@pytest.fixture
def images(tmp_path, sample_images):
    """A folder of 6 real sample images with a labels.csv, to break in different ways."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = ["file,class_index"]
    for path, label in list(zip(sample_images.files, sample_images.labels, strict=True))[:6]:
        shutil.copy(path, folder / path.name)
        rows.append(f"{path.name},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _quantize(folder, out, *flags) -> list:
    return ["quantize", "lite0-real", "--recipe", "minmax", "--calib", folder, "--n-calib", "4", "--out", out, *flags]


def _tiny(tmp_path, images) -> list:
    return ["quantize", TINY, "--checkpoint", tmp_path / "w.pth", "--calib", images, "--n-calib", "2", "--out",
            tmp_path / "p.json"]


@pytest.fixture
def plan_file(capsys, tmp_path, images):
    out = tmp_path / "plan.json"
    assert cli.main([str(a) for a in _quantize(images, out)]) == 0
    capsys.readouterr()
    return out


# ------------------------------------------------------------------------------------------- image folders


def test_missing_folder(capsys, tmp_path):
    _bad(capsys, _quantize(tmp_path / "nope", tmp_path / "p.json"), "does not exist", leaves=(tmp_path / "p.json",))


def test_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _bad(capsys, _quantize(tmp_path / "empty", tmp_path / "p.json"), "holds no images")


def test_corrupt_image(capsys, tmp_path, images):
    for path in images.glob("*.JPEG"):
        path.write_bytes(b"not a jpeg")
    _bad(capsys, _quantize(images, tmp_path / "p.json"), "cannot read image", leaves=(tmp_path / "p.json",))


@pytest.mark.parametrize(("row", "needle"), [
    ("{name},three", "is not an integer"),
    ("{name},-4", "is negative"),
    ("missing.JPEG,3", "'missing.JPEG' is not in"),
    ("{name},", "is not an integer"),
])
def test_broken_labels_csv_rows(capsys, tmp_path, images, row, needle):
    csv = images / "labels.csv"
    lines = csv.read_text().splitlines()
    name = lines[1].split(",")[0]
    csv.write_text("\n".join([lines[0], row.format(name=name), *lines[2:]]) + "\n")
    line = _bad(capsys, _quantize(images, tmp_path / "p.json"), needle)
    assert "labels.csv line 2" in line


def test_labels_csv_without_its_columns(capsys, tmp_path, images):
    (images / "labels.csv").write_text("name,label\na.JPEG,1\n")
    _bad(capsys, _quantize(images, tmp_path / "p.json"), "must have columns 'file' and 'class_index'")


def test_labels_csv_that_is_not_text(capsys, tmp_path, images):
    (images / "labels.csv").write_bytes(b"\xff\xfe\x00\x81" * 50)
    _bad(capsys, _quantize(images, tmp_path / "p.json"), "labels.csv")


def test_class_index_beyond_the_classifier(capsys, tmp_path, images, plan_file):
    csv = images / "labels.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0]] + [f"{line.split(',')[0]},1500" for line in lines[1:]]) + "\n")
    _bad(capsys, ["eval", "lite0-real", "--plan", plan_file, "--data", images], "beyond lite0-real's 1000 classes")


def test_images_missing_from_labels_csv_are_reported(caplog, tmp_path, images):
    lines = (images / "labels.csv").read_text().splitlines()
    (images / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert len(hyfx.data.load_image_folder(images)) == 5
    assert "1 images in" in caplog.text and "not in labels.csv" in caplog.text


def test_separate_calibration_folder_is_used_whole(capsys, tmp_path, images):
    out = tmp_path / "p.json"
    assert cli.main([str(a) for a in _quantize(images, out)[:-4] + ["--n-calib", "6", "--out", out]]) == 0
    assert len(hyfx.load_plan(out).meta["calibration"]["images"]) == 6
    _bad(capsys, _quantize(images, tmp_path / "q.json")[:-4] + ["--n-calib", "7", "--out", tmp_path / "q.json"],
         "lower --n-calib")


def test_zero_calibration_images(capsys, tmp_path, images):
    _bad(capsys, _quantize(images, tmp_path / "p.json")[:-4] + ["--n-calib", "0", "--out", tmp_path / "p.json"],
         "at least one image")


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("flags", "needle"), [
    (["--bits", "9"], "unsupported bit-width 9"),
    (["--bits", "1"], "unsupported bit-width 1"),
    (["--w-bits", "0"], "unsupported bit-width 0"),
    (["--target", "tensorrt", "--bits", "6"], "runs int8 only"),
    (["--target", "openvino", "--a-bits", "4"], "runs int8 only"),
    (["--edge-bits", "8"], "option of the qhyvit recipe"),
    (["--adaround", "0"], "positive number of steps"),
    (["--learn-activations", "0"], "positive number of steps"),
    (["--reconstruct-blocks", "0"], "positive number of steps"),
    (["--adaround", "--reconstruct-blocks"], "give one of them"),
    (["--split-outliers", "-1"], "positive number of standard deviations"),
])
def test_bad_quantize_options_fail_before_any_work(capsys, tmp_path, images, flags, needle):
    _bad(capsys, _quantize(images, tmp_path / "p.json", *flags), needle, leaves=(tmp_path / "p.json",))


def test_unknown_model(capsys, tmp_path, images):
    _bad(capsys, ["quantize", "no_such_model_v9", "--calib", images, "--n-calib", "2", "--out", tmp_path / "p.json"],
         "no_such_model_v9")


def test_a_plan_the_target_cannot_run(capsys, tmp_path, images):
    _bad(capsys, ["quantize", TINY, "--recipe", "efficientquant", "--target", "openvino", "--calib", images,
                  "--n-calib", "2", "--out", tmp_path / "p.json"], "openvino cannot run", leaves=(tmp_path / "p.json",))


# ------------------------------------------------------------------------------------------- checkpoints


def test_missing_checkpoint(capsys, tmp_path, images):
    _bad(capsys, _tiny(tmp_path, images), "does not exist")


def test_corrupt_checkpoint(capsys, tmp_path, images):
    (tmp_path / "w.pth").write_bytes(b"garbage" * 100)
    _bad(capsys, _tiny(tmp_path, images), "cannot read checkpoint")


def test_checkpoint_of_another_architecture(capsys, tmp_path, images):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "w.pth")
    _bad(capsys, _tiny(tmp_path, images), "does not match architecture")


def test_checkpoint_with_nan_weights(capsys, tmp_path, images):
    import timm

    state = timm.create_model(TINY).state_dict()
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, tmp_path / "w.pth")
    _bad(capsys, _tiny(tmp_path, images), "NaN or Inf")


# ------------------------------------------------------------------------------------------- plans


def test_missing_plan(capsys, tmp_path, images):
    _bad(capsys, ["eval", "lite0-real", "--plan", tmp_path / "p.json", "--data", images], "does not exist")


def test_plan_that_is_not_json(capsys, tmp_path, images):
    (tmp_path / "p.json").write_text("{not json")
    _bad(capsys, ["eval", "lite0-real", "--plan", tmp_path / "p.json", "--data", images], "not valid JSON")


def _first_weight(data: dict) -> dict:
    return next(p["weight"] for p in data["layers"].values() if p["weight"])


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d.pop("recipe"), "lacks its 'recipe' field"),
    (lambda d: d.update(format=99), "plan format 99"),
    (lambda d: _first_weight(d).update(bits="eight"), "'eight' is not an integer"),
    (lambda d: _first_weight(d).update(granularity="row"), "unknown granularity 'row'"),
    (lambda d: _first_weight(d).pop("scale"), "lacks scale"),
    (lambda d: _first_weight(d).update(scale="big"), "is not a list of numbers"),
    (lambda d: d.update(layers=[1, 2]), "'layers' [1, 2] is not an object"),
])
def test_plan_edited_by_hand(capsys, tmp_path, images, plan_file, edit, needle):
    data = json.loads(plan_file.read_text())
    edit(data)
    plan_file.write_text(json.dumps(data))
    _bad(capsys, ["eval", "lite0-real", "--plan", plan_file, "--data", images], needle)


def test_plan_of_another_model(capsys, tmp_path, images, plan_file):
    _bad(capsys, ["eval", "lite0-vit-real", "--plan", plan_file, "--data", images], "was made for lite0-real")


def test_zero_evaluation_images_names_n_eval(capsys, tmp_path, images, plan_file):
    _bad(capsys, ["eval", "lite0-real", "--plan", plan_file, "--data", images, "--n-eval", "0"], "--n-eval 0")


# ------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(("flags", "needle"), [
    ([], "give at least one --budget"),
    (["--budget", "speed=fast"], "bad budget"),
    (["--budget", "bytes=0.5x", "--configs", ","], "--configs is empty"),
    (["--budget", "bytes=0.5x", "--configs", "W9A8"], "9"),
])
def test_bad_search_budgets(capsys, tmp_path, images, flags, needle):
    _bad(capsys, ["search", "lite0-real", "--calib", images, *flags, "--out", tmp_path / "p.json"], needle,
         leaves=(tmp_path / "p.json",))


# ------------------------------------------------------------------------------------------- outputs


def test_output_in_a_folder_that_cannot_be_written(capsys, tmp_path, images):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "file").write_text("")
    _bad(capsys, _quantize(images, locked / "file" / "p.json"), "is a file, not a folder")


def test_output_that_is_a_folder(capsys, tmp_path, images):
    _bad(capsys, _quantize(images, tmp_path), "is a folder")


def test_missing_output_folder_is_created(tmp_path, images):
    out = tmp_path / "new" / "deeper" / "p.json"
    assert cli.main([str(a) for a in _quantize(images, out)]) == 0 and out.is_file()


def test_openvino_export_needs_an_xml_name(capsys, tmp_path, plan_file):
    _bad(capsys, ["export", "lite0-real", "--plan", plan_file, "--target", "openvino", "--out", tmp_path / "m.onnx"],
         ".xml + .bin", leaves=(tmp_path / "m.onnx",))


def test_interrupted_run_leaves_nothing_and_keeps_a_good_plan(capsys, monkeypatch, tmp_path, images, plan_file):
    good = plan_file.read_text()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hyfx, "make_plan", interrupt)
    _bad(capsys, _quantize(images, plan_file), "interrupted, nothing written", code=130)
    assert plan_file.read_text() == good
    assert [p.name for p in plan_file.parent.iterdir() if p.name.startswith(".")] == []


def test_save_interrupted_mid_write_keeps_the_previous_file(monkeypatch, tmp_path, plan_file):
    good = plan_file.read_text()
    plan = hyfx.load_plan(plan_file)
    monkeypatch.setattr(type(plan), "to_json", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        hyfx.save_plan(plan, plan_file)
    assert plan_file.read_text() == good


# ------------------------------------------------------------------------------------------- Python API


def test_capture_with_an_input_of_the_wrong_rank_names_the_shape():
    import timm

    with pytest.raises(hyfx.HyfxError, match=r"cannot run on an input of shape \(3, 224, 224\).*expects \(batch, 3"):
        hyfx.capture(timm.create_model(TINY), torch.randn(3, 224, 224))


def test_a_model_that_cannot_be_captured_is_one_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on values, in forward itself
                return x * 2
            return x

    with pytest.raises(hyfx.HyfxError, match="cannot trace DataDependent.*make it static") as info:
        hyfx.capture(DataDependent(), torch.randn(1, 3, 8, 8))
    assert "\n" not in str(info.value)
