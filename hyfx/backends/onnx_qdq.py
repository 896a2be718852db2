"""Lower a quantized GraphModule to ONNX with QuantizeLinear / DequantizeLinear for a target: the export entry point.

Route: BatchNorm is folded into the preceding convolutions (`fold_bn=True`, what both ONNX Runtime and TensorRT
want; `hyfx.passes.fold_batchnorm`), the plan is applied (`insert_quant`), every quantizer is replaced by an
identity marker op (`hyfx.backends.onnx_marks`), the graph is exported with torch.onnx's dynamo exporter (which
lowers the marker to a `hyfx.Mark` node), and each Mark is then rewritten into the standard ops
(`hyfx.backends.onnx_lower`), so each Q/DQ lands on exactly the tensor the plan named. The target's rules are
checked on the plan first and on the ONNX model after (`hyfx.backends.qdq_rules`).

The folded weights get new min-max weight parameters where the plan's cannot be carried over; the exporter
returns the PyTorch graph it lowered (`ExportResult.reference`) so parity is measured against exactly that graph.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx
import torch
import torch.fx as fx

from hyfx.backends.onnx_layout import fast_transposes
from hyfx.backends.onnx_lower import LOG2_MODES, OPSET, lower_marks
from hyfx.backends.onnx_marks import QuantPoint, mark_to_onnx, marked_graph
from hyfx.backends.qdq_rules import check_plan, check_qdq
from hyfx.errors import HyfxError
from hyfx.files import atomic_path
from hyfx.graph import HybridGraph, analyze_for
from hyfx.meta import BN_FACTORS, EXAMPLE_SHAPE
from hyfx.passes.fold_batchnorm import fold_batchnorm, folded_plan
from hyfx.passes.insert_quant import insert_quant
from hyfx.quant.spec import QuantPlan
from hyfx.quant.symmetric import symmetric_plan
from hyfx.quant.targets import get_target

log = logging.getLogger(__name__)


def export_graph(gm: fx.GraphModule, example: torch.Tensor, dynamic_batch: bool = True) -> onnx.ModelProto:
    """ONNX of a (marked) GraphModule via torch.onnx's dynamo exporter, batch dimension dynamic when it can be."""
    gm = gm.eval()
    table = {torch.ops.hyfx.onnx_mark.default: mark_to_onnx}
    kwargs = dict(dynamo=True, custom_translation_table=table, opset_version=OPSET, optimize=True, verbose=False,
                  input_names=["input"], output_names=["logits"])
    if dynamic_batch:
        try:
            program = torch.onnx.export(gm, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                        **kwargs)
            return program.model_proto
        except Exception as exc:  # noqa: BLE001 - a graph with a fixed batch still exports statically
            log.info("dynamic-batch ONNX export failed (%s); exporting with a static batch", type(exc).__name__)
    return torch.onnx.export(gm, (example,), **kwargs).model_proto


@dataclass
class ExportReport:
    target: str
    log2_mode: str
    opset: int
    quant_points: int
    counts: dict
    folded_bn: list[str] = field(default_factory=list)
    reweighted: list[str] = field(default_factory=list)  # folded convs whose calibrated weight scales were redone
    model_bytes: int = 0
    log2_layers: int = 0
    layout_rewrites: int = 0  # Reshape / Transpose chains rewritten into transposes ORT runs fast (onnx_layout)
    parity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"{self.quant_points} quantizers → {self.counts.get('QuantizeLinear', 0)} QuantizeLinear, "
                f"{self.counts.get('DequantizeLinear', 0)} DequantizeLinear ({self.counts.get('weights', 0)} weights), "
                f"opset {self.opset}, target {self.target}, {self.model_bytes / 1e6:.2f} MB")
        if self.folded_bn:
            text += f"; {len(self.folded_bn)} BatchNorms folded"
        if self.log2_layers:
            text += f"; {self.log2_layers} log2 post-softmax quantizers lowered as '{self.log2_mode}'"
        if self.layout_rewrites:
            text += f"; {self.layout_rewrites} reshape / transpose chains rewritten for ORT"
        return text


@dataclass
class ExportResult:
    model: onnx.ModelProto
    reference: fx.GraphModule  # the PyTorch graph the ONNX model computes (BN folded, plan applied)
    points: list[QuantPoint]
    report: ExportReport
    marked: onnx.ModelProto | None = None  # the exporter's model with Mark nodes, for re-lowering

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            onnx.save(self.model, str(tmp))
        return path

    def with_log2_mode(self, mode: str) -> ExportResult:
        """The same export with the log2 quantizers lowered another way (no second torch.onnx export)."""
        if mode not in LOG2_MODES:
            raise HyfxError(f"unknown log2 mode {mode!r}: choose one of {', '.join(LOG2_MODES)}")
        if self.marked is None:
            raise HyfxError("this export kept no marked model to re-lower: export again with the other log2 mode")
        model, _ = _finish(copy.deepcopy(self.marked), self.points, mode, self.report.target)
        report = replace(self.report, log2_mode=mode, counts=check_qdq(model, self.report.target),
                         model_bytes=model.ByteSize())
        return ExportResult(model, self.reference, self.points, report, self.marked)


