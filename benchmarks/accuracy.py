"""Accuracy of the PTQ recipes on the real-weight zoo models, and Q-HyViT's ablation (its Table 3).

For each real-weight model (lite0-real; lite0-vit-real when its checkpoint exists): 32 calibration images and,
disjoint from them, every other image of the sample folder (minus the model's training images) for evaluation.
FP32, minmax, easyquant, ptq4vit, efficientquant and qhyvit at W8A8 and W6A6 on the same images: top-1, top-5,
95% interval, top-1 agreement with FP32, KL(FP32‖quant), plan time. Then Q-HyViT with the scale search only,
+ granularity, + scheme (= qhyvit). Plan times are quoted next to the time of one FP32 forward + backward pass
over the calibration images in the same run (the floor of a Hessian-guided search; the machine is shared, so
absolute seconds vary by several times between runs). Finally the mobilevit_xxs W8A8 Q-HyViT plan time
(random weights: timing only).

    python benchmarks/accuracy.py                        # writes benchmarks/results/accuracy.{json,md}
    python benchmarks/accuracy.py --models lite0-real --bits 8 --recipes minmax qhyvit --no-ablation
    python benchmarks/accuracy.py --models lite0-real --bits 6 --recipes qhyvit --no-ablation --no-xxs --adaround \
        --out benchmarks/results/accuracy_adaround_lite0-real
    python benchmarks/accuracy.py --models lite0-vit-real --bits 8 6 --recipes minmax qhyvit --no-ablation --no-xxs \
        --adaround --split-outliers --out benchmarks/results/accuracy_split_lite0-vit-real
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hyfx
from hyfx import zoo
from hyfx.data import data_config, example_input, find_sample_dir, load_image_folder, make_loader, split
from hyfx.meta import SPLIT_OUTLIERS as SPLIT_META
from hyfx.pipelines.bench import METHODS, accuracy_tables, fp32_pass_seconds, variants
from hyfx.search.sampling import calibration_images
from hyfx.splits import sample_split

RESULTS = Path(__file__).resolve().parent / "results"


def real_models() -> list[str]:
    """lite0-real (the CNN the first hybrid grew from) and every hybrid whose checkpoint is present."""
    return ["lite0-real"] + zoo.built_hybrids()


def run_model(name: str, bits_list: list[int], recipes: list[str], ablation: bool, n_calib: int, n_eval: int | None,
              seed: int, out: dict, save, learned: bool = False, split_outliers: float | None = None,
              reconstructed: bool = False, from_training: bool = False, full: bool = False) -> None:
    model = zoo.create(name)
    config = data_config(model)
    calib, evaluation = sample_split(name, n_calib=n_calib, n_eval=n_eval, seed=seed, from_training=from_training)
    hg = hyfx.analyze(hyfx.capture(model, example_input(config)), split_outliers)
    entry = out["models"].setdefault(name, {"n_calib": len(calib), "n_eval": len(evaluation),
                                            "calibration": "training" if from_training else "held-out"})
    if split_outliers is not None:
        entry["split_outliers"] = hg.gm.meta[SPLIT_META]

    def update(tables: dict) -> None:
        entry.update(tables)
        save()

    accuracy_tables(hg, make_loader(calib, config, 16), make_loader(evaluation, config, 50), bits_list,
                    variants(recipes, ablation=ablation, full=full, corrected=True, learned=learned,
                             reconstructed=reconstructed), on_bits=update)


def xxs_timing(out: dict, save) -> None:
    """Q-HyViT W8A8 plan time for mobilevit_xxs (random weights), next to its FP32 pass in the same run."""
    torch.manual_seed(0)
    model = zoo.create("mobilevit_xxs")
    config = data_config(model)
    calib, _ = split(load_image_folder(find_sample_dir()), 32, seed=0)
    loader = make_loader(calib, config, 16)
    start = time.perf_counter()
    gm = hyfx.capture(model, example_input(config))
    capture = time.perf_counter() - start
    floor = fp32_pass_seconds(gm, calibration_images(loader))
    plan = hyfx.recipes.qhyvit(gm, loader, progress=False)
    out["mobilevit_xxs_w8a8"] = {"capture_seconds": round(capture, 1), "plan_seconds": plan.meta["plan_seconds"],
                                 "sampling_seconds": plan.meta["sampling_seconds"],
                                 "search_seconds": plan.meta["search_seconds"], "fp32_pass_seconds": round(floor, 1),
                                 "plan_vs_fp32_pass": round(plan.meta["plan_seconds"] / floor, 1),
                                 "layers": len(plan.layers)}
    save()


def markdown(out: dict) -> str:
    lines = ["# PTQ accuracy on the real-weight zoo models", "",
             f"{out['machine']}; {out['n_calib']} calibration images, evaluation on the other images of the sample "
             "folder (model training images excluded). Agreement = top-1 agreement with FP32 on the same images. "
             "Plan time is quoted with its ratio to one FP32 forward+backward pass over the calibration images "
             "timed in the same run (shared machine: absolute seconds vary between runs).", ""]
    for name, entry in out["models"].items():
        source = " drawn from its training images" if entry.get("calibration") == "training" else ""
        lines += [f"## {name} ({entry['n_eval']} evaluation images; calibration images{source}; FP32 pass "
                  f"{entry['fp32_pass_seconds']} s)", ""]
        if "split_outliers" in entry:
            split = entry["split_outliers"]
            lines += [f"Every recipe ran on the graph with conv outlier weights split out (threshold "
                      f"{split['threshold']} robust σ): " + (", ".join(
                          f"`{k}` ({v['outliers']} weights, {v['kernel'][0]}×{v['kernel'][1]}, range ÷{v['range_gain']})"
                          for k, v in split["layers"].items()) or "no conv qualified") + ".", ""]
        lines += [
                  "| bits | recipe | top-1 | top-5 | top-1 95% CI | drop vs FP32 (pt) | agreement | KL | plan s (× FP32 pass) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for bits, rows in entry["bits"].items():
            for label, r in rows.items():
                ci = f"[{r['top1_ci95'][0]:.1f}, {r['top1_ci95'][1]:.1f}]"
                agree = f"{r['agreement']:.2f}%" if r.get("agreement") is not None else ""
                kl = f"{r['kl']:.4f}" if r.get("kl") is not None else ""
                plan = f"{r['plan_seconds']} ({r['plan_vs_fp32_pass']}×)" if "plan_seconds" in r else ""
                lines.append(f"| W{bits}A{bits} | {label} | {r['top1']:.2f} | {r['top5']:.2f} | {ci} | "
                             f"{r['drop_top1']:+.2f} | {agree} | {kl} | {plan} |".replace("+-", "-"))
        lines.append("")
    if "mobilevit_xxs_w8a8" in out:
        t = out["mobilevit_xxs_w8a8"]
        lines += ["## mobilevit_xxs W8A8 Q-HyViT plan time (random weights: timing only)", "",
                  f"plan {t['plan_seconds']} s (sampling pass {t['sampling_seconds']} s, search {t['search_seconds']} s, "
                  f"{t['layers']} layers) = {t['plan_vs_fp32_pass']}× one FP32 forward+backward pass over the 32 "
                  f"calibration images ({t['fp32_pass_seconds']} s in the same run); capture {t['capture_seconds']} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="default: every real-weight zoo model available")
    parser.add_argument("--bits", nargs="*", type=int, default=[8, 6])
    parser.add_argument("--recipes", nargs="*", default=list(METHODS), choices=hyfx.recipes.available())
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--full", action="store_true",
                        help="also min-max and Q-HyViT with softmax and norm inputs quantized (Q-HyViT's full quantization)")
    parser.add_argument("--no-xxs", action="store_true", help="skip the mobilevit_xxs plan-time measurement")
    parser.add_argument("--adaround", action="store_true",
                        help="add a 'qhyvit + AdaRound' row (learned weight rounding; ~15 min per model and bit-width)")
    parser.add_argument("--reconstruct-blocks", action="store_true",
                        help="add a 'qhyvit + block reconstruction' row (BRECQ + QDrop, 500 steps per block)")
    parser.add_argument("--split-outliers", type=float, nargs="?", const=16.0, default=None, metavar="SIGMA",
                        help="run every recipe on the graph with conv outlier weights split out (hyfx.passes.split_outliers)")
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--calib-from-training", action="store_true",
                        help="calibrate a distilled hybrid on images it was trained on (zoo.calibration_split)")
    parser.add_argument("--n-eval", type=int, default=None, help="default: every other image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "accuracy"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
           "n_calib": args.n_calib, "models": {}}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown(out) + "\n")

    for name in args.models or real_models():
        run_model(name, args.bits, args.recipes, not args.no_ablation, args.n_calib, args.n_eval, args.seed, out, save,
                  args.adaround, args.split_outliers, args.reconstruct_blocks, args.calib_from_training, args.full)
    if not args.no_xxs:
        xxs_timing(out, save)
    save()
    print(markdown(out))


if __name__ == "__main__":
    main()
