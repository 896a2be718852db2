"""ONNX Runtime latency on this CPU: FP32 vs ORT's own quantize_static int8 vs hyfx's CPU int8 lowering.

For each model (MobileViT v1/v2, random weights: speed only):
- ORT FP32 (torch.onnx export, BatchNorm folded), ORT quantize_static (u8 activations, s8 per-channel weights,
  QDQ and QOperator formats; "best" is the faster valid one), hyfx int8 (`hyfx.pipelines.ort_cpu.compile_cpu`) for
  each recipe, all calibrated on the same 16 real images;
- every session timed in one interleaved loop per batch size (bs1, bs8), medians over --runs runs after
  warm-up; ratios are to ORT FP32 from the same loop; model bytes;
- with --cpu-time, one-thread sessions are also timed in thread CPU time (bs1), a figure other processes
  on a shared machine do not inflate.
For the real-weight zoo models (lite0-real; lite0-vit-real when its checkpoint exists), the same three
are also run on the evaluation images: top-1 / top-5 next to FP32 on the same images, plus agreement.

    python benchmarks/latency.py                                 # all MobileViT variants + real-weight accuracy
    python benchmarks/latency.py --models mobilevit_xxs --runs 30 --no-accuracy
Writes benchmarks/results/latency.json, latency.md and latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hyfx
from hyfx import zoo
from hyfx.cpu import cpu_info
from hyfx.data import data_config, example_input, make_loader
from hyfx.pipelines.bench import ort_accuracy, ort_models, time_models
from hyfx.pipelines.bench_report import fmt
from hyfx.splits import sample_split

MOBILEVIT = ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s", "mobilevitv2_050", "mobilevitv2_100", "mobilevitv2_200"]
RESULTS = Path(__file__).resolve().parent / "results"


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def build(name: str, recipes: list[str], work: Path, n_calib: int) -> tuple[dict, dict, dict]:
    """ONNX models of `name`: {config: path}, {config: note}, and the loaders' data config."""
    model = zoo.create(name)
    config = data_config(model)
    hg = hyfx.analyze(hyfx.capture(model, example_input(config)))
    calib, _ = sample_split(name, n_calib=n_calib)
    paths, notes = ort_models(hg, make_loader(calib, config, batch_size=8), work, recipes, stem=name)
    return paths, notes, config