def _finish(marked: onnx.ModelProto, points: list[QuantPoint], log2_mode: str, target: str,
            skip: set[int] = frozenset()) -> tuple[onnx.ModelProto, int]:
    """The lowered, checked model and the number of Reshape / Transpose chains rewritten for ORT."""
    model = lower_marks(marked, points, log2_mode, signed_uniform=get_target(target).zero_point_free, skip=skip)
    rewritten = 0
    if get_target(target).layout_rewrite:
        model, rewritten = fast_transposes(model)
    check_qdq(model, target)
    onnx.checker.check_model(model, full_check=False)
    return model, rewritten


def lower_subset(result: ExportResult, keep: set[tuple[str, str]]) -> onnx.ModelProto:
    """The exported model with only the quantizers named in `keep` ((layer, role) pairs): one torch.onnx
    export serves every subset of a plan's quantizers (ONNX Runtime's int8 tuning times several)."""
    if result.marked is None:
        raise HyfxError("this export kept no marked model to re-lower")
    skip = {i for i, p in enumerate(result.points) if (p.layer, p.role) not in keep}
    return _finish(copy.deepcopy(result.marked), result.points, result.report.log2_mode, result.report.target, skip)[0]


def export_subset(gm: fx.GraphModule | HybridGraph, result: ExportResult, full: QuantPlan, plan: QuantPlan,
                  left_float: Iterable[str], model: onnx.ModelProto | None = None) -> ExportResult:
    """The export of `plan`, whose quantizers are a subset of `full`'s, which `result` exported: re-lowered from
    `result` (or `model`, that re-lowering already made), but exported again when a layer of `left_float` carries a
    bias correction or learned rounding in `full` (baked into the exported weights, which re-lowering cannot undo)."""
    keep = {(layer, role) for layer, role, _ in plan.specs()}
    target = result.report.target
    if any(full.layers[layer].bias_correction is not None or full.layers[layer].weight_rounding is not None
           for layer in left_float if layer in full.layers):
        model = export(gm, plan, None, target=target, log2_mode=result.report.log2_mode).model
    elif model is None:
        model = lower_subset(result, keep)
    reference, _, _, _ = prepare(gm, plan)
    report = replace(result.report, quant_points=len(keep), counts=check_qdq(model, target),
                     model_bytes=model.ByteSize())
    return ExportResult(model, reference, [p for p in result.points if (p.layer, p.role) in keep], report)


def prepare(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, fold_bn: bool = True
            ) -> tuple[fx.GraphModule, QuantPlan, list[str], list[str]]:
    """(quantized reference graph, plan as applied, folded conv layers, convs whose weight scales were redone)."""
    hg = analyze_for(gm, plan)
    graph, folded = hg.gm, []
    if fold_bn:
        graph, folded = fold_batchnorm(hg.gm, keep=set(plan.layers))
    applied, redone = folded_plan(plan, folded, graph.meta.get(BN_FACTORS))
    return insert_quant(graph, applied), applied, folded, redone


def export(gm: fx.GraphModule | HybridGraph, plan: QuantPlan, path: str | Path | None = None, target: str = "ort",
           log2_mode: str = "exact", fold_bn: bool = True, symmetric: bool = False) -> ExportResult:
    """Lower `gm` quantized by `plan` to an ONNX QDQ model for `target` ("ort" or "tensorrt").

    The plan is checked against the target's rules first (HyfxError names the layer) and the ONNX model after
    (names the node), then validated by onnx.checker. `symmetric=True` converts an asymmetric plan for TensorRT.
    log2_mode: "exact" (Log/Div/Round/Clip/Pow, the PyTorch quantizer op for op), "table" (codes → 256-entry
    Gather), "uniform" (int8 QDQ over [0, 1]: fast, approximate), "fp8" (float8 e4m3 QDQ, for GPUs that have it).
    """
    if log2_mode not in LOG2_MODES:
        raise HyfxError(f"unknown log2 mode {log2_mode!r}: choose one of {', '.join(LOG2_MODES)}")
    if symmetric:
        plan = symmetric_plan(plan)
    check_plan(plan, target)
    hg = analyze_for(gm, plan)
    shape = hg.gm.meta.get(EXAMPLE_SHAPE)
    if shape is None:
        raise HyfxError("graph has no recorded example input shape: capture the model with hyfx.capture")
    reference, applied, folded, redone = prepare(hg, plan, fold_bn)
    marked, points = marked_graph(reference)
    example = torch.randn(max(2, shape[0]), *shape[1:])
    exported = export_graph(marked, example)
    model, rewritten = _finish(copy.deepcopy(exported), points, log2_mode, target)
    report = ExportReport(target, log2_mode, OPSET, len(points), check_qdq(model, target), folded, redone,
                          model.ByteSize(), sum(p.kind == "log2" for p in points), layout_rewrites=rewritten)
    result = ExportResult(model, reference, points, report, exported)
    if path is not None:
        result.save(path)
    return result
