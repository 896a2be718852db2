"""Split a convolution's outlier weights into a second convolution, so low-bit weights keep their resolution.

A per-output-channel weight scale is max|w| / qmax. When a row holds a few weights far larger than the rest,
the rest round to a handful of codes: the grafted MobileViT blocks of lite0-vit-real learned their fusion
conv (3×3 over [shortcut, transformer output]) as ≈1.4 × identity on the shortcut plus weights of σ ≈ 0.04,
so at 6 bits (scale 1.4/31 ≈ 0.045) almost every non-identity weight became 0 or ±1 code; keeping those two
convs' weights in float alone took KL(FP32‖W6A6) from 0.053 to 0.041 (150 images).

conv(x, W) = conv(x, W − O) + conv(x, O) exactly, for O the outliers. Each conv is then quantized with its own
per-channel scales: the rest at max|W − O| (16-35× finer there), O with one or a few weights per row
(exact or nearly). Where the outliers sit only on the kernel centre, O runs as a 1×1 conv (1/k² of the cost).
A following inference BatchNorm stays on the rest conv (so it still folds) and O is scaled by its γ/σ,
the add placed after it: BN(a + b) = BN(a) + (γ/σ)·b. The new conv is named ``<conv>.outliers``.
In the spirit of outlier channel splitting (Zhao et al., ICML 2019) and LLM.int8's outlier decomposition.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.meta import OUTLIER_FRAME, SPLIT_OUTLIERS
from hyfx.ops import batchnorm_factor, getattr_path, module_stack, sole_batchnorm, weight_arg

aten = torch.ops.aten
_CONV_DEFAULTS = (None, [1, 1], [0, 0], [1, 1], 1)  # bias, stride, padding, dilation, groups
_MIN_ROW = 32  # a row's spread is measured robustly; depthwise rows (9 weights) are too short to tell


def outlier_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Weights more than `threshold` robust standard deviations (1.4826 × median absolute deviation) from
    their output channel's median. Rows with no spread (mostly zeros: pruned, or already split) have none."""
    rows = weight.detach().flatten(1)
    median = rows.median(1, keepdim=True).values
    spread = 1.4826 * (rows - median).abs().median(1, keepdim=True).values
    return (((rows - median).abs() > threshold * spread) & (spread > 0)).reshape(weight.shape)


def _conv_args(node: fx.Node) -> list:
    """bias, stride, padding, dilation, groups of an aten.conv2d node, defaults filled in."""
    names = ("bias", "stride", "padding", "dilation", "groups")
    given = [node.args[2 + i] if len(node.args) > 2 + i else node.kwargs.get(k, d)
             for i, (k, d) in enumerate(zip(names, _CONV_DEFAULTS, strict=True))]
    return [list(a) if isinstance(a, (list, tuple)) else a for a in given]


