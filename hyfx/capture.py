"""nn.Module → torch.fx.GraphModule, checked against eager.

torch.export is tried first: it specialises shape-dependent Python control flow (timm's MobileViT
interpolates only when the patch grid does not divide the input) for the example shape. Only a model
whose control flow depends on tensor *values* fails there; it falls back to `torch.fx` symbolic
tracing in which each module that cannot be traced is kept whole as a leaf (and so stays in float).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.meta import CAPTURE, EXAMPLE_SHAPE

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-5


@dataclass
class CaptureReport:
    method: str  # "torch.export" or "fx.symbolic_trace"
    max_abs_diff: float
    tolerance: float
    leaf_modules: list[str] = field(default_factory=list)
    export_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        text = f"captured with {self.method}; max |graph - eager| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:g})"
        if self.leaf_modules:
            text += f"; kept as float leaves (untraceable): {', '.join(self.leaf_modules)}"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


class _LeafTracer(fx.Tracer):
    """Traces through every module (so weights appear as get_attr nodes) except the named leaves."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None  # innermost module whose forward raised during tracing

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _export(model: torch.nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, bool]:
    """Export with a dynamic batch dimension when the model allows it, else for the example's batch size.

    The trace uses a batch of 2: export specialises dimensions of size 1.
    """
    traced = example if example.shape[0] > 1 else torch.cat([example, example])
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.export.export(model, (traced,), dynamic_shapes=({0: batch},), strict=False)
        return program.module(), True
    except Exception as exc:  # noqa: BLE001 - a model that fixes its batch size still exports statically
        log.info("dynamic-batch export failed (%s); exporting with a static batch", type(exc).__name__)
    return torch.export.export(model, (example,), strict=False).module(), False


def _symbolic_trace(model: torch.nn.Module, max_leaves: int = 64) -> tuple[fx.GraphModule, list[str]]:
    leaves: set[str] = set()
    for _ in range(max_leaves):
        tracer = _LeafTracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure names the module to keep whole
            culprit = tracer.failed_in
            if not culprit or culprit in leaves:
                raise HyfxError(
                    f"cannot trace {type(model).__name__}: {type(exc).__name__} at the top level "
                    "(data-dependent control flow in forward itself); move it into a submodule or make it static"
                ) from None
            leaves.add(culprit)
            continue
        return fx.GraphModule(model, graph, class_name=type(model).__name__), sorted(leaves)
    raise HyfxError(f"cannot trace {type(model).__name__}: more than {max_leaves} untraceable submodules")


def _max_abs_diff(a, b) -> float:
    flat_a = a if isinstance(a, (tuple, list)) else [a]
    flat_b = b if isinstance(b, (tuple, list)) else [b]
    return max(float((x - y).abs().max()) for x, y in zip(flat_a, flat_b, strict=True))


def capture(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    tolerance: float = PARITY_TOLERANCE,
    allow_fallback: bool = True,
) -> fx.GraphModule:
    """Capture `model` (in eval mode) as a GraphModule whose output equals eager within `tolerance`.

    The report (method, measured difference, float leaves) is stored in `gm.meta[CAPTURE]`.
    Raises HyfxError when the model cannot be captured or the captured graph disagrees with eager.
    """
    if not isinstance(model, torch.nn.Module):
        raise HyfxError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise HyfxError(f"capture expects an example input tensor, got {type(example_input).__name__}")
    model = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            expected = model(example_input)
    except Exception as exc:  # noqa: BLE001 - the model's own error, on the input it was given, named in one line
        wanted = getattr(model, "pretrained_cfg", {}).get("input_size")
        hint = f"it expects (batch, {', '.join(map(str, wanted))})" if wanted else "check the input shape it expects"
        raise HyfxError(f"{type(model).__name__} cannot run on an input of shape {tuple(example_input.shape)} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}): "
                        f"{hint}") from None
    export_error = None
    leaves: list[str] = []
    try:
        gm, dynamic_batch = _export(model, example_input)
        method = "torch.export" if dynamic_batch else "torch.export (static batch)"
    except Exception as exc:  # noqa: BLE001 - any export failure is reported and the fallback tried
        export_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if not allow_fallback:
            raise HyfxError(f"torch.export failed ({export_error}); pass allow_fallback=True to trace with torch.fx") from None
        log.warning("torch.export failed (%s); falling back to torch.fx symbolic tracing", export_error)
        gm, leaves = _symbolic_trace(model)
        method = "fx.symbolic_trace"
    with torch.no_grad():
        got = gm(example_input)
    report = CaptureReport(method, _max_abs_diff(got, expected), tolerance, leaves, export_error)
    if not report.ok:
        raise HyfxError(
            f"captured graph disagrees with eager PyTorch: max abs diff {report.max_abs_diff:.3g} > {tolerance:g}; "
            "report this model, the graph is not safe to quantize"
        )
    gm.meta[CAPTURE] = report
    gm.meta[EXAMPLE_SHAPE] = tuple(example_input.shape)
    return gm


def capture_report(gm: fx.GraphModule) -> CaptureReport | None:
    return gm.meta.get(CAPTURE)
