"""Probes of the grafted attention in the zoo hybrids (`hyfx.hybrid`): how much each model uses it.

- `attention_removed`: every grafted attention contributes 0 (the acceptance bar's ablation);
- `separable_context_frozen`: MobileViTv2's context vector held at its mean, so only what the attention carries
  across tokens is lost;
- `attention_entropy`: how peaked the attention rows are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.models.efficientformer_v2 import Downsample, EfficientFormerV2Block
from timm.models.mobilevit import LinearSelfAttention, LinearTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from hyfx.errors import HyfxError
from hyfx.hybrid import grafted_blocks


class _NoAttention(nn.Module):
    """Stands in for an attention: contributes nothing (a zero that broadcasts to any residual it is added to)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x.new_zeros(())


def _attention_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every attention inside the grafted blocks."""
    slots = []
    for _, block in grafted_blocks(model):
        for m in block.modules():
            if isinstance(m, (Block, LinearTransformerBlock)):
                slots.append((m, "attn"))
            elif isinstance(m, EfficientFormerV2Block) and m.token_mixer is not None:
                slots.append((m, "token_mixer"))
            elif isinstance(m, Downsample) and m.attn is not None:
                slots.append((m, "attn"))
    return slots


@contextmanager
def attention_removed(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, every grafted attention contributes 0 (its block keeps its convs, MLPs and shortcuts)."""
    slots = _attention_slots(model)
    saved = [getattr(m, attr) for m, attr in slots]
    try:
        for m, attr in slots:
            setattr(m, attr, _NoAttention())
        yield model
    finally:
        for (m, attr), attn in zip(slots, saved, strict=True):
            setattr(m, attr, attn)


class _FrozenContext(nn.Module):
    """A separable attention whose context vector is a constant: its value path still runs per token, but the one
    term that carries information across tokens no longer depends on the image."""

    def __init__(self, attn: LinearSelfAttention, context: torch.Tensor):
        super().__init__()
        self.attn, self.context = attn, context

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        value = self.attn.qkv_proj(x)[:, 1 + self.attn.embed_dim :]
        return self.attn.out_proj(F.relu(value) * self.context)


def _context_vector(attn: LinearSelfAttention, x: torch.Tensor) -> torch.Tensor:
    query, key, _ = attn.qkv_proj(x).split([1, attn.embed_dim, attn.embed_dim], dim=1)
    return (key * F.softmax(query, dim=-1)).sum(-1, keepdim=True)


@contextmanager
def separable_context_frozen(
    model: nn.Module, batches: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], object] | None = None
) -> Iterator[nn.Module]:
    """Within the context, every grafted MobileViTv2 attention uses its mean context vector over `batches` instead
    of the image's own.

    `attention_removed` takes the value path (a per-token gated MLP) out with the context, so a block built around
    it can lose everything without using any information across tokens; freezing the context costs only what the
    attention carries from other tokens of the same image. `forward` as in `attention_entropy`.
    """
    forward = forward or model
    slots = [m for m, _ in _attention_slots(model) if isinstance(m, LinearTransformerBlock)]
    if not slots:
        raise HyfxError("the model has no grafted MobileViTv2 (separable) attention to freeze")
    sums: list[torch.Tensor | float] = [0.0] * len(slots)
    images = 0

    def record(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            sums[i] = sums[i] + _context_vector(module, args[0]).sum(0, keepdim=True)

        return hook

    handles = [m.attn.register_forward_pre_hook(record(i)) for i, m in enumerate(slots)]
    try:
        with torch.no_grad():
            for x in batches:
                forward(x)
                images += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if not images:
        raise HyfxError("no batches to average the context vectors over: pass at least one image")
    saved = [m.attn for m in slots]
    try:
        for m, total in zip(slots, sums, strict=True):
            m.attn = _FrozenContext(m.attn, total / images)
        yield model
    finally:
        for m, attn in zip(slots, saved, strict=True):
            m.attn = attn


@contextmanager
def _softmax_rows() -> Iterator[list[torch.Tensor]]:
    """Within the context, every softmax output over the last dim is recorded: in these hybrids only attention
    computes one (the EfficientNet part and the head do not)."""
    seen: list[torch.Tensor] = []
    functional, method = F.softmax, torch.Tensor.softmax

    def record(out: torch.Tensor, dim) -> torch.Tensor:
        if dim in (-1, out.dim() - 1):
            seen.append(out.detach())
        return out

    def patched_functional(input, dim=None, *args, **kwargs):
        return record(functional(input, dim, *args, **kwargs), dim)

    def patched_method(self, dim, *args, **kwargs):
        return record(method(self, dim, *args, **kwargs), dim)

    F.softmax, torch.Tensor.softmax = patched_functional, patched_method
    try:
        yield seen
    finally:
        F.softmax, torch.Tensor.softmax = functional, method


@torch.no_grad()
def attention_entropy(
    model: nn.Module, batches: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], object] | None = None
) -> dict:
    """Mean entropy (nats) of the attention rows of all grafted layers, against the uniform entropy log(N).

    `forward` runs a batch through the model (default: `model` itself; a partial forward from cached features works).
    """
    forward = forward or model
    total, count, tokens = 0.0, 0, set()
    for x in batches:
        with _softmax_rows() as rows:
            forward(x)
        for probs in rows:
            ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
            total += ent.sum().item()
            count += ent.numel()
            tokens.add(probs.shape[-1])
    if not count:
        raise HyfxError("the model has no grafted attention layers to measure")
    n = max(tokens)
    return {"mean_entropy": total / count, "uniform_entropy": math.log(n), "tokens": sorted(tokens)}
