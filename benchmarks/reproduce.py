"""Reproduction report: the seed papers' tables on hyfx, with plots, in one command.

For every real-weight zoo model (lite0/1/2-real and the hybrids whose checkpoints exist), `hyfx.pipelines.bench`:
EfficientQuant's Table 1 analogue and Q-HyViT's Tables 1-3 (W8A8 / W6A6, partial and full quantization,
ablation) on one set of evaluation images, with the published numbers that could be traced beside ours;
the ONNX Runtime latency / size table (plus mobilevit_s, the HySquant paper's model, for speed only: random
weights). HySquant: the hardware sensitivity heat map of mobilevit_s (roofline latency and energy per layer
and bit config: these do not depend on the weights), the accuracy sensitivity heat map and the measured
Pareto fronts of the real-weight hybrid. TensorRT where a GPU and TensorRT exist.

    python benchmarks/reproduce.py                  # writes benchmarks/results/reproduce.{json,md} and reproduce_*.png
    python benchmarks/reproduce.py --quick          # a smoke run: W8A8, two recipes, one model, short timing
    python benchmarks/reproduce.py --render-only    # rewrite the report and plots from reproduce.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hyfx
from hyfx import zoo
from hyfx.data import data_config, example_input, make_loader
from hyfx.hardware import DEFAULT_CONFIGS, PROFILES, BitConfig, RooflineLatency, graph_work, model_bytes, this_cpu
from hyfx.mixed import Policies, SensitivityTable, build_table, pareto_front, plot_front, reprice
from hyfx.pipelines.bench import METHODS, bench_model, environment, ort_latency, variants
from hyfx.pipelines.bench_report import EVALUATION_SET, latency_table, load_paper_tables, render
from hyfx.splits import sample_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_precision import TestSet, splits  # noqa: E402  (the HySquant benchmark's image splits and test set)

RESULTS = Path(__file__).resolve().parent / "results"
HEADLINE_METHODS = [("MinMax", "minmax"), ("EasyQuant", "easyquant"), ("PTQ4ViT", "ptq4vit"),
                    ("EfficientQuant", "efficientquant"), ("RepQ-ViT", "repqvit"), ("HyQ", "hyq"),
                    ("Q-HyViT", "qhyvit"), ("Q-HyViT (full)", "qhyvit (full)")]


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def real_models() -> list[str]:
    """Every real-weight zoo model: the three EfficientNet-Lite teachers and every hybrid whose checkpoint is present."""
    return zoo.real_weight_models()


# ---------------------------------------------------------------------------------------------- HySquant


def hardware_heatmap(name: str, device: str, path: Path) -> dict:
    """Per-layer roofline latency and weight bytes of `name` at each bit config on `device`, and the paper's
    energy figure per config (weights play no part in any of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    model = zoo.create(name)
    hg = hyfx.analyze(hyfx.capture(model, example_input(data_config(model))))
    layers = hg.layers()
    work = graph_work(hg.gm, layers)
    profile = PROFILES[device]
    roofline = RooflineLatency(work, profile)
    configs = list(DEFAULT_CONFIGS)
    latency = np.array([[roofline.layer_latency(layer, c) for c in configs] for layer in layers]) * 1e6
    kbytes = np.array([[work.layers[layer].weight_bytes(c.w_bits) for c in configs] for layer in layers]) / 1e3
    fig, axes = plt.subplots(1, 2, figsize=(11, max(5.0, 0.16 * len(layers) + 1.5)), sharey=True)
    for ax, values, label in ((axes[0], latency, "latency (µs, roofline)"), (axes[1], kbytes, "weight kB")):
        im = ax.imshow(np.log10(np.maximum(values, 1e-3)), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(configs)), [c.name for c in configs])
        for i in range(len(layers)):
            for j in range(len(configs)):
                ratio = values[i, 3] / values[i, j] if values[i, j] > 0 else float("nan")
                ax.text(j, i, f"{ratio:.1f}×", ha="center", va="center", fontsize=4, color="white")
        fig.colorbar(im, ax=ax, label=f"log10 {label}")
        ax.set_title(label, fontsize=8)
    axes[0].set_yticks(range(len(layers)), [f"{layer} ({hg.tags(layer)['kind']})" for layer in layers], fontsize=4)
    fig.suptitle(f"{name}: per-layer hardware sensitivity, {device} roofline (text: saving vs W8A8)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)
    total = latency.sum(axis=0)
    return {"model": name, "device": device, "layers": len(layers), "png": path.name,
            "total_latency_us": {c.name: round(float(t), 1) for c, t in zip(configs, total, strict=True)},
            "energy_paper": {c.name: float(profile.energy(t * 1e-6)) for c, t in zip(configs, total, strict=True)},
            "weight_mb": {c.name: round(float(kbytes[:, j].sum() / 1e3), 3) for j, c in enumerate(configs)},
            "profile_source": profile.source}


def hysquant_fronts(name: str, args: argparse.Namespace, out: Path) -> dict:
    """The sensitivity table of `name` (reused when the HySquant benchmark built it on the same images), its
    heat map, and Pareto fronts (RTX 3080 roofline latency; model bytes) measured on held-out test images."""
    start = time.perf_counter()
    model = zoo.create(name)
    config = data_config(model)
    hg = hyfx.analyze(hyfx.capture(model, example_input(config)))
    _, calib, sens, _, test = splits(name, 32, 64, 150, None, 0)
    calib_loader, sens_loader = make_loader(calib, config, 16), make_loader(sens, config, 16)
    stem = RESULTS / f"mixed_precision_{name}_table"
    reused = False
    if not args.fresh_table and stem.with_suffix(".json").is_file():
        table = SensitivityTable.load(stem.with_suffix(".json"))
        reused = table.meta.get("images") == calib.names() + sens.names() and table.configs == list(DEFAULT_CONFIGS)
    if reused:
        _log(f"{name}: reusing {stem}.json (built on the same images in {table.meta.get('seconds')} s)")
        policies = Policies(hg, calib_loader, table.configs, table.layers, progress=False)
        table_seconds = table.meta.get("seconds")
    else:
        _log(f"{name}: building the sensitivity table ({len(hg.layers())} layers × {len(DEFAULT_CONFIGS)} configs)")
        t0 = time.perf_counter()
        table, policies = build_table(hg, calib_loader, sens_loader, DEFAULT_CONFIGS, profile=this_cpu(), model=name,
                                      progress=not args.quiet)
        table_seconds = round(time.perf_counter() - t0, 1)
        table.meta.update(seconds=table_seconds, images=calib.names() + sens.names())
        table.save(stem)
    heat = out / f"reproduce_{name}_sensitivity.png"
    shutil.copyfile(stem.with_suffix(".png"), heat)
    test_set = TestSet(hg, make_loader(test, config, 50))
    priced = {"latency": reprice(table, RooflineLatency(graph_work(hg.gm, table.layers), PROFILES["rtx3080"]),
                                 PROFILES["rtx3080"]), "bytes": table}
    fronts = {}
    for axis, t in priced.items():
        front = pareto_front(t, axis, points=args.points)
        for p in front:
            assignment = {layer: BitConfig.parse(c) for layer, c in p.pop("assignment").items()}
            qgm = hyfx.quantize(hg, policies.plan(assignment))
            figures = test_set(qgm)
            p["measured"] = {"top1": figures["test_top1"], "top5": figures["test_top5"],
                             "agreement": figures["test_agreement"], "bytes": model_bytes(qgm)}
            p["predicted"]["top1"] = test_set.fp32.top1 - p["predicted"]["top1_drop"]
            _log(f"{name} front {axis} {p['configs']}: predicted top-1 {p['predicted']['top1']:.2f}, "
                 f"measured {p['measured']['top1']:.2f}")
        fronts[axis] = front
    png = out / f"reproduce_{name}_pareto.png"
    plot_front(fronts, png, title=f"{name}: HySquant Pareto fronts, top-1 on {len(test)} held-out images "
                                  "(latency: RTX 3080 roofline vs all-W8A8)", fp32_top1=test_set.fp32.top1)
    return {"model": name, "table_reused": reused, "table_seconds": table_seconds, "layers": len(table.layers),
            "images": {"calibration": len(calib), "table": len(sens), "test": len(test)},
            "fp32_test": test_set.fp32.to_dict(), "fronts": fronts, "heatmap_png": heat.name, "pareto_png": png.name,
            "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------------------------- TensorRT


def tensorrt_rows() -> dict:
    from hyfx.backends import tensorrt as trt

    reason = trt.unavailable_reason()
    return {"status": "skipped", "reason": reason} if reason else {"status": "available (not run by this script)"}


# ---------------------------------------------------------------------------------------------- plots


def plot_headline(report: dict, path: Path) -> None:
    """Top-1 change vs FP32 per method, W8A8 and W6A6, one group per real-weight model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = [r for r in report["models"] if r.get("accuracy")]
    bits = sorted({b for r in models for b in r["accuracy"]["bits"]}, reverse=True)
    fig, axes = plt.subplots(1, len(bits), figsize=(6.5 * len(bits), 4.2), squeeze=False)
    for ax, b in zip(axes[0], bits, strict=True):
        width = 0.8 / max(1, len(models))
        for i, r in enumerate(models):
            rows = r["accuracy"]["bits"][b]
            keys = [(t, k) for t, k in HEADLINE_METHODS if k in rows]
            drops = [0.0 - rows[k]["drop_top1"] for _, k in keys]
            err = [[rows[k]["top1"] - rows[k]["top1_ci95"][0] for _, k in keys],
                   [rows[k]["top1_ci95"][1] - rows[k]["top1"] for _, k in keys]]
            ax.bar(np.arange(len(keys)) + i * width, drops, width, yerr=err, capsize=2, label=r["model"], alpha=0.85)
            ax.set_xticks(np.arange(len(keys)) + width * (len(models) - 1) / 2, [t for t, _ in keys], rotation=20,
                          ha="right")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("top-1 change vs FP32 (points; bars: 95% CI of the quantized top-1)")
        ax.set_title(f"W{b}A{b}")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_accuracy_latency(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in report["models"]:
        ort = r.get("ort") or {}
        for config, acc in (ort.get("accuracy") or {}).items():
            x = ort["timings"].get(config, {}).get("bs1_x_fp32")
            if x is None:
                continue
            ax.scatter(x, acc["top1"], label=f"{r['model']}: {config}")
            ax.annotate(config.replace("ort ", "").replace("quantize_static", "qs"), (x, acc["top1"]), fontsize=6)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("bs1 speed vs ORT FP32 (×, same timing loop)")
    ax.set_ylabel("top-1 (%) of the ONNX model in ORT")
    ax.set_title("real weights: accuracy vs CPU latency (ONNX Runtime)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- report


PEERS = ("NNCF int8 (OpenVINO)", "ORT quantize_static (QDQ, per-channel)")


def peer_rows(name: str, threads: int, work: Path, n_calib: int = 32) -> dict:
    """Deployed W8A8 accuracy of the tools a practitioner would pick instead, on the calibration and evaluation
    images hyfx's recipes get (`sample_split`): NNCF (`ModelType.TRANSFORMER`) run in OpenVINO at its default
    precision, and ONNX Runtime's `quantize_static` (QDQ, u8 activations, s8 per-channel weights) run in ORT."""
    from deployed_int8 import _nncf_int8

    from hyfx.backends import openvino as hov
    from hyfx.backends import ort as hort
    from hyfx.evaluate import compare

    model = zoo.create(name)
    config = data_config(model)
    gm = hyfx.capture(model, example_input(config))
    calib, evaluation = sample_split(name, n_calib=n_calib)
    loader = list(make_loader(calib, config, batch_size=16))
    fp32_onnx = hort.fp32_model(gm)
    compiled = hov.compile_model(_nncf_int8(hov.read_onnx(fp32_onnx), [b[0] for b in loader]), "default", threads)
    qs = hort.ort_quantize_static(fp32_onnx, loader, work / f"{name}_quantize_static.onnx", quant_format="qdq")
    runners = {PEERS[0]: hov.runner(compiled), PEERS[1]: hort.runner(hort.session(qs, threads))}
    results = compare(gm, runners, make_loader(evaluation, config, batch_size=16), progress=False)
    rows = {k: v.to_dict() for k, v in results.items()}
    rows[PEERS[0]]["precision"] = hov.inference_precision(compiled)
    return rows


def peers_table(report: dict) -> list[str]:
    lines = ["| model | n | FP32 top-1 | tool | top-1 (Δ) | top-5 | agreement | KL |", "|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        rows = r.get("peers")
        if not rows:
            continue
        fp = rows["fp32"]
        for tool in PEERS:
            row = rows.get(tool)
            if row:
                lines.append(f"| {r['model']} | {fp['n']} | {fp['top1']:.2f} | {tool} | {row['top1']:.2f} "
                             f"({row['top1'] - fp['top1']:+.2f}) | {row['top5']:.2f} | {row['agreement']:.2f}% | "
                             f"{row['kl']:.4f} |")
    return lines


def peers_cpu_note(environment: dict) -> list[str]:
    """The peers' int8 kernels depend on the CPU: say which features this one has, and what lacking VNNI does."""
    features = environment.get("cpu_features", {})
    line = "CPU features: " + (", ".join(k for k, v in features.items() if v) or "none probed") + "."
    if features and not features.get("vnni"):
        line += (" Without VNNI both runtimes multiply u8 × s8 with VPMADDUBSW, whose 16-bit pair sums saturate for "
                 "8-bit weights; neither peer narrows its weights for it (hyfx's OpenVINO and ORT lowerings do: "
                 "README, OpenVINO int8 on CPU), so their rows here are lower than on a VNNI CPU.")
    return [line]


def headline(report: dict) -> list[str]:
    """One row per real model: FP32, then each method's W8A8 / W6A6 top-1 change, and the best hyfx int8 speed."""
    lines = ["| model | n | FP32 top-1 [95% CI] | bits | " + " | ".join(t for t, _ in HEADLINE_METHODS)
             + " | Q-HyViT agreement |", "|---|---|---|---|" + "---|" * len(HEADLINE_METHODS) + "---|"]
    for r in report["models"]:
        for b, rows in (r.get("accuracy") or {}).get("bits", {}).items():
            fp = rows["fp32"]
            cells = [f"{0.0 - rows[k]['drop_top1']:+.2f}" if k in rows else "—" for _, k in HEADLINE_METHODS]
            q = rows.get("qhyvit", {})
            lines.append(f"| {r['model']} | {fp['n']} | {fp['top1']:.2f} [{fp['top1_ci95'][0]:.1f}, "
                         f"{fp['top1_ci95'][1]:.1f}] | W{b}A{b} | " + " | ".join(cells)
                         + f" | {q.get('agreement', float('nan')):.2f}% |")
    return lines


def markdown(report: dict) -> str:
    paper = load_paper_tables()
    lines = ["# hyfx reproduction report", "",
             f"`{report['command']}` on {report['environment']['cpu']} ({report['environment']['cores']} cores, torch "
             f"{report['environment']['torch']}, onnxruntime {report['environment']['onnxruntime']}); "
             f"{report.get('seconds', '?')} s end to end.", "",
             "## Headline: top-1 change vs FP32 (points) on the same images", "", *headline(report), "",
             "Each cell is quantized top-1 minus FP32 top-1 on the same evaluation images; the per-run table below "
             "gives top-1 / top-5 with 95% intervals, agreement and KL. Q-HyViT (full) also quantizes softmax and "
             "norm inputs.", "", f"![top-1 change per method]({report['plots']['headline']})", ""]
    lines += render(report["models"], paper, title="The seed papers' tables", level=2).splitlines() + [""]
    if any(r.get("peers") for r in report["models"]):
        lines += ["## The tools a practitioner would use instead (W8A8, deployed)", "",
                  "Same calibration and evaluation images as the recipes above, each model run in its runtime.",
                  *peers_cpu_note(report["environment"]), "", *peers_table(report), ""]
    if report.get("speed_only"):
        lines += ["### Latency / size of models without trained weights (speed only)", "",
                  *latency_table(report["speed_only"]), ""]
    if "accuracy_latency" in report["plots"]:
        lines += [f"![accuracy vs latency]({report['plots']['accuracy_latency']})", ""]
    trt = report.get("tensorrt", {})
    lines += ["### TensorRT", "", f"{trt.get('status')}: {trt.get('reason', '')}".rstrip(": "), ""]
    note = paper.get("hysquant", {}).get("note", "")
    lines += ["## HySquant", "", f"No published HySquant numbers stand beside these: {note}.", ""]
    hw = report.get("hardware_heatmap")
    if hw:
        totals = "; ".join(f"{k}: {v:.1f} µs, {hw['weight_mb'][k]:.2f} MB, energy {hw['energy_paper'][k]:.3g}"
                           for k, v in hw["total_latency_us"].items())
        lines += [f"### {hw['model']}: per-layer hardware sensitivity ({hw['device']} roofline)", "",
                  f"{hw['layers']} quantizable layers; summed over layers, per uniform config: {totals}. Latency comes "
                  f"from the roofline of the device profile ({hw['profile_source']}); the paper's energy figure is "
                  "p_f × latency (p_f = max power / peak FLOPS), so on one device its heat map is the latency one "
                  "scaled, and the second panel shows weight bytes instead. None of these needs trained weights; "
                  "the accuracy columns of HySquant's table do, and "
                  f"no trained {hw['model']} exists here, so its accuracy sensitivity is shown on the real-weight "
                  "hybrid below.", "", f"![{hw['model']} hardware sensitivity]({hw['png']})", ""]
    for h in report.get("hysquant", []):
        fp = h["fp32_test"]
        lines += [f"### {h['model']}: accuracy sensitivity and Pareto fronts", "",
                  f"Sensitivity table: {h['layers']} layers × W4A4/W4A8/W8A4/W8A8, each layer quantized alone, top-1 "
                  f"on {h['images']['table']} table images "
                  f"({'reused from benchmarks/mixed_precision.py, same images' if h['table_reused'] else 'built in this run'}"
                  f", {h['table_seconds']} s to build). Fronts: min-KL plans under a sweep of limits, each measured on "
                  f"{h['images']['test']} held-out test images (FP32 {fp['top1']:.2f}, 95% CI {fp['top1_ci95'][0]:.1f}–"
                  f"{fp['top1_ci95'][1]:.1f}).", "",
                  f"![{h['model']} sensitivity]({h['heatmap_png']})", "", f"![{h['model']} Pareto]({h['pareto_png']})", ""]
        for axis, front in h["fronts"].items():
            unit = "latency vs W8A8 (RTX 3080 roofline)" if axis == "latency" else "MB"
            lines += [f"| front ({axis}) configs | {unit} | predicted top-1 | measured top-1 | top-5 | agreement % | "
                      "measured MB |", "|---|---|---|---|---|---|---|"]
            for p in front:
                x = (f"{p['predicted']['latency_ratio']:.3f}×" if axis == "latency"
                     else f"{p['predicted']['bytes'] / 1e6:.3f}")
                m = p["measured"]
                lines.append(f"| {' '.join(f'{k}×{v}' for k, v in p['configs'].items())} | {x} | "
                             f"{p['predicted']['top1']:.2f} | {m['top1']:.2f} | {m['top5']:.2f} | {m['agreement']:.1f} | "
                             f"{m['bytes'] / 1e6:.3f} |")
            lines.append("")
    lines += ["## How to regenerate", "", "```", "python benchmarks/reproduce.py          # everything above",
              "hyfx bench lite0-vit-real                # one model: its tables and ORT latency", "```", "",
              "## Timings of this run", ""]
    for key, seconds in report.get("timings", {}).items():
        lines.append(f"- {key}: {seconds} s")
    lines += ["", "## About the evaluation set", "", EVALUATION_SET, ""]
    return "\n".join(lines)


def render_all(report: dict, out: Path) -> None:
    report["plots"] = {"headline": "reproduce_headline.png"}
    plot_headline(report, out / report["plots"]["headline"])
    if any((r.get("ort") or {}).get("timings") for r in report["models"]):  # not with --no-latency
        report["plots"]["accuracy_latency"] = "reproduce_accuracy_latency.png"
        plot_accuracy_latency(report, out / report["plots"]["accuracy_latency"])
    (out / "reproduce.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "reproduce.md").write_text(markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="real-weight models (default: every zoo one)")
    parser.add_argument("--speed-models", nargs="*", default=["mobilevit_s"],
                        help="random-weight models timed in ORT (speed only)")
    parser.add_argument("--heatmap-model", default="mobilevit_s")
    parser.add_argument("--hysquant-models", nargs="*", default=None, help="default: the hybrid (else lite0-real)")
    parser.add_argument("--bits", nargs="*", type=int, default=[8, 6])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--points", type=int, default=5, help="budget levels swept per Pareto front")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh-table", action="store_true", help="rebuild the HySquant table even if one matches")
    parser.add_argument("--quick", action="store_true", help="smoke run: W8A8, minmax + qhyvit, one model, 10 runs")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="skip the NNCF / ORT quantize_static rows (NNCF is "
                        "in the bench extra)")
    parser.add_argument("--no-latency", action="store_true", help="skip the ORT latency / size tables (accuracy only; "
                        "benchmarks/deployed_int8.py times every runtime in one loop)")
    parser.add_argument("--resume", action="store_true", help="keep the models reproduce.json already holds in full "
                        "(accuracy and peers) and run only the others")
    parser.add_argument("--workers", type=int, default=1, help="make the accuracy tables' plans on this many Ray "
                        "workers (the distributed extra)")
    parser.add_argument("--ray-address", default=None, help="that work on this Ray cluster instead of a local Ray")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        render_all(json.loads((out / "reproduce.json").read_text()), out)
        _log(f"rewrote {out / 'reproduce.md'}")
        return 0
    torch.set_num_threads(args.threads)
    models = args.models if args.models is not None else real_models()
    hysquant_models = args.hysquant_models if args.hysquant_models is not None else models[-1:]
    ablation = full = True
    if args.quick:
        models, args.bits, args.methods, args.runs, args.points = models[-1:], [8], ["minmax", "qhyvit"], 10, 3
        args.speed_models, hysquant_models, ablation, full = [], [], False, False
    report = {"command": "python benchmarks/reproduce.py " + " ".join(sys.argv[1:]), "environment": environment(args.threads),
              "models": [], "speed_only": [], "hysquant": [], "timings": {}}
    if args.resume and (out / "reproduce.json").is_file():
        earlier = json.loads((out / "reproduce.json").read_text())
        report["models"] = [r for r in earlier["models"] if r["model"] in models and "seconds" in r
                            and (args.no_peers or "peers" in r)]
        report["timings"] = {k: v for k, v in earlier.get("timings", {}).items()
                             if any(k.startswith(f"{r['model']}:") for r in report["models"])}
        _log(f"resuming: keeping {', '.join(r['model'] for r in report['models']) or 'nothing'}")
    if args.no_latency:
        args.speed_models = []
    start = time.perf_counter()

    def save(_: dict | None = None) -> None:
        (out / "reproduce.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    rows = variants(args.methods, ablation=ablation, full=full)
    for name in models:
        if any(r["model"] == name for r in report["models"]):
            continue
        t0 = time.perf_counter()
        report["models"].append({"model": name})
        result = bench_model(name, bits=args.bits, rows=rows, latency=not args.no_latency, runs=args.runs,
                             threads=args.threads, workers=args.workers, ray_address=args.ray_address,
                             on_update=lambda r: (report["models"].__setitem__(-1, r), save()))
        report["models"][-1] = result
        report["timings"][f"{name}: accuracy tables + ORT"] = round(time.perf_counter() - t0, 1)
        if not args.no_peers:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                result["peers"] = peer_rows(name, args.threads, Path(work))
            report["timings"][f"{name}: NNCF / quantize_static"] = round(time.perf_counter() - t0, 1)
        save()
    for name in args.speed_models:
        t0 = time.perf_counter()
        model = zoo.create(name)
        config = data_config(model)
        hg = hyfx.analyze(hyfx.capture(model, example_input(config)))
        calib, _ = sample_split(name, n_calib=16)
        report["speed_only"].append({"model": name, "real_weights": False, "environment": report["environment"],
                                     "ort": ort_latency(hg, list(make_loader(calib, config, 8)), runs=args.runs,
                                                        threads=args.threads, stem=name)})
        report["timings"][f"{name}: ORT latency (random weights)"] = round(time.perf_counter() - t0, 1)
        save()
    if not args.quick and args.heatmap_model:
        t0 = time.perf_counter()
        report["hardware_heatmap"] = hardware_heatmap(args.heatmap_model, "rtx3080",
                                                      out / f"reproduce_{args.heatmap_model}_hardware.png")
        report["timings"][f"{args.heatmap_model}: hardware heat map"] = round(time.perf_counter() - t0, 1)
    for name in hysquant_models:
        t0 = time.perf_counter()
        report["hysquant"].append(hysquant_fronts(name, args, out))
        report["timings"][f"{name}: HySquant table + fronts"] = round(time.perf_counter() - t0, 1)
        save()
    report["models"].sort(key=lambda r: models.index(r["model"]) if r["model"] in models else len(models))
    report["tensorrt"] = tensorrt_rows()
    report["seconds"] = round(time.perf_counter() - start, 1)
    render_all(report, out)
    _log(f"wrote {out / 'reproduce.md'} and {out / 'reproduce.json'} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
