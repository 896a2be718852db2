"""Image folders: both layouts, disjoint seeded splits, and one-line errors."""

from __future__ import annotations

import pytest
from PIL import Image

from hyfx.data import load_image_folder, make_loader, split, verify_images
from hyfx.errors import HyfxError


def _image(path, colour=(200, 10, 10)):
    Image.new("RGB", (40, 30), colour).save(path)


def test_class_subfolders_are_indexed_in_sorted_order(tmp_path):
    for cls in ("zebra", "ant"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _image(tmp_path / cls / f"{i}.png")
    images = load_image_folder(tmp_path)
    assert len(images) == 6
    assert images.labels == (0, 0, 0, 1, 1, 1)  # "ant" < "zebra"
    assert images.names()[0] == "ant/0.png"


def test_flat_folder_with_labels_csv_and_without(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        _image(tmp_path / name)
    unlabelled = load_image_folder(tmp_path)
    assert unlabelled.labels == (-1, -1)
    (tmp_path / "labels.csv").write_text("file,class_index\na.jpg,7\nb.jpg,3\n")
    labelled = load_image_folder(tmp_path)
    assert labelled.labels == (7, 3)
    config = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "crop_mode": "center"}
    images, labels = next(iter(make_loader(labelled, config, batch_size=2)))
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [7, 3]


def test_split_is_disjoint_seeded_and_checked(sample_images):
    calib, evaluation = split(sample_images, 32, 200, seed=3)
    assert len(calib) == 32 and len(evaluation) == 200
    assert not set(calib.names()) & set(evaluation.names())
    assert split(sample_images, 32, 200, seed=3)[0].names() == calib.names()
    assert split(sample_images, 32, 200, seed=4)[0].names() != calib.names()
    assert len(sample_images.without(calib.names())) == len(sample_images) - 32
    assert sample_images.only(calib.names()).names() == calib.names()
    with pytest.raises(HyfxError, match="leaves no evaluation images"):
        split(calib, 32)
    with pytest.raises(HyfxError, match="at least one image"):
        split(calib, 0)


def test_bad_folders_give_one_line_errors(tmp_path):
    with pytest.raises(HyfxError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(HyfxError, match="holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(HyfxError, match="cannot read image .*broken.jpg") as info:
        verify_images(load_image_folder(tmp_path))
    assert "\n" not in str(info.value)
