"""HySquant's measurements of whole plans: a plan timer on this CPU, the latency ratio of two plans timed in
alternation, and the evaluator that quantizes an assignment and measures it end to end.

A plan timer (hyfx.hardware.PlanTimer) maps an assignment to seconds; timers that need the graph are built as
`TimerClass(hg, policies, example)` (TorchTimer here; the ONNX Runtime one, which needs a backend, is
hyfx.pipelines.hysquant.OrtTimer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from hyfx.evaluate import accuracy, kl_divergence, predict
from hyfx.graph import HybridGraph, quantize
from hyfx.hardware import Assignment, model_bytes
from hyfx.mixed.sensitivity import Policies
from hyfx.quant.spec import QuantPlan
from hyfx.timing import median, median_time


class TorchTimer:
    """PlanTimer on this CPU: median seconds of one forward (batch 1) of the PyTorch fake-quant model.

    Fake quantization computes in FP32 at every bit-width, so this backend measures the cost of the QDQ
    graph, not of integer kernels (hyfx.pipelines.hysquant.OrtTimer times ONNX Runtime's int8 kernels).
    Subclasses time another runtime by overriding `build` (plan → runnable) and `__call__`.
    """

    backend = "torch-cpu-fakequant"

    def __init__(self, hg: HybridGraph, policies: Policies, example: torch.Tensor, repeats: int = 9, cache: int = 4):
        self.hg, self.policies, self.example = hg, policies, example[:1]
        self.repeats = repeats
        self._models: dict[tuple, object] = {}
        self._cache = cache

    def build(self, plan: QuantPlan) -> fx.GraphModule:
        return quantize(self.hg, plan)

    def model(self, assignment: Assignment):
        """The runnable of an assignment, built once (the last `cache` are kept)."""
        key = tuple(sorted((k, str(v)) for k, v in assignment.items()))
        if key not in self._models:
            if len(self._models) >= self._cache:
                self._models.pop(next(iter(self._models)))
            self._models[key] = self.build(self.policies.plan(dict(assignment)))
        return self._models[key]

    def __call__(self, assignment: Assignment) -> float:
        model = self.model(assignment)
        with torch.no_grad():
            return median_time(lambda: model(self.example), repeats=self.repeats)


def latency_ratio(timer: Callable[[Assignment], float], assignment: Assignment, reference: Assignment,
                  rounds: int = 3) -> tuple[float, float, float]:
    """Median time of `assignment` over that of `reference`, timed in alternation so drift hits both alike."""
    same = dict(assignment) == dict(reference)
    ref_times, times = [], []
    for _ in range(rounds):
        ref_times.append(timer(reference))
        times.append(ref_times[-1] if same else timer(assignment))  # the reference is 1.0x by definition
    ref, t = median(ref_times), median(times)
    return t / ref, t, ref


class PlanEvaluator:
    """Quantize an assignment and measure it end to end: KL on the calibration images, top-1/top-5 and FP32
    agreement on validation images, bytes read from the quantized graph, latency ratio from a timer."""

    def __init__(self, hg: HybridGraph, policies: Policies, calib_loader: Iterable, val_loader: Iterable | None = None,
                 timer: Callable[[Assignment], float] | None = None, reference: Assignment | None = None,
                 progress: bool = False):
        self.hg, self.policies, self.timer, self.reference = hg, policies, timer, reference
        self.progress = progress
        self.calib = [b[0] if isinstance(b, (tuple, list)) else b for b in calib_loader]
        with torch.no_grad():
            self.fp32_calib = torch.cat([hg.gm(x).float() for x in self.calib])
        self.val = list(val_loader) if val_loader is not None else None
        self.fp32_val = predict(hg.gm, self.val, desc="fp32", progress=progress) if self.val else None
        self.fp32 = accuracy(self.fp32_val) if self.fp32_val is not None else None
        self.latency_source = f"measured:{getattr(timer, 'backend', 'timer')}" if timer else None

    def __call__(self, assignment: Assignment) -> dict:
        qgm = quantize(self.hg, self.policies.plan(dict(assignment)))
        with torch.no_grad():
            logits = torch.cat([qgm(x).float() for x in self.calib])
        out: dict = {"kl": kl_divergence(self.fp32_calib, logits), "bytes": model_bytes(qgm),
                     "top1": None, "top5": None, "top1_drop": None, "agreement": None, "n_val": 0,
                     "latency_ratio": None}
        if self.val:
            acc = accuracy(predict(qgm, self.val, desc="plan", progress=self.progress), self.fp32_val)
            out.update(top1=acc.top1, top5=acc.top5, top1_drop=self.fp32.top1 - acc.top1, agreement=acc.agreement,
                       n_val=acc.n, val_kl=acc.kl)
        if self.timer is not None and self.reference is not None:
            ratio, t, ref = latency_ratio(self.timer, assignment, self.reference)
            out.update(latency_ratio=ratio, latency_s=t, reference_latency_s=ref, latency_source=self.latency_source)
        return out
