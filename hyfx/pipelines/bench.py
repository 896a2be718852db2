"""`hyfx bench`: one model through the seed papers' experiments, on disjoint calibration and evaluation images.

- accuracy: FP32 and every recipe at each bit-width with partial quantization (softmax / norms in float),
  Q-HyViT's ablation (scale only, + granularity, + scheme = qhyvit), and full quantization (softmax and norm
  inputs quantized too; min-max as the baseline Q-HyViT's Table 2 compares against);
- ONNX Runtime on this CPU: FP32, ORT's own quantize_static and hyfx's int8 lowering, interleaved timing
  (bs1, bs8), model bytes, and the accuracy of each ONNX model on the evaluation images.

Accuracy needs trained weights: for a random-weight model only the latency part runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F

from hyfx import zoo
from hyfx.capture import capture
from hyfx.cpu import cpu_info
from hyfx.data import data_config, example_input, make_loader
from hyfx.errors import HyfxError
from hyfx.evaluate import Predictions, accuracy, predict, wilson_interval
from hyfx.graph import GraphRecipe, HybridGraph, analyze, quantize
from hyfx.meta import EXAMPLE_SHAPE
from hyfx.pipelines.plan import make_plan
from hyfx.ray_workers import Worker, run_on_actors
from hyfx.search.sampling import calibration_images
from hyfx.splits import sample_split

METHODS = ("minmax", "easyquant", "ptq4vit", "efficientquant", "repqvit", "hyq", "qhyvit")
ORT_RECIPES = ("minmax", "qhyvit")


@dataclass(frozen=True)
class Variant:
    """One row of the accuracy tables: a recipe with options, and which paper table it belongs to."""

    label: str
    recipe: str
    options: dict = field(default_factory=dict)
    table: str = "partial"  # partial | ablation | full


def variants(methods: Sequence[str] = METHODS, ablation: bool = True, full: bool = True,
             corrected: bool = False, learned: bool = False, reconstructed: bool = False) -> list[Variant]:
    out = [Variant(m, m) for m in methods]
    if corrected:  # hyfx's addition to the papers: empirical bias correction after the recipe
        out += [Variant(f"{m} + bias correction", m, {"bias_correction": True}, "extension")
                for m in ("minmax", "qhyvit") if m in methods]
    if learned:  # and learned weight rounding (AdaRound) after Q-HyViT's scales
        out += [Variant("qhyvit + AdaRound", "qhyvit", {"rounding_iters": 500}, "extension")] \
            if "qhyvit" in methods else []
    if reconstructed:  # and block reconstruction (BRECQ + QDrop) after Q-HyViT's scales
        out += [Variant("qhyvit + block reconstruction", "qhyvit", {"block_iters": 500}, "extension")] \
            if "qhyvit" in methods else []
    if ablation:  # Q-HyViT Table 3: what the search may choose besides the scale (qhyvit itself = + scheme)
        out += [Variant("qhyvit: scale only", "qhyvit", {"search_granularity": False, "search_scheme": False},
                        "ablation"),
                Variant("qhyvit: + granularity", "qhyvit", {"search_scheme": False}, "ablation")]
    if full:  # Q-HyViT Table 2: softmax and norm inputs quantized as well
        out += [Variant(f"{m} (full)", m, {"full": True}, "full") for m in ("minmax", "repqvit", "qhyvit")
                if m in methods]
    return out


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def fp32_pass_seconds(gm: fx.GraphModule, images: list[torch.Tensor]) -> float:
    """One forward + backward pass of the FP32 graph over the calibration images (the floor of a Hessian search)."""
    start = time.perf_counter()
    for x in images:
        x = x.clone().requires_grad_(True)
        logits = gm(x)
        F.cross_entropy(logits, logits.detach().argmax(1), reduction="sum").backward()
    return time.perf_counter() - start


def _with_ci(acc_dict: dict) -> dict:
    """Adds the 95% interval of the paired top-1 agreement (the paired comparison with FP32)."""
    if acc_dict.get("agreement") is not None:
        n = acc_dict["n"]
        acc_dict["agreement_ci95"] = wilson_interval(round(acc_dict["agreement"] * n / 100), n)
    return acc_dict


def plan_and_predict(hg: HybridGraph, calib_loader: Iterable, eval_loader: Iterable, bits: int, variant: Variant,
                     progress: bool = False) -> tuple[dict, float, Predictions]:
    """One row's work: the variant's plan at W{bits}A{bits} (its summary and seconds) and its model's predictions."""
    start = time.perf_counter()
    plan = make_plan(variant.recipe, hg, calib_loader, w_bits=bits, a_bits=bits, progress=progress, **variant.options)
    seconds = time.perf_counter() - start
    return plan.summary(), seconds, predict(quantize(hg, plan), eval_loader, desc=variant.label, progress=progress)


