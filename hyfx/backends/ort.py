"""ONNX Runtime: CPU sessions, running and timing them, and parity against the PyTorch quantized graph.

Also the FP32 model and ONNX Runtime's own static quantizer, the baselines hyfx is compared with. The single-layer
micro-benchmark is `hyfx.backends.ort_layers`; the int8 CPU compile (plan + lowering + autotuning) is a pipeline,
`hyfx.pipelines.ort_cpu`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx

from hyfx.backends.onnx_qdq import export_graph
from hyfx.evaluate import Parity, Predictions, runtime_parity
from hyfx.graph import HybridGraph, analyze
from hyfx.meta import EXAMPLE_SHAPE
from hyfx.quant.calibrate import batches
from hyfx.timing import time_interleaved

DEFAULT_THREADS = 2


# ---------------------------------------------------------------------------------------------- sessions


def session(model: onnx.ModelProto | str | Path, threads: int = DEFAULT_THREADS,
            optimize: bool = True) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads (inter-op 1), every graph optimisation on by default.

    Its thread pool does not spin after a run: spinning threads keep the cores busy for a while and steal them from
    whatever runs next (another session timed in the same loop), which distorts every comparison.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, images: torch.Tensor) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0]


def runner(sess: ort.InferenceSession):
    """`images → logits` in the session (what `hyfx.evaluate.predict` / `compare` call)."""
    return lambda images: torch.from_numpy(run(sess, images))


def predict(sess: ort.InferenceSession, loader: Iterable) -> Predictions:
    logits, labels = [], []
    for images, target in loader:
        logits.append(torch.from_numpy(run(sess, images)))
        labels.append(torch.as_tensor(target))
    return Predictions(torch.cat(logits), torch.cat(labels))


def parity(model: onnx.ModelProto | ort.InferenceSession, reference: torch.nn.Module | torch.Tensor, loader: Iterable,
           fp32: torch.nn.Module | torch.Tensor | None = None, threads: int = DEFAULT_THREADS) -> Parity:
    """Run the ONNX model in ORT and `reference` in PyTorch on the same images; compare top-1 and logits.

    `reference` / `fp32` may be modules or their logits over `loader` already computed (see `logits`).
    """
    sess = model if isinstance(model, ort.InferenceSession) else session(model, threads)
    return runtime_parity(runner(sess), reference, loader, fp32, runtime="ORT")


# ---------------------------------------------------------------------------------------------- timing


def time_sessions(sessions: dict, inputs: np.ndarray, runs: int = 30, warmup: int = 5,
                  clock=time.perf_counter) -> dict:
    """Per-run latency (s) of each session on `inputs`, interleaved run by run (`hyfx.timing.time_interleaved`)."""
    calls = {name: partial(s.run, None, {s.get_inputs()[0].name: inputs}) for name, s in sessions.items()}
    return time_interleaved(calls, runs=runs, warmup=warmup, clock=clock)


# ---------------------------------------------------------------------------------------------- baselines


def fp32_model(gm: fx.GraphModule | HybridGraph) -> onnx.ModelProto:
    """The FP32 ONNX model of a captured graph (BN folded by the exporter), dynamic batch."""
    hg = gm if isinstance(gm, HybridGraph) else analyze(gm)
    shape = hg.gm.meta[EXAMPLE_SHAPE]
    graph = copy.deepcopy(hg.gm)
    return export_graph(graph, torch.randn(max(2, shape[0]), *shape[1:]))


def ort_quantize_static(fp32: onnx.ModelProto, calib_loader: Iterable, out: str | Path, quant_format: str = "qdq",
                        per_channel: bool = True, max_batches: int | None = None) -> Path:
    """ONNX Runtime's own quantize_static (u8 activations, s8 weights), the baseline hyfx is compared with."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    src = out.with_suffix(".fp32.onnx")
    pre = out.with_suffix(".pre.onnx")
    onnx.save(fp32, str(src))
    quant_pre_process(str(src), str(pre))
    name = fp32.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: x.numpy()} for x in batches(calib_loader, max_batches)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(pre), str(out), Reader(),
                    quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel)
    for tmp in (src, pre):
        tmp.unlink(missing_ok=True)
    return out