def evaluate(name: str, paths: dict, config: dict, n_calib: int, n_eval: int | None, threads: int) -> dict:
    """top-1 / top-5 / agreement of each ONNX model in ORT on the evaluation images (calibration ones excluded)."""
    _, evaluation = sample_split(name, n_calib=n_calib, n_eval=n_eval)
    return ort_accuracy(paths, make_loader(evaluation, config, batch_size=50), threads)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# ONNX Runtime latency: FP32 vs quantize_static vs hyfx int8", "",
             f"{env['cpu']}, {env['cores']} cores, onnxruntime {env['onnxruntime']}, intra_op_num_threads="
             f"{report['threads']}, medians of {report['runs']} runs after 5 warm-up runs, all sessions of a model "
             "interleaved run by run; ratios are to ORT FP32 from the same loop (>1 = faster). "
             "`cpu1` = one-thread session, median thread CPU time (insensitive to other processes on the machine). "
             "Random weights: speed only.", ""]
    batches = report["batches"]
    header = ["model", "config"] + [f"bs{b} ms" for b in batches] + [f"bs{b} ×FP32" for b in batches]
    header += ["bs1 ×qs"] + (["cpu1 ×FP32", "cpu1 ×qs"] if report["cpu_time"] else []) + ["MB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, data in report["speed"].items():
        for config, v in data["timings"].items():
            row = [name, config] + [fmt(v.get(f"bs{b}_ms"), ".1f") for b in batches]
            row += [fmt(v.get(f"bs{b}_x_fp32")) for b in batches] + [fmt(v.get("bs1_x_qs"))]
            if report["cpu_time"]:
                row += [fmt(v.get("bs1_cpu1_x_fp32")), fmt(v.get("bs1_cpu1_x_qs"))]
            row += [f"{v['bytes'] / 1e6:.2f}"]
            lines.append("| " + " | ".join(row) + " |")
        for config, note in data["notes"].items():
            lines.append(f"| {name} | {config} | {note} |" + " |" * (len(header) - 3))
    if report.get("accuracy"):
        lines += ["", "## Accuracy on real weights (ORT, evaluation images; calibration images excluded)", "",
                  "| model | config | images | top-1 | top-5 | Δtop-1 vs FP32 | agreement | bs1 ×FP32 |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, data in report["accuracy"].items():
            base = data["ort fp32"]["top1"]
            timings = report["speed"].get(name, {}).get("timings", {})
            for config, acc in data.items():
                lines.append(f"| {name} | {config} | {acc['n']} | {acc['top1']:.2f} | {acc['top5']:.2f} | "
                             f"{acc['top1'] - base:+.2f} | {fmt(acc['agreement'])} | "
                             f"{fmt(timings.get(config, {}).get('bs1_x_fp32'))} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    names = list(report["speed"])
    configs = sorted({c for d in report["speed"].values() for c in d["timings"] if c != "ort fp32"})
    width = 0.8 / max(1, len(configs))
    for i, config in enumerate(configs):
        values = [report["speed"][n]["timings"].get(config, {}).get("bs1_x_fp32", 0) for n in names]
        ax.bar(np.arange(len(names)) + i * width, values, width, label=config)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.5, color="red", lw=0.8, ls="--", label="goal 1.5×")
    ax.set_xticks(np.arange(len(names)) + width * (len(configs) - 1) / 2, names, rotation=25, ha="right")
    ax.set_ylabel("bs1 speed vs ORT FP32 (×)")
    ax.set_title(f"ORT CPU, {report['threads']} threads, bs1")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name, data in (report.get("accuracy") or {}).items():
        timings = report["speed"].get(name, {}).get("timings", {})
        for config, acc in data.items():
            x = timings.get(config, {}).get("bs1_x_fp32")
            if x is None:
                continue
            ax.scatter(x, acc["top1"], label=f"{name}: {config}")
            ax.annotate(config.replace("ort ", "").replace("quantize_static", "qs"), (x, acc["top1"]), fontsize=7)
    ax.set_xlabel("bs1 speed vs ORT FP32 (×)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("real weights: accuracy vs latency")
    if report.get("accuracy"):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MOBILEVIT)
    parser.add_argument("--real", nargs="*", default=None, help="real-weight models for accuracy (default: zoo ones)")
    parser.add_argument("--recipes", nargs="*", default=["minmax", "percentile"],
                        help="recipes to lower; a '+bc' suffix (qhyvit+bc) adds bias correction")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--n-calib", type=int, default=16)
    parser.add_argument("--n-eval", type=int, default=None, help="evaluation images (default: all the rest)")
    parser.add_argument("--cpu-time", action="store_true", help="also time one-thread sessions in thread CPU time")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "latency"))
    args = parser.parse_args(argv)
    if args.runs < 30:
        _log(f"note: {args.runs} runs (< 30) per measurement")
    torch.set_num_threads(args.threads)
    real = args.real if args.real is not None else (
        ["lite0-real"] + zoo.built_hybrids())
    if args.no_accuracy:
        real = []
    import onnxruntime

    cpu = cpu_info()
    report = {"environment": {"cpu": cpu.model, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
                              "torch": torch.__version__, "vnni": cpu.vnni, "cpu_features": cpu.features()},
              "threads": args.threads, "runs": args.runs, "batches": args.batches, "cpu_time": args.cpu_time,
              "recipes": args.recipes, "speed": {}, "accuracy": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in list(args.models) + [r for r in real if r not in args.models]:
            paths, notes, config = build(name, args.recipes, Path(tmp), args.n_calib)
            timings = time_models(paths, config["input_size"], args.batches, args.threads, args.runs, args.cpu_time)
            report["speed"][name] = {"timings": timings, "notes": notes,
                                     "real_weights": zoo.is_real_weights(name)}
            best = {k: round(v.get("bs1_x_fp32", 0), 2) for k, v in timings.items()}
            _log(f"{name}: bs1 ×FP32 {best}")
            if name in real:
                report["accuracy"][name] = evaluate(name, paths, config, args.n_calib, args.n_eval, args.threads)
                _log(f"{name}: top-1 " + ", ".join(f"{k} {v['top1']:.2f}" for k, v in report["accuracy"][name].items()))
            Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")  # partial results survive a crash
    Path(f"{out}.md").write_text(markdown(report))
    plot(report, Path(f"{out}.png"))
    _log(f"wrote {out}.json, {out}.md, {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
