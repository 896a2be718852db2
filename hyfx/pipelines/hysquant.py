"""HySquant's measured feedback on a backend: plan timers that lower each plan (hyfx.mixed times the PyTorch
fake-quant model only), and the timers by the names `hyfx search --timer` takes.

Pass one to hyfx.mixed.run_hysquant as `timer=OrtTimer` (or `timer=TIMERS[name]`).
"""

from __future__ import annotations

import torch

from hyfx.graph import HybridGraph
from hyfx.hardware import Assignment
from hyfx.mixed import Policies, TorchTimer
from hyfx.quant.spec import QuantPlan
from hyfx.timing import median_time


class OrtTimer(TorchTimer):
    """PlanTimer on ONNX Runtime's CPU int8 kernels: median seconds of one batch-1 run of the exported QDQ model.

    Integer kernels exist for 8-bit grids only: a narrower grid is exported with a Clip that keeps ORT from
    fusing the layer, so 4-bit choices measure slower here, which is what the feedback loop must learn.
    """

    backend = "ort-cpu-int8"

    def __init__(self, hg: HybridGraph, policies: Policies, example: torch.Tensor, repeats: int = 15, cache: int = 4,
                 threads: int = 2):
        super().__init__(hg, policies, example, repeats, cache)
        self.threads = threads
        self._inputs = self.example.numpy()

    def build(self, plan: QuantPlan):
        from hyfx.backends import onnx_qdq
        from hyfx.backends import ort as hort

        exported = onnx_qdq.export(self.hg, plan, target="ort")
        return hort.session(exported.model, self.threads)

    def __call__(self, assignment: Assignment) -> float:
        sess = self.model(assignment)
        feed = {sess.get_inputs()[0].name: self._inputs}
        return median_time(lambda: sess.run(None, feed), repeats=self.repeats)


TIMERS: dict[str, type[TorchTimer]] = {"torch": TorchTimer, "ort": OrtTimer}
