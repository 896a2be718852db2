"""TensorRT: build an engine from a QDQ ONNX model (explicit quantization) and time it.

Follows EfficientQuant's Section 3.3 measurements: median latency over timed runs after warm-up, engine
load (deserialisation) time, and peak GPU memory (pynvml's device reading while the engine runs, and TRT's
own activation memory). `tensorrt` and `pynvml` are the optional extra `pip install hyfx[tensorrt]`;
without them, or without a CUDA GPU, `available()` says why and nothing here runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from hyfx.errors import HyfxError


def unavailable_reason() -> str | None:
    """None when TensorRT can run here, else the reason it cannot (for skips and error messages)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hyfx dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install hyfx[tensorrt])"
    return None


def available() -> bool:
    return unavailable_reason() is None


def _require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise HyfxError(f"TensorRT cannot run here: {reason}")


@dataclass
class EngineReport:
    build_s: float
    load_ms: float  # deserialising the engine into a runtime
    engine_bytes: int
    batch: int
    median_ms: float
    p90_ms: float
    runs: int
    peak_gpu_mb: float | None  # device memory in use at its highest while the engine ran (pynvml)
    activation_mb: float  # TRT's own scratch memory for the engine
    int8_layers: int | None = None  # layers TRT reports running in INT8 (from the engine inspector)
    device: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def build_engine(model: onnx.ModelProto | str | Path, max_batch: int = 8, opt_batch: int = 1, fp16: bool = True,
                 workspace_gb: float = 2.0) -> tuple[bytes, float]:
    """Serialised engine for an explicitly quantized (Q/DQ) ONNX model, and its build time in seconds.

    INT8 is enabled so the Q/DQ layers run in int8 (explicit quantization: TensorRT takes every scale from
    the Q/DQ nodes and calibrates nothing); FP16 lets the layers left in float run in half precision.
    """
    _require()
    import tensorrt as trt

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HyfxError(f"TensorRT cannot parse the ONNX model: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    # Q/DQ nodes set the int8 layers; the flags only allow the precisions (deprecated, absent in newer releases)
    for flag in ("INT8", "FP16") if fp16 else ("INT8",):
        if hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        lo, opt, hi = ([1 if d == -1 else d for d in shape], [opt_batch if d == -1 else d for d in shape],
                       [max_batch if d == -1 else d for d in shape])
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise HyfxError("TensorRT failed to build an engine from the model (see the TensorRT log above)")
    return bytes(engine), time.perf_counter() - start


def _int8_layers(engine) -> int | None:
    import json

    import tensorrt as trt

    try:
        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # noqa: BLE001 - the inspector is informational only
        return None
    layers = info.get("Layers", [])
    return sum(1 for layer in layers if isinstance(layer, dict) and "Int8" in json.dumps(layer.get("Outputs", "")))


def time_engine(serialised: bytes, batch: int = 1, runs: int = 100, warmup: int = 20, build_s: float = 0.0
                ) -> EngineReport:
    """Load the engine and time `runs` inferences of a random batch (CUDA events, median and p90)."""
    _require()
    import tensorrt as trt
    import torch

    nvml = _nvml()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    start = time.perf_counter()
    engine = runtime.deserialize_cuda_engine(serialised)
    load_ms = (time.perf_counter() - start) * 1000
    if engine is None:
        raise HyfxError("TensorRT could not deserialise the engine")
    context = engine.create_execution_context()
    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = [batch if d == -1 else d for d in engine.get_tensor_shape(name)]
            context.set_input_shape(name, shape)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = tuple(context.get_tensor_shape(name))
        dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
                 trt.int32: torch.int32, trt.int64: torch.int64}[engine.get_tensor_dtype(name)]
        buffers[name] = torch.randn(shape, device="cuda").to(dtype)
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()
    peak = 0.0
    times = []
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        for _ in range(runs):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            times.append(begin.elapsed_time(end))
            if nvml is not None:
                peak = max(peak, nvml())
    times.sort()
    return EngineReport(build_s, load_ms, len(serialised), batch, statistics.median(times),
                        times[int(0.9 * (len(times) - 1))], runs, peak if nvml is not None else None,
                        engine.device_memory_size_v2 / 2**20 if hasattr(engine, "device_memory_size_v2")
                        else engine.device_memory_size / 2**20, _int8_layers(engine), torch.cuda.get_device_name())


def _nvml():
    """A function returning the GPU's used memory in MiB (pynvml), or None without pynvml."""
    try:
        import pynvml
    except ImportError:
        return None
    import torch

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def benchmark(model: onnx.ModelProto | str | Path, batches: tuple[int, ...] = (1, 8), runs: int = 100) -> list[EngineReport]:
    """Build one engine (dynamic batch up to max(batches)) and time it at each batch size."""
    engine, build_s = build_engine(model, max_batch=max(batches), opt_batch=min(batches))
    return [time_engine(engine, batch=b, runs=runs, build_s=build_s) for b in batches]