class PlanWorker(Worker):
    """A Ray worker of the accuracy tables: the rebuilt graph and the decoded images, received once."""

    def setup(self, rebuild: Callable[[], HybridGraph], calib: list, evaluation: list) -> None:
        self.hg, self.calib, self.evaluation = rebuild(), calib, evaluation

    def run(self, task: tuple[int, Variant]) -> tuple[dict, float, Predictions]:
        bits, variant = task
        return plan_and_predict(self.hg, self.calib, self.evaluation, bits, variant)


def accuracy_tables(hg: HybridGraph, calib_loader: Iterable, eval_loader: Iterable, bits: Sequence[int] = (8, 6),
                    rows: Sequence[Variant] | None = None, progress: bool = False,
                    on_bits: Callable[[dict], None] | None = None, workers: int = 1, ray_address: str | None = None,
                    rebuild: Callable[[], HybridGraph] | None = None, threads: int = 1) -> dict:
    """FP32 and each variant at each W{b}A{b}: top-1/top-5 with 95% intervals, agreement, KL, plan time.

    `workers` > 1 or a `ray_address` makes the plans and their predictions on Ray workers (`hyfx.ray_workers`) of
    `threads` threads, each rebuilding the graph with `rebuild` (a `hyfx.graph.GraphRecipe`); every figure but the
    seconds is then what a serial run at `threads` threads gives, bit for bit."""
    rows = list(rows) if rows is not None else variants()
    floor = fp32_pass_seconds(hg.gm, calibration_images(calib_loader))
    out: dict = {"fp32_pass_seconds": round(floor, 2), "bits": {}}
    calib_loader, eval_loader = list(calib_loader), list(eval_loader)  # decode the images once for every model
    reference = predict(hg.gm, eval_loader, desc="fp32", progress=progress)
    fp32 = {**accuracy(reference).to_dict(), "drop_top1": 0.0, "table": "fp32"}
    tasks = [(b, v) for b in bits for v in rows]
    done: dict[tuple[int, str], tuple[dict, float, Predictions]] = {}

    def finished(task: tuple[int, Variant], result: tuple[dict, float, Predictions]) -> None:
        """Log a row; once a bit-width's rows are all in, its table lands in `out` (and with `on_bits`)."""
        b, variant = task
        _log(f"W{b}A{b} {variant.label}: {result[1]:.0f} s, {result[0]}")
        done[(b, variant.label)] = result
        if any((b, v.label) not in done for v in rows):
            return
        table = {"fp32": fp32}
        for v in rows:
            _, seconds, predictions = done[(b, v.label)]
            acc = accuracy(predictions, reference)
            table[v.label] = _with_ci({**acc.to_dict(), "drop_top1": round(fp32["top1"] - acc.top1, 2),
                                       "plan_seconds": round(seconds, 1), "plan_vs_fp32_pass": round(seconds / floor, 1),
                                       "table": v.table})
        out["bits"][str(b)] = table
        if on_bits is not None:
            on_bits(out)

    if workers > 1 or ray_address is not None:
        if rebuild is None:
            raise HyfxError("accuracy tables on Ray need `rebuild` (how a worker rebuilds the analysed graph)")
        run_on_actors(PlanWorker, (rebuild, calib_loader, eval_loader), tasks, workers, ray_address, threads,
                      desc=f"plans ({workers} workers)", progress=progress, on_result=finished)
    else:
        for b, v in tasks:
            finished((b, v), plan_and_predict(hg, calib_loader, eval_loader, b, v, progress=progress))
    out["bits"] = {str(b): out["bits"][str(b)] for b in bits}  # in the order asked for, however they finished
    return out


# ---------------------------------------------------------------------------------------------- ONNX Runtime


BIAS_CORRECTED = "+bc"  # a recipe name with this suffix (e.g. "qhyvit+bc") gets bias correction after it


def _ort_plan(hg: HybridGraph, recipe: str, loader: Iterable):
    name = recipe.removesuffix(BIAS_CORRECTED)
    return make_plan(name, hg, loader, target="ort", bias_correction=recipe.endswith(BIAS_CORRECTED), progress=False)


