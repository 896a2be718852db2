"""Accuracy of FP32 and quantized models on the same images: top-1, top-5, agreement, KL, per-layer SQNR."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from hyfx.meta import TAGS
from hyfx.quant.calibrate import collect


@dataclass
class Predictions:
    logits: torch.Tensor
    labels: torch.Tensor


def predict(model: torch.nn.Module, loader: Iterable, desc: str = "evaluating", progress: bool = True) -> Predictions:
    logits, labels = [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    with torch.no_grad():
        for images, target in tqdm(loader, desc=desc, total=total, disable=not progress, leave=False):
            logits.append(model(images).float())
            labels.append(torch.as_tensor(target))
    return Predictions(torch.cat(logits), torch.cat(labels))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (100 * (centre - half), 100 * (centre + half))


@dataclass
class Accuracy:
    n: int
    top1: float
    top5: float
    top1_ci95: tuple[float, float]
    agreement: float | None = None  # top-1 agreement with FP32, percent
    kl: float | None = None  # mean KL(P_fp32 ‖ P_quant), nats

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy(pred: Predictions, reference: Predictions | None = None) -> Accuracy:
    labelled = pred.labels >= 0
    n = int(labelled.sum())
    top1_hits = int(topk_correct(pred.logits[labelled], pred.labels[labelled], 1).sum()) if n else 0
    top5_hits = int(topk_correct(pred.logits[labelled], pred.labels[labelled], 5).sum()) if n else 0
    result = Accuracy(n, 100 * top1_hits / n if n else float("nan"), 100 * top5_hits / n if n else float("nan"),
                      wilson_interval(top1_hits, n))
    if reference is not None:
        result.agreement = 100 * float((pred.logits.argmax(1) == reference.logits.argmax(1)).float().mean())
        result.kl = kl_divergence(reference.logits, pred.logits)
    return result


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(P_ref ‖ P) over samples, in nats."""
    log_p = F.log_softmax(reference_logits.double(), dim=1)
    log_q = F.log_softmax(logits.double(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())


def compare(fp32: torch.nn.Module, quantized: dict[str, torch.nn.Module], loader: Iterable,
            progress: bool = True) -> dict[str, Accuracy]:
    """FP32 and each quantized model on the same images; quantized entries carry agreement and KL."""
    loader = list(loader)  # decode the images once for every model
    reference = predict(fp32, loader, desc="fp32", progress=progress)
    results = {"fp32": accuracy(reference)}
    for name, model in quantized.items():
        results[name] = accuracy(predict(model, loader, desc=name, progress=progress), reference)
    return results


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = (reference.double() - test.double()).pow(2).sum()
    signal = reference.double().pow(2).sum()
    return float(10 * torch.log10(signal / noise.clamp_min(1e-30)))


def per_layer_sqnr(float_gm: fx.GraphModule, quant_gm: fx.GraphModule, layers: list[str], loader: Iterable,
                   max_batches: int = 2) -> dict[str, float]:
    """SQNR (dB) of each named layer's output, quantized graph vs float graph, on the same images.

    Errors accumulate: a layer's SQNR includes everything quantized upstream of it.
    """
    def node_names(gm: fx.GraphModule) -> dict[str, str]:
        return {n.meta[TAGS]["name"]: n.name for n in gm.graph.nodes
                if TAGS in n.meta and n.meta[TAGS]["kind"] != "quant"}

    float_names, quant_names = node_names(float_gm), node_names(quant_gm)
    layers = [layer for layer in layers if layer in float_names and layer in quant_names]
    ref = collect(float_gm, [float_names[layer] for layer in layers], loader, max_batches, progress=False)
    got = collect(quant_gm, [quant_names[layer] for layer in layers], loader, max_batches, progress=False)
    return {layer: sqnr_db(ref[float_names[layer]], got[quant_names[layer]]) for layer in layers}


@dataclass
class Parity:
    """A runtime's output of an exported model vs the PyTorch graph it was lowered from (and vs FP32); `top1_ort` is
    the runtime's top-1 (the name predates other runtimes)."""

    n: int
    agreement: float  # top-1 agreement with the PyTorch quantized graph, percent
    max_abs_diff: float  # largest |logit difference| to the PyTorch quantized graph
    top1_ort: float
    top1_torch: float
    top1_fp32: float | None = None
    agreement_fp32: float | None = None
    runtime: str = "ORT"  # where the lowered model ran

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"{self.runtime} vs PyTorch quantized on {self.n} images: top-1 agreement {self.agreement:.2f}%, "
                f"max |Δlogit| {self.max_abs_diff:.4g}; top-1 {self.runtime} {self.top1_ort:.2f}% / "
                f"PyTorch {self.top1_torch:.2f}%")
        if self.top1_fp32 is not None:
            text += f" / FP32 {self.top1_fp32:.2f}% (agreement with FP32 {self.agreement_fp32:.2f}%)"
        return text


def logits(module, loader: Iterable) -> torch.Tensor:
    """A model's logits over a loader, to compare several lowered models against one reference run."""
    with torch.no_grad():
        return torch.cat([module(images).float() for images, _ in loader])


def runtime_parity(run, reference, loader: Iterable, fp32=None, runtime: str = "ORT") -> Parity:
    """`run(images) → logits` (a lowered model in its runtime) against `reference` (the PyTorch quantized graph, or
    its logits over `loader`) on the same images, and against `fp32` when given."""
    loader = list(loader)
    labels = torch.cat([torch.as_tensor(target) for _, target in loader])
    got = Predictions(torch.cat([run(images) for images, _ in loader]), labels)
    want = Predictions(reference if isinstance(reference, torch.Tensor) else logits(reference, loader), labels)
    acc = accuracy(got, want)
    result = Parity(len(labels), acc.agreement, float((got.logits - want.logits).abs().max()), acc.top1,
                    accuracy(want).top1, runtime=runtime)
    if fp32 is not None:
        fp32_pred = Predictions(fp32 if isinstance(fp32, torch.Tensor) else logits(fp32, loader), labels)
        result.top1_fp32 = accuracy(fp32_pred).top1
        result.agreement_fp32 = accuracy(got, fp32_pred).agreement
    return result
