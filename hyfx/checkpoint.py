"""Local checkpoints: read a torch.save'd state dict and check it fills an architecture exactly, or say what does not."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from hyfx.errors import HyfxError


def unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: a raw state dict or one nested under 'state_dict' / 'model'."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            # DataParallel / DDP checkpoints prefix every key with "module."
            if all(k.startswith("module.") for k in obj):
                return {k[len("module."):]: v for k, v in obj.items()}
            return dict(obj)
    raise HyfxError(
        f"checkpoint {path} is not a state dict: save model.state_dict() (optionally as {{'state_dict': ...}})"
    )


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def check_state_dict(
    model: torch.nn.Module | Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str, arch: str
) -> None:
    """Raise one HyfxError line if `state` does not fill `model` (or an expected state dict) exactly."""
    expected = model.state_dict() if isinstance(model, torch.nn.Module) else model
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape-mismatched ({_examples(mismatched)})")
    raise HyfxError(f"checkpoint {source} does not match architecture {arch}: " + "; ".join(parts))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local torch.save file (raw, or under 'state_dict' / 'model')."""
    file = Path(path)
    if not file.is_file():
        raise HyfxError(f"checkpoint {path} does not exist: pass a state dict file saved with torch.save")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:  # corrupt / non-torch files
        raise HyfxError(f"cannot read checkpoint {path} ({exc.__class__.__name__}): pass a torch.save'd state dict") from None
    return unwrap_state_dict(obj, str(path))


def load_checkpoint(model: torch.nn.Module, path: str, arch: str) -> torch.nn.Module:
    """Load a local state dict file strictly into `model` (architecture name `arch` is for messages)."""
    state = read_state_dict(path)
    check_state_dict(model, state, str(path), arch)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise HyfxError(f"checkpoint {path} holds NaN or Inf values in {len(bad)} tensors ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): it cannot be calibrated; pass a checkpoint of finite weights")
    model.load_state_dict(state, strict=True)
    return model