def ort_models(hg: HybridGraph, calib_loader: Iterable, work: Path, recipes: Sequence[str] = ORT_RECIPES,
               stem: str = "model") -> tuple[dict[str, Path], dict[str, str]]:
    """ONNX files to time: ORT FP32, hyfx's layout rewrite of it, ORT quantize_static (QDQ and QOperator),
    hyfx int8 per recipe.

    A format ORT's own tool cannot produce (or produces invalid) is a result: it lands in the notes.
    """
    from hyfx.backends import ort as hort
    from hyfx.backends.onnx_layout import fast_transposes
    from hyfx.pipelines.ort_cpu import compile_cpu

    loader = list(calib_loader)
    paths: dict[str, Path] = {}
    notes: dict[str, str] = {}
    start = time.perf_counter()
    paths["ort fp32"] = work / f"{stem}_fp32.onnx"
    onnx.save(hort.fp32_model(hg), str(paths["ort fp32"]))
    _log(f"FP32 export {time.perf_counter() - start:.0f} s")
    fp32 = onnx.load(str(paths["ort fp32"]))
    # hyfx's ORT lowering also rewrites slow transpose chains: that part alone, in FP32. With no chain
    # rewritten it is the FP32 model again in its own session, and its ratio shows the run's timing noise.
    layout, rewritten = fast_transposes(fp32)
    paths["hyfx fp32 layout"] = work / f"{stem}_fp32_layout.onnx"
    onnx.save(layout, str(paths["hyfx fp32 layout"]))
    notes["hyfx fp32 layout"] = f"ORT FP32 with {rewritten} reshape / transpose chains rewritten (no int8)"
    shape = hg.gm.meta[EXAMPLE_SHAPE]
    for fmt in ("qdq", "qoperator"):
        key = f"ort quantize_static {fmt}"
        try:
            path = hort.ort_quantize_static(fp32, loader, work / f"{stem}_qs_{fmt}.onnx", quant_format=fmt)
            hort.run(hort.session(path), torch.zeros(1, *shape[1:]))  # an invalid graph fails here
            paths[key] = path
        except Exception as exc:  # noqa: BLE001 - ORT's own tool failing is a result to report
            notes[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            _log(f"{key} failed: {notes[key]}")
    for recipe in recipes:
        start = time.perf_counter()
        plan = _ort_plan(hg, recipe, loader)
        key = f"hyfx int8 {recipe}"
        paths[key] = work / f"{stem}_hyfx_{recipe}.onnx"
        info = compile_cpu(hg, plan, loader, path=paths[key]).info
        notes[key] = (f"{len(info.int8_layers)} layers int8, {len(info.fp32_layers)} FP32, {info.weight_bits}-bit "
                      f"weights ({len(info.uint8_weight_layers)} layers 8-bit u8u8), threshold {info.threshold}")
        _log(f"hyfx {recipe} compiled in {time.perf_counter() - start:.0f} s ({notes[key]})")
    return paths, notes


def time_models(paths: dict[str, Path], input_size: Sequence[int], batches: Sequence[int] = (1, 8),
                threads: int = 2, runs: int = 30, cpu_time: bool = False) -> dict:
    """Median latency of every model, all sessions interleaved run by run; ratios to ORT FP32 and to the
    faster valid quantize_static from the same loop; file bytes."""
    from hyfx.backends import ort as hort
    from hyfx.timing import median

    out: dict[str, dict] = {k: {"bytes": Path(p).stat().st_size} for k, p in paths.items()}
    for batch in batches:
        inputs = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
        sessions = {k: hort.session(p, threads) for k, p in paths.items()}
        for k, v in hort.time_sessions(sessions, inputs, runs=runs, warmup=5).items():
            out[k][f"bs{batch}_ms"] = median(v) * 1000
    if cpu_time:
        inputs = np.random.default_rng(0).standard_normal((1, *input_size)).astype(np.float32)
        sessions = {k: hort.session(p, 1) for k, p in paths.items()}
        for k, v in hort.time_sessions(sessions, inputs, runs=runs, warmup=3, clock=time.thread_time).items():
            out[k]["bs1_cpu1_ms"] = median(v) * 1000
    metrics = [f"bs{b}_ms" for b in batches] + (["bs1_cpu1_ms"] if cpu_time else [])
    for metric in metrics:
        base = out["ort fp32"][metric]
        best_qs = min((v[metric] for k, v in out.items() if k.startswith("ort quantize_static") and metric in v),
                      default=None)
        for v in out.values():
            if metric in v:
                v[f"{metric[:-3]}_x_fp32"] = base / v[metric]
                if best_qs is not None:
                    v[f"{metric[:-3]}_x_qs"] = best_qs / v[metric]
    return out


def ort_accuracy(paths: dict[str, Path], eval_loader: Iterable, threads: int = 2) -> dict:
    """top-1 / top-5 / agreement with ORT FP32 of each ONNX model on the evaluation images."""
    from hyfx.backends import ort as hort

    loader = list(eval_loader)
    labels = torch.cat([torch.as_tensor(t) for _, t in loader])
    preds = {k: Predictions(torch.cat([torch.from_numpy(hort.run(hort.session(p, threads), x)) for x, _ in loader]),
                            labels) for k, p in paths.items()}
    base = preds["ort fp32"]
    return {k: _with_ci(accuracy(p, None if k == "ort fp32" else base).to_dict()) for k, p in preds.items()}


def ort_latency(hg: HybridGraph, calib_loader: Iterable, eval_loader: Iterable | None = None,
                recipes: Sequence[str] = ORT_RECIPES, batches: Sequence[int] = (1, 8), threads: int = 2,
                runs: int = 30, stem: str = "model") -> dict:
    """ort_models → time_models (→ ort_accuracy when evaluation images are given), in a scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        paths, notes = ort_models(hg, calib_loader, Path(tmp), recipes, stem)
        shape = hg.gm.meta[EXAMPLE_SHAPE]
        out = {"timings": time_models(paths, shape[1:], batches, threads, runs), "notes": notes,
               "threads": threads, "runs": runs, "batches": list(batches)}
        if eval_loader is not None:
            out["accuracy"] = ort_accuracy(paths, eval_loader, threads)
    return out


def environment(threads: int) -> dict:
    import onnxruntime

    cpu = cpu_info()
    return {"cpu": cpu.model, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "vnni": cpu.vnni, "cpu_features": cpu.features()}


# ---------------------------------------------------------------------------------------------- one model


def bench_model(name: str, checkpoint: str | None = None, pretrained: bool = False, folder: str | Path | None = None,
                n_calib: int = 32, n_eval: int | None = None, seed: int = 0, bits: Sequence[int] = (8, 6),
                rows: Sequence[Variant] | None = None, latency: bool = True, ort_recipes: Sequence[str] = ORT_RECIPES,
                runs: int = 30,
                batches: Sequence[int] = (1, 8), threads: int = 2, progress: bool = False,
                on_update: Callable[[dict], None] | None = None, workers: int = 1,
                ray_address: str | None = None) -> dict:
    """Everything `hyfx bench` reports for one model, as a JSON-ready dict. `workers` / `ray_address`: the accuracy
    tables' plans on Ray workers of one thread each (`accuracy_tables`)."""
    start = time.perf_counter()
    model = zoo.create(name, checkpoint=checkpoint, pretrained=pretrained)
    real = zoo.is_real_weights(name) or checkpoint is not None or pretrained
    config = data_config(model)
    hg = analyze(capture(model, example_input(config)))
    calib, evaluation = sample_split(name, folder, n_calib, n_eval, seed)
    calib_loader = make_loader(calib, config, 16)
    eval_loader = make_loader(evaluation, config, 50)
    result: dict = {"model": name, "checkpoint": checkpoint, "real_weights": real, "seed": seed,
                    "images": {"calibration": len(calib), "evaluation": len(evaluation),
                               "excluded_training": len(zoo.training_images(name))},
                    "environment": environment(threads)}

    def update() -> None:
        if on_update is not None:
            on_update(result)

    if real:
        _log(f"{name}: accuracy on {len(evaluation)} images, {len(calib)} calibration images")
        def on_bits(tables: dict) -> None:  # each finished bit-width lands in the saved result at once
            result["accuracy"] = tables
            update()

        result["accuracy"] = accuracy_tables(hg, calib_loader, eval_loader, bits, rows, progress, on_bits, workers,
                                             ray_address, GraphRecipe(model, tuple(example_input(config).shape)))
    else:
        _log(f"{name}: random weights — accuracy skipped (meaningless), latency only")
    update()
    if latency:
        _log(f"{name}: ONNX Runtime latency, {runs} runs per batch size")
        result["ort"] = ort_latency(hg, list(make_loader(calib, config, 8)), eval_loader if real else None,
                                    recipes=ort_recipes, batches=batches, threads=threads, runs=runs, stem=name)
    result["seconds"] = round(time.perf_counter() - start, 1)
    update()
    return result
