"""lite0-vit: EfficientNet-Lite0 with MobileViT blocks grafted in place of later-stage blocks.

MobileViT puts its transformer blocks after the stride-8/16/32 downsampling blocks; here the grafts sit at stride
16 and stride 32 of timm's `tf_efficientnet_lite0`, each replacing a run of inverted-residual blocks whose
input and output channel counts match. Only the grafted blocks are trained (see benchmarks/build_hybrid.py);
everything else keeps the real lite0 weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from timm.layers import ConvNormAct
from timm.models.byobnet import LayerFn
from timm.models.mobilevit import MobileVitBlock
from timm.models.vision_transformer import Attention, Block
from torch import nn

from hyfx.checkpoint import check_state_dict, read_state_dict
from hyfx.errors import HyfxError

HYBRID_ARCH = "tf_efficientnet_lite0+mobilevit"


@dataclass(frozen=True)
class Graft:
    """Replace `blocks[stage][start:stop]` of an EfficientNet by one MobileViT block."""

    stage: int
    start: int
    stop: int
    transformer_dim: int
    depth: int
    heads: int
    patch: int  # patch side; the feature map side must be a multiple so the block never interpolates
    mlp_ratio: float = 2.0

    @property
    def path(self) -> str:
        """Module path of the new block once grafted."""
        return f"blocks.{self.stage}.{self.start}"

    @property
    def replaced(self) -> list[str]:
        """Module paths (in the teacher) of the blocks the new block replaces."""
        return [f"blocks.{self.stage}.{i}" for i in range(self.start, self.stop)]


# lite0 stage 4 runs at stride 16 (112 ch, 14x14 at 224 px) and stage 5 at stride 32 (192 ch, 7x7).
# "last-block" replaces the last residual block of each stage; "two-block" the last two, which leaves more for
# the new block to reproduce from 500 training images (measured: 78.2% top-1 after block-wise distillation
# against last-block's 84.2%, teacher 87.0%).
GRAFT_SETS: dict[str, tuple[Graft, ...]] = {
    "last-block": (
        Graft(stage=4, start=2, stop=3, transformer_dim=96, depth=2, heads=4, patch=2),
        Graft(stage=5, start=3, stop=4, transformer_dim=128, depth=2, heads=4, patch=1),
    ),
    "two-block": (
        Graft(stage=4, start=1, stop=3, transformer_dim=96, depth=2, heads=4, patch=2),
        Graft(stage=5, start=2, stop=4, transformer_dim=128, depth=2, heads=4, patch=1),
    ),
}
DEFAULT_GRAFTS = GRAFT_SETS["last-block"]


def graft_specs(grafts: Sequence[Graft] = DEFAULT_GRAFTS) -> list[dict]:
    """The grafts as plain dicts, for model cards."""
    return [asdict(g) | {"path": g.path, "replaced": g.replaced} for g in grafts]


def grafts_from_specs(specs: Iterable[dict]) -> tuple[Graft, ...]:
    """Inverse of `graft_specs`: the grafts a model card records."""
    fields = Graft.__dataclass_fields__
    try:
        return tuple(Graft(**{k: v for k, v in spec.items() if k in fields}) for spec in specs)
    except TypeError as exc:
        raise HyfxError(f"model card grafts are malformed ({exc}): rebuild it with benchmarks/build_hybrid.py") from exc


def _block_channels(block: nn.Module) -> tuple[int, int]:
    first = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
    last = [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
    return first.in_channels, last.out_channels


def make_mobilevit_block(channels: int, graft: Graft) -> MobileVitBlock:
    """A timm MobileViT block (SiLU like MobileViT) whose fusion conv is linear.

    EfficientNet blocks end in a linear bottleneck (no activation after the projection BN, plus a residual add),
    so the features the next block expects are signed; an activated fusion could not reproduce them.
    """
    act = nn.SiLU
    layers = LayerFn(conv_norm_act=partial(ConvNormAct, act_layer=act), act=act)
    block = MobileVitBlock(
        channels,
        channels,
        kernel_size=3,
        mlp_ratio=graft.mlp_ratio,
        transformer_dim=graft.transformer_dim,
        transformer_depth=graft.depth,
        patch_size=graft.patch,
        num_heads=graft.heads,
        layers=layers,
    )
    block.conv_fusion.bn.act = nn.Identity()
    for module in block.modules():
        if isinstance(module, Attention):
            # explicit q@k^T -> softmax -> @v instead of the fused SDPA kernel, so exported graphs show the
            # softmax and the matmuls that quantization has to handle
            module.fused_attn = False
    return block


def build_hybrid(base: nn.Module, grafts: Sequence[Graft] = DEFAULT_GRAFTS) -> nn.Module:
    """Graft MobileViT blocks into a timm (tf_)efficientnet_lite0, in place; returns the same module.

    The new blocks are randomly initialised; the rest keeps `base`'s weights.
    """
    stages = [g.stage for g in grafts]
    if len(set(stages)) != len(stages):
        raise HyfxError("at most one MobileViT graft per stage: merge the ranges of blocks to replace")
    for graft in grafts:
        stage = base.blocks[graft.stage]
        old = list(stage)
        if not 0 <= graft.start < graft.stop <= len(old):
            raise HyfxError(f"graft blocks {graft.stage}.{graft.start}:{graft.stop} outside a {len(old)}-block stage")
        c_in, c_out = _block_channels(old[graft.start])[0], _block_channels(old[graft.stop - 1])[1]
        if c_in != c_out:
            raise HyfxError(f"graft {graft.replaced} changes channels {c_in}->{c_out}: replace residual blocks only")
        new = make_mobilevit_block(c_in, graft)
        base.blocks[graft.stage] = nn.Sequential(*old[: graft.start], new, *old[graft.stop :])
    return base


def mobilevit_blocks(model: nn.Module) -> list[tuple[str, MobileVitBlock]]:
    """(path, module) of every MobileViT block in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MobileVitBlock)]