def _centre_only(mask: torch.Tensor, padding: list, dilation: list) -> bool:
    kh, kw = mask.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or list(padding) != [dilation[0] * (kh // 2), dilation[1] * (kw // 2)]:
        return False
    off = mask.clone()
    off[..., kh // 2, kw // 2] = False
    return not off.any()


def _layer_path(node: fx.Node) -> str:
    frames = module_stack(node)
    return frames[-1][0] if frames else node.name


def _find(gm: fx.GraphModule, threshold: float, min_gain: float) -> list[tuple[fx.Node, torch.Tensor, dict]]:
    """(conv, outlier mask, report) for every conv `split_weight_outliers` splits; reads the graph only."""
    if threshold <= 0 or min_gain < 1:
        raise HyfxError(f"split_weight_outliers: threshold {threshold} must be > 0 and min_gain {min_gain} ≥ 1")
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.conv2d.default or weight_arg(node) is None:
            continue
        weight = getattr_path(gm, weight_arg(node).target).detach()
        _, _, padding, dilation, groups = _conv_args(node)
        if groups != 1 or weight[0].numel() < _MIN_ROW:
            continue
        mask = outlier_mask(weight, threshold)
        if not mask.any():
            continue
        rest = torch.where(mask, torch.zeros_like(weight), weight)
        gain = float((weight.flatten(1).abs().amax(1) / rest.flatten(1).abs().amax(1).clamp_min(1e-12)).median())
        if gain >= min_gain:
            kernel = [1, 1] if _centre_only(mask, padding, dilation) else list(weight.shape[-2:])
            found.append((node, mask, {"outliers": int(mask.sum()), "range_gain": round(gain, 2), "kernel": kernel}))
    return found


def outlier_convs(gm: fx.GraphModule, threshold: float = 16.0, min_gain: float = 2.0) -> dict[str, dict]:
    """The convs `split_weight_outliers` would split (layer path → outlier count, range gain, kernel)."""
    return {_layer_path(node): report for node, _, report in _find(gm, threshold, min_gain)}


def split_weight_outliers(gm: fx.GraphModule, threshold: float = 16.0, min_gain: float = 2.0) -> fx.GraphModule:
    """A copy of a captured graph in which every conv whose outliers (see `outlier_mask`) shrink its rows'
    weight range at least `min_gain`× (median over output channels) runs as conv(W − O) + conv(O).

    `gm.meta[SPLIT_OUTLIERS]` records the threshold and, per split conv, the outlier count, the
    range gain and the outlier conv's kernel; the outputs equal the original graph's (up to float rounding).
    """
    gm = copy.deepcopy(gm)
    done: dict[str, dict] = {}
    for node, mask, report in _find(gm, threshold, min_gain):
        weight_node = weight_arg(node)
        if any(u is not node for u in weight_node.users):  # writing the rest would change the other users
            raise HyfxError(f"split_weight_outliers: the weight of {node.name} is shared by several ops; "
                            "pass a model without tied conv weights")
        weight = getattr_path(gm, weight_node.target).detach()
        _, stride, padding, dilation, _ = _conv_args(node)
        outliers = torch.where(mask, weight, torch.zeros_like(weight))
        if report["kernel"] == [1, 1] and list(weight.shape[-2:]) != [1, 1]:  # centre taps only: run as 1×1
            kh, kw = weight.shape[-2:]
            outliers, padding = outliers[..., kh // 2:kh // 2 + 1, kw // 2:kw // 2 + 1], [0, 0]
        anchor = node
        bn = sole_batchnorm(node)
        factor = batchnorm_factor(gm, bn) if bn is not None else None
        if factor is not None:
            anchor, outliers = bn, outliers * factor.reshape(-1, 1, 1, 1)
        getattr_path(gm, weight_node.target).data = torch.where(mask, torch.zeros_like(weight), weight).contiguous()
        buffer = f"_hyfx_outliers_{node.name}"
        gm.register_buffer(buffer, outliers.contiguous())
        with gm.graph.inserting_after(anchor):
            outlier_weight = gm.graph.get_attr(buffer)
        with gm.graph.inserting_after(outlier_weight):
            conv = gm.graph.call_function(aten.conv2d.default,
                                          (node.args[0], outlier_weight, None, stride, padding, dilation, 1))
        with gm.graph.inserting_after(conv):
            total = gm.graph.call_function(aten.add.Tensor, (anchor, conv))
        anchor.replace_all_uses_with(total, delete_user_cb=lambda user, total=total: user is not total)
        path = _layer_path(node)
        stack = dict(node.meta.get("nn_module_stack") or {})
        stack[OUTLIER_FRAME] = (f"{path}.outliers", "hyfx.passes.split_outliers.OutlierConv")
        conv.meta.update(nn_module_stack=stack, val=node.meta.get("val"))
        total.meta.update(nn_module_stack=dict(anchor.meta.get("nn_module_stack") or {}), val=anchor.meta.get("val"))
        done[path] = report
    gm.graph.lint()
    gm.recompile()
    gm.meta[SPLIT_OUTLIERS] = {"threshold": threshold, "min_gain": min_gain, "layers": done}
    return gm
