"""OpenVINO on this CPU: hyfx's int8 against the peers a user would pick instead, speed and deployed accuracy.

Per model, each configuration is a compiled runtime model, all timed in one interleaved loop (`hyfx.timing`),
bs1, --threads threads, two passes (pass 1 with a 10 ms pause between calls, pass 2 without), medians of --runs:
- ORT FP32 (spinning off), ORT quantize_static (QDQ, u8 activations, s8 per-channel weights), hyfx int8 in
  ORT (`hyfx quantize --target ort` lowered by `hyfx export --cpu-int8`);
- OpenVINO FP32 at INFERENCE_PRECISION_HINT=f32 and at OpenVINO's default precision (bf16 on CPUs with AVX-512
  BF16 / AMX: said in the table), NNCF int8 (`nncf.quantize`, ModelType.TRANSFORMER, same calibration images)
  and hyfx int8 in OpenVINO (`hyfx quantize --recipe R --target openvino`, lowered with `hyfx.export(...,
  target="openvino")`: every quantizable layer int8; and `hyfx export --target openvino --cpu-int8`
  (`hyfx.pipelines.openvino_cpu.compile_openvino`): int8 only where whole-model timing here says it pays),
  the int8 ones at the default precision for their float parts;
- each is also timed alone afterwards, and the alone / interleaved ratio is reported (1.0 = the loop did not
  distort it);
- which compute layers run int8 is read from each compiled model's execution graph, and where each OpenVINO model
  spends its time from the CPU plugin's per-layer performance counters (`hyfx.backends.openvino_profile`).
hyfx's plans take bias correction (--no-bias-correction: none) and, with --split-outliers, the outlier split, as
`hyfx quantize` does.
For real-weight models, every configuration is also run in its runtime on the evaluation images (calibration and
training images excluded): top-1 / top-5, agreement with and KL to PyTorch FP32 on the same images.

    python benchmarks/deployed_int8.py                              # MobileViTs (speed) + lite0-real, lite0-vit-real
    python benchmarks/deployed_int8.py --models mobilevit_xxs --runs 30 --no-accuracy
Needs the bench extra (`pip install -e ".[bench]"`, NNCF). Writes benchmarks/results/deployed_int8.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch

import hyfx
from hyfx import zoo
from hyfx.backends import openvino as hov
from hyfx.backends import openvino_profile
from hyfx.backends import ort as hort
from hyfx.cpu import cpu_info
from hyfx.data import data_config, example_input, make_loader
from hyfx.evaluate import compare
from hyfx.pipelines.bench_report import fmt
from hyfx.splits import sample_split
from hyfx.timing import alone_over_interleaved, median, time_interleaved

MODELS = ["mobilevit_xxs", "mobilevit_s", "mobilevitv2_100", "lite0-real", "lite0-vit-real"]
RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "ort fp32"


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _nncf_int8(model: ov.Model, calib: list[torch.Tensor]) -> ov.Model:
    import nncf

    samples = [x[None].numpy() for batch in calib for x in batch]
    return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples))


def configurations(name: str, recipe: str, n_calib: int, threads: int, work: Path, bias_correction: bool = True,
                   split_outliers: float | None = None) -> tuple[dict, dict, object, dict]:
    """{config: callable(images) → logits}, {config: facts}, the captured graph and the data config; ORT's own
    quantized model is written under `work`."""
    from hyfx.pipelines.openvino_cpu import compile_openvino
    from hyfx.pipelines.ort_cpu import compile_cpu

    model = zoo.create(name)
    config = data_config(model)
    gm = hyfx.capture(model, example_input(config))
    calib, _ = sample_split(name, n_calib=n_calib)
    loader = list(make_loader(calib, config, batch_size=16))
    hg = hyfx.analyze(gm, split_outliers)
    plans, plan_s = {}, {}
    for target in ("openvino", "ort"):
        start = time.perf_counter()
        plans[target] = hyfx.make_plan(recipe, hg, loader, target=target, bias_correction=bias_correction,
                                       progress=False)
        plan_s[target] = round(time.perf_counter() - start, 1)
    label = f"hyfx {recipe}{'+bc' if bias_correction else ''}"
    start = time.perf_counter()
    ov_cpu = compile_openvino(hg, plans["openvino"], threads=threads)
    ov_cpu_s = round(time.perf_counter() - start, 1)
    fp32_onnx = hort.fp32_model(gm)
    fp32_ov = hov.read_onnx(fp32_onnx)
    ov_models = {
        "ov fp32 (f32)": (fp32_ov, "f32"),
        "ov fp32 (default)": (fp32_ov, "default"),
        "nncf int8": (_nncf_int8(fp32_ov, [b[0] for b in loader]), "default"),
        f"{label} int8 (ov)": (hyfx.export(hg, plans["openvino"], target="openvino").model, "default"),
        f"{label} int8 (ov, --cpu-int8)": (ov_cpu.export.model, "default"),
    }
    qs_path = hort.ort_quantize_static(fp32_onnx, loader, work / f"{name}_qs.onnx", quant_format="qdq")
    lowered = compile_cpu(hg, plans["ort"], loader)
    cpu = lowered.info
    ort_models = {BASELINE: fp32_onnx, "ort quantize_static": qs_path, f"{label} int8 (ort)": lowered.export.model}
    runners, facts = {}, {}
    for key, onnx_model in ort_models.items():
        runners[key] = hort.runner(hort.session(onnx_model, threads))
        facts[key] = {"runtime": "onnxruntime", "precision": "f32"}
    facts[f"{label} int8 (ort)"].update(plan_seconds=plan_s["ort"], int8_layers=len(cpu.int8_layers),
                                        fp32_layers=len(cpu.fp32_layers))
    x = np.random.default_rng(0).standard_normal((1, *config["input_size"])).astype(np.float32)
    for key, (ov_model, precision) in ov_models.items():
        compiled = hov.compile_model(ov_model, precision, threads)
        runners[key] = hov.runner(compiled)
        precisions = hov.runtime_precisions(compiled)
        profile = openvino_profile.summary(openvino_profile.layer_times(ov_model, x, precision, threads))
        facts[key] = {"runtime": "openvino", "precision": hov.inference_precision(compiled), "layers": precisions,
                      "int8_fraction": round(hov.int8_fraction(precisions), 3), "profile": profile}
    facts[f"{label} int8 (ov)"]["plan_seconds"] = plan_s["openvino"]
    facts[f"{label} int8 (ov, --cpu-int8)"].update(
        plan_seconds=plan_s["openvino"], compile_seconds=ov_cpu_s, int8_layers=len(ov_cpu.info.int8_layers),
        float_layers=len(ov_cpu.info.float_layers), tuning=ov_cpu.info.tuning)
    return runners, facts, gm, config


def time_configs(runners: dict, shape: tuple, runs: int) -> dict:
    x = torch.randn(1, *shape[1:])
    calls = {k: (lambda fn=fn: fn(x)) for k, fn in runners.items()}
    out: dict[str, dict] = {k: {} for k in calls}
    for label, pause in (("pass1", 0.01), ("pass2", 0.0)):
        times = time_interleaved(calls, runs=runs, warmup=5, pause=pause)
        base = median(times[BASELINE])
        for k, v in times.items():
            out[k][f"{label}_ms"] = round(median(v) * 1000, 3)
            out[k][f"{label}_x_ort_fp32"] = round(base / median(v), 3)
            out[k][f"{label}_p10_p90_ms"] = [round(float(np.percentile(v, q)) * 1000, 3) for q in (10, 90)]
        if label == "pass1":
            for k, ratio in alone_over_interleaved(calls, times, runs=runs).items():
                out[k]["alone_over_interleaved"] = round(ratio, 3)
    return out


def deployed_accuracy(name: str, runners: dict, gm, config: dict, n_calib: int, n_eval: int | None) -> dict:
    _, evaluation = sample_split(name, n_calib=n_calib, n_eval=n_eval)
    results = compare(gm, runners, make_loader(evaluation, config, batch_size=1), progress=False)
    return {k: v.to_dict() for k, v in results.items()}


def _default_precision(report: dict) -> str:
    return next((f["precision"] for data in report["speed"].values() for k, f in data["facts"].items()
                 if k == "ov fp32 (default)"), "?")


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# OpenVINO: hyfx int8 against OpenVINO FP32, NNCF int8 and ORT FP32", "",
             f"{env['cpu']} ({', '.join(k for k, v in env['cpu_features'].items() if v)}), {env['cores']} cores, "
             f"openvino {env['openvino']}, onnxruntime {env['onnxruntime']}, {report['threads']} threads, bs1; "
             f"every configuration of a model in one interleaved loop, medians of {report['runs']} runs; pass 1 with "
             "a 10 ms pause between calls, pass 2 without; ratio = ORT FP32 time / time (>1 = faster than ORT FP32); "
             "'alone/inter' = median timed alone over pass 1 (1 = the loop did not distort it). Precision: what the "
             f"runtime ran the float parts in (OpenVINO's default: {_default_precision(report)} on this CPU). "
             "int8: share of conv / linear "
             "/ matmul layers in an int8 kernel (execution graph). MobileViTs have random weights: speed only.", "",
             "| model | config | precision | int8 | pass 1 ms | pass 1 × | pass 2 × | alone/inter |",
             "|---|---|---|---|---|---|---|---|"]
    for name, data in report["speed"].items():
        for config, t in data["timings"].items():
            f = data["facts"][config]
            lines.append(f"| {name} | {config} | {f['precision']} | {fmt(f.get('int8_fraction'))} | "
                         f"{t['pass1_ms']:.2f} | {t['pass1_x_ort_fp32']:.2f} | {t['pass2_x_ort_fp32']:.2f} | "
                         f"{t['alone_over_interleaved']:.2f} |")
    lines += ["", "## Where OpenVINO's time goes (per-layer performance counters, bs1, medians of 20 runs)", "",
              "Sum of the layers' times (profiling on, so a little above the timed latency); share of it in int8 "
              "kernels; the three costliest layer kinds (type and kernel precision, share of the sum).", "",
              "| model | config | layers ms | int8 share | costliest kinds |", "|---|---|---|---|---|"]
    for name, data in report["speed"].items():
        for config, f in data["facts"].items():
            if "profile" in f:
                p = f["profile"]
                kinds = ", ".join(f"{k} {v['share']:.0%}" for k, v in list(p["by_kind"].items())[:3])
                lines.append(f"| {name} | {config} | {p['total_ms']:.2f} | {p['int8_ms_share']:.0%} | {kinds} |")
    if report["accuracy"]:
        lines += ["", "## Deployed accuracy (each model run in its runtime; evaluation images only)", "",
                  "| model | config | images | top-1 | top-5 | Δtop-1 vs FP32 | agreement | KL |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, data in report["accuracy"].items():
            base = data["fp32"]["top1"]
            for config, acc in data.items():
                lines.append(f"| {name} | {config} | {acc['n']} | {acc['top1']:.2f} | {acc['top5']:.2f} | "
                             f"{acc['top1'] - base:+.2f} | {fmt(acc.get('agreement'))} | {fmt(acc.get('kl'), '.4f')} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, data in report["accuracy"].items():
        timings = report["speed"][name]["timings"]
        for config, acc in data.items():
            if config in timings:
                x = timings[config]["pass1_x_ort_fp32"]
                ax.scatter(x, acc["top1"])
                ax.annotate(f"{name}: {config}", (x, acc["top1"]), fontsize=6)
    ax.set_xlabel("bs1 speed vs ORT FP32, same loop (×)")
    ax.set_ylabel("deployed top-1 (%)")
    ax.set_title("real weights: deployed accuracy vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--recipe", default="qhyvit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=None)
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-bias-correction", action="store_true", help="hyfx's plans without bias correction")
    parser.add_argument("--split-outliers", type=float, default=None, metavar="SIGMA", help="as hyfx quantize's")
    parser.add_argument("--out", default=str(RESULTS / "deployed_int8"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    cpu = cpu_info()
    report = {"environment": {"cpu": cpu.model, "cores": os.cpu_count(), "cpu_features": cpu.features(),
                              "openvino": importlib.metadata.version("openvino"), "onnxruntime": onnxruntime.__version__,
                              "torch": torch.__version__},
              "threads": args.threads, "runs": args.runs, "recipe": args.recipe, "speed": {}, "accuracy": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.TemporaryDirectory()
    for name in args.models:
        runners, facts, gm, config = configurations(name, args.recipe, args.n_calib, args.threads, Path(work.name),
                                                    not args.no_bias_correction, args.split_outliers)
        timings = time_configs(runners, (1, *config["input_size"]), args.runs)
        report["speed"][name] = {"timings": timings, "facts": facts, "real_weights": zoo.is_real_weights(name)}
        _log(f"{name}: ×ORT FP32 " + ", ".join(f"{k} {v['pass1_x_ort_fp32']}/{v['pass2_x_ort_fp32']}"
                                             for k, v in timings.items()))
        if zoo.is_real_weights(name) and not args.no_accuracy:
            report["accuracy"][name] = deployed_accuracy(name, runners, gm, config, args.n_calib, args.n_eval)
            _log(f"{name}: top-1 " + ", ".join(f"{k} {v['top1']:.2f}" for k, v in report["accuracy"][name].items()))
        Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")  # partial results survive a crash
    Path(f"{out}.md").write_text(markdown(report))
    if report["accuracy"]:
        plot(report, Path(f"{out}.png"))
    _log(f"wrote {out}.json, {out}.md" + (f", {out}.png" if report["accuracy"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