def new_blocks_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The grafted blocks' tensors under their full model paths: what the hybrid checkpoint stores."""
    state = {}
    for path, block in mobilevit_blocks(model):
        state.update({f"{path}.{k}": v.detach().clone() for k, v in block.state_dict().items()})
    return state


def load_new_blocks(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a new-blocks-only checkpoint strictly into the grafted blocks of `model`."""
    state = read_state_dict(path)
    check_state_dict(new_blocks_state(model), state, str(path), HYBRID_ARCH)
    for prefix, block in mobilevit_blocks(model):
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        block.load_state_dict(sub, strict=True)
    return model


# ---------------------------------------------------------------------------------------------- attention probes


class _NoAttention(nn.Module):
    """Stands in for a transformer layer's attention: contributes nothing to the residual stream."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(x)


def _transformer_layers(model: nn.Module) -> list[Block]:
    return [m for _, block in mobilevit_blocks(model) for m in block.transformer.modules() if isinstance(m, Block)]


@contextmanager
def attention_removed(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, every grafted transformer layer computes x + mlp(...) with attn(x) replaced by 0."""
    layers = _transformer_layers(model)
    saved = [layer.attn for layer in layers]
    try:
        for layer in layers:
            layer.attn = _NoAttention()
        yield model
    finally:
        for layer, attn in zip(layers, saved, strict=True):
            layer.attn = attn


def _attention_probs(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Recompute the post-softmax attention map [B, heads, N, N] of a timm Attention for input x."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def attention_entropy(
    model: nn.Module, batches: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], object] | None = None
) -> dict:
    """Mean entropy (nats) of the attention rows of all grafted layers, against the uniform entropy log(N).

    `forward` runs a batch through the model (default: `model` itself; a partial forward from cached features works).
    """
    forward = forward or model
    total, count, tokens = 0.0, 0, set()

    def hook(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        nonlocal total, count
        probs = _attention_probs(module, args[0])
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        total += ent.sum().item()
        count += ent.numel()
        tokens.add(probs.shape[-1])

    handles = [layer.attn.register_forward_hook(hook) for layer in _transformer_layers(model)]
    try:
        for x in batches:
            forward(x)
    finally:
        for h in handles:
            h.remove()
    if not count:
        raise HyfxError("the model has no grafted attention layers to measure")
    n = max(tokens)
    return {"mean_entropy": total / count, "uniform_entropy": math.log(n), "tokens": sorted(tokens)}
