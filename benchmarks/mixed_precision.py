"""HySquant on the real-weight zoo models: sensitivity tables, Pareto fronts, budgeted searches, measured gaps.

For each model (lite0-real; lite0-vit-real when its checkpoint exists):
1. disjoint images from the sample folder (minus the model's training images): calibration (ranges, KL proxy),
   table (single-layer top-1/top-5), validation (the feedback loop's measurements) and test (held out: every
   accuracy reported below is on it, FP32 on the same images next to it);
2. the sensitivity table, every quantizable layer × {W4A4, W4A8, W8A4, W8A8}, latency from the roofline of
   this CPU, re-priced for the RTX 3080 and the H100 (CSV / JSON / heat-map PNG);
3. Pareto fronts (predicted) of min-KL plans vs roofline latency (RTX 3080) and vs model bytes, each front
   plan then quantized and measured on the test images (top-1, bytes from the quantized graph, latency ratio
   of the PyTorch fake-quant model on this CPU against the all-W8A8 model, timed in alternation);
4. budgeted searches with the measured-feedback loop, and the gap between each chosen plan's prediction and
   its measurement.

    python benchmarks/mixed_precision.py --threads 1       # writes benchmarks/results/mixed_precision*
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
from hyfx.errors import HyfxError
from hyfx.evaluate import accuracy, predict
from hyfx.hardware import DEFAULT_CONFIGS, PROFILES, BitConfig, RooflineLatency, graph_work, model_bytes, this_cpu
from hyfx.mixed import (
    Budget,
    CostModel,
    PlanEvaluator,
    Policies,
    SensitivityTable,
    TorchTimer,
    build_table,
    latency_ratio,
    pareto_front,
    plot_front,
    reprice,
    search,
)

SEARCHES = [  # (name, device whose roofline prices latency, budgets, objective, measure latency with the torch timer)
    ("max accuracy, bytes 0.6x", "cpu", ["bytes=0.6x"], "kl", False),
    ("min bytes, top-1 drop 1", "cpu", ["top1-drop=1.0"], "bytes", False),
    ("max accuracy, latency 0.8x (RTX 3080 roofline) + top-1 drop 2", "rtx3080", ["latency=0.8x", "top1-drop=2.0"], "kl",
     False),
    ("max accuracy, latency 0.9x (CPU roofline)", "cpu", ["latency=0.9x"], "kl", False),
    ("max accuracy, latency 0.9x: RTX 3080 roofline as the prior, measured on this CPU (torch fake-quant)", "rtx3080",
     ["latency=0.9x"], "kl", True),
]

def _log(line: str) -> None:
    print(line, flush=True)


def splits(name: str, n_calib: int, n_eval: int, n_val: int, n_test: int, seed: int):
    pool = load_image_folder(find_sample_dir())
    trained = zoo.training_images(name)
    if trained:
        pool = pool.without(trained)
    calib, rest = split(pool, n_calib, seed=seed)
    sens, rest = split(rest, n_eval, seed=seed + 1)
    val, test = split(rest, n_val, n_test, seed=seed + 2)
    return pool, calib, sens, val, test


class TestSet:
    """Held-out images: FP32 once, then any plan's top-1/top-5/agreement on the same images."""

    def __init__(self, hg, loader):
        self.hg, self.loader = hg, list(loader)
        self.fp32_pred = predict(hg.gm, self.loader, desc="fp32 test", progress=False)
        self.fp32 = accuracy(self.fp32_pred)

    def __call__(self, qgm) -> dict:
        acc = accuracy(predict(qgm, self.loader, desc="test", progress=False), self.fp32_pred)
        return {"test_top1": acc.top1, "test_top5": acc.top5, "test_agreement": acc.agreement,
                "test_drop": self.fp32.top1 - acc.top1, "test_kl": acc.kl}


def run_model(name: str, args: argparse.Namespace, out: Path) -> dict:
    start = time.perf_counter()
    model = zoo.create(name)
    config = data_config(model)
    gm = hyfx.capture(model, example_input(config))
    hg = hyfx.analyze(gm)
    pool, calib, sens, val, test = splits(name, args.n_calib, args.n_eval, args.n_val, args.n_test, args.seed)
    loaders = {k: make_loader(s, config, args.batch_size) for k, s in
               (("calib", calib), ("sens", sens), ("val", val), ("test", test))}
    _log(f"== {name}: {len(hg.layers())} quantizable layers; images: {len(pool)} usable, calib {len(calib)}, "
         f"table {len(sens)}, validation {len(val)}, test {len(test)}")

    configs = [BitConfig.parse(c) for c in args.configs.split(",")] if args.configs else list(DEFAULT_CONFIGS)
    cpu = this_cpu()
    stem = out / f"mixed_precision_{name}_table"
    t0 = time.perf_counter()
    if args.reuse_table and stem.with_suffix(".json").is_file():
        # same seed and counts give the same images, so the saved table is this run's table
        table = SensitivityTable.load(stem.with_suffix(".json"))
        images = table.meta.get("images")  # tables saved before images were recorded: check the counts
        same = images == calib.names() + sens.names() if images else (
            (table.fp32["n_calib"], table.fp32["n_eval"]) == (len(calib), len(sens)))
        if not same or table.configs != configs:
            raise HyfxError(f"{stem}.json was built on other images or configs: drop --reuse-table")
        policies = Policies(hg, loaders["calib"], configs, table.layers, progress=False)
        table_seconds = table.meta["seconds"]
    else:
        table, policies = build_table(hg, loaders["calib"], loaders["sens"], configs, profile=cpu, model=name,
                                      progress=not args.quiet)
        table_seconds = time.perf_counter() - t0
        table.meta.update(seconds=round(table_seconds, 1), images=calib.names() + sens.names())
    paths = table.save(stem)
    _log(f"table: {len(table.entries)} entries in {table_seconds:.0f} s → {paths['csv']}; pruned {len(table.pruned)}")
    work = graph_work(hg.gm, table.layers)
    priced = {"cpu": table}
    for dev in ("rtx3080", "h100"):
        priced[dev] = reprice(table, RooflineLatency(work, PROFILES[dev]), PROFILES[dev])

    reference = {layer: table.reference for layer in table.layers}
    test_set = TestSet(hg, loaders["test"])
    timer = TorchTimer(hg, policies, next(iter(loaders["calib"]))[0], repeats=args.repeats)
    measured_cache: dict[tuple, dict] = {}

    def measure(assignment: dict) -> dict:
        key = tuple(str(assignment[layer]) for layer in table.layers)
        if key not in measured_cache:
            qgm = hyfx.quantize(hg, policies.plan(assignment))
            figures = {"bytes": model_bytes(qgm), **test_set(qgm)}
            ratio, t, ref = latency_ratio(timer, assignment, reference, rounds=args.rounds)
            figures.update(cpu_latency_ratio=ratio, cpu_latency_s=t, cpu_reference_s=ref)
            measured_cache[key] = figures
        return measured_cache[key]

    ref_measured = measure(reference)
    _log(f"reference W8A8 on test: top-1 {ref_measured['test_top1']:.2f} (FP32 {test_set.fp32.top1:.2f}), "
         f"{ref_measured['bytes'] / 1e6:.3f} MB")

    # Pareto fronts: predicted by the table, every point measured on the test images
    fronts = {}
    for axis, dev in (("latency", "rtx3080"), ("bytes", "cpu")):
        front = pareto_front(priced[dev], axis, points=args.points)
        for p in front:
            assignment = {layer: BitConfig.parse(c) for layer, c in p.pop("assignment").items()}
            p["measured"] = measure(assignment)
            p["predicted"]["top1"] = (test_set.fp32.top1 - p["predicted"]["top1_drop"]
                                      if p["predicted"]["top1_drop"] is not None else None)
            _log(f"front {axis}[{dev}] {p['configs']}: predicted top-1 {p['predicted']['top1']:.2f} "
                 f"latency {p['predicted']['latency_ratio']:.3f}x {p['predicted']['bytes'] / 1e6:.3f} MB | measured "
                 f"top-1 {p['measured']['test_top1']:.2f}, {p['measured']['bytes'] / 1e6:.3f} MB, "
                 f"CPU latency {p['measured']['cpu_latency_ratio']:.3f}x")
        fronts[f"{axis}[{dev}]"] = front
    _plot_fronts(fronts, out / f"mixed_precision_{name}_fronts.png", name, test_set.fp32.top1)

    # budgeted searches with the measured-feedback loop
    searches = []
    for title, dev, budgets, minimize, timed in SEARCHES:
        evaluator = PlanEvaluator(hg, policies, loaders["calib"], loaders["val"], timer if timed else None, reference)
        lines: list[str] = []
        entry = {"name": title, "device": dev, "budgets": budgets, "minimize": minimize, "latency_measured": timed}
        try:
            result = search(priced[dev], [Budget.parse(b) for b in budgets], evaluator, minimize=minimize,
                            max_iter=args.max_iter, tolerance=args.tolerance, report=lines.append)
        except HyfxError as exc:
            entry.update(status="infeasible", error=str(exc), log=lines)
            _log(f"search '{title}': {exc}")
            searches.append(entry)
            continue
        test_figures = measure(result.assignment)
        model_pred = CostModel(priced[dev], result.corrections).predict(result.assignment)
        entry.update(status=result.status, configs=result.counts(), iterations=result.iterations, log=lines,
                     predicted=result.predicted, corrected_prediction=model_pred, validation=result.measured,
                     test=test_figures, reference=result.reference)
        searches.append(entry)
        _log(f"search '{title}': {result.status}, {len(result.iterations)} iteration(s), {result.counts()}; "
             f"test top-1 {test_figures['test_top1']:.2f} (pred. {test_set.fp32.top1 - result.predicted['top1_drop']:.2f})"
             f", CPU latency {test_figures['cpu_latency_ratio']:.3f}x (pred. {result.predicted['latency_ratio']:.3f}x "
             f"{dev} roofline)")
    return {
        "model": name, "layers": len(table.layers), "configs": [c.name for c in configs],
        "images": {"pool": len(pool), "calib": len(calib), "table": len(sens), "validation": len(val), "test": len(test)},
        "fp32_test": test_set.fp32.to_dict(), "reference_test": ref_measured, "table": str(paths["json"]),
        "table_seconds": round(table_seconds, 1), "pruned": table.pruned, "fronts": fronts, "searches": searches,
        "devices": {k: v.device for k, v in priced.items()}, "seconds": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/mixed_precision.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
    }


def _plot_fronts(fronts: dict, path: Path, name: str, fp32_top1: float) -> None:
    """Predicted vs measured top-1 along each front (latency: RTX 3080 roofline ratio; bytes: MB)."""
    by_axis = {}
    for key, front in fronts.items():
        axis = key.split("[")[0]
        by_axis[axis] = [{**p, "measured": {**p["measured"], "top1": p["measured"]["test_top1"]}} for p in front]
    plot_front(by_axis, path, title=f"{name}: HySquant fronts (latency axis: RTX 3080 roofline; top-1 on held-out "
                                    "test images)", fp32_top1=fp32_top1)


def _markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = ["# HySquant mixed precision: sensitivity, Pareto fronts, budgeted search", "",
             f"Made by `benchmarks/mixed_precision.py` on {platform.processor() or 'CPU'} (each model's command "
             "below). Accuracy: top-1 on held-out test images (never used for "
             "calibration, the table or the search), FP32 on the same images. Latency: roofline predictions are "
             "ratios to the all-W8A8 plan on the named device profile; measured latency is the PyTorch fake-quant "
             "model on this CPU (batch 1, median, alternated with the W8A8 model), also as a ratio — fake quantization "
             "computes in FP32, so it cannot get faster with fewer bits; it is the measured backend until an "
             "integer runtime is wired in.", ""]
    for r in results:
        fp = r["fp32_test"]
        lines += [f"## {r['model']}", "", f"`{r.get('command', '')}` (torch threads {r.get('threads', '?')})", "",
                  f"{r['layers']} layers × {', '.join(r['configs'])}; images: {r['images']}. Table built in "
                  f"{r['table_seconds']} s ({r['table']}, heat map beside it). FP32 test top-1 {fp['top1']:.2f} / top-5 "
                  f"{fp['top5']:.2f} (95% CI {fp['top1_ci95'][0]:.1f}–{fp['top1_ci95'][1]:.1f}, n={fp['n']}); all-W8A8: "
                  f"top-1 {r['reference_test']['test_top1']:.2f}, agreement {r['reference_test']['test_agreement']:.1f}%, "
                  f"{r['reference_test']['bytes'] / 1e6:.3f} MB.",
                  f"Pruned by the collapse rule: {len(r['pruned'])} layer configs"
                  + (f" ({', '.join(sorted({k.split('/')[0] for k in r['pruned']}))})" if r["pruned"] else "") + ".", ""]
        for key, front in r["fronts"].items():
            lines += [f"### Pareto front: top-1 vs {key}", "",
                      "| configs | pred. top-1 | test top-1 | test top-5 | agree % | pred. latency (RTX 3080) | "
                      "CPU fake-quant latency | pred. MB | measured MB |", "|---|---|---|---|---|---|---|---|---|"]
            for p in front:
                m, q = p["measured"], p["predicted"]
                lines.append(f"| {_configs(p['configs'])} | {q['top1']:.2f} | {m['test_top1']:.2f} | {m['test_top5']:.2f} | "
                             f"{m['test_agreement']:.1f} | {q['latency_ratio']:.3f}x | {m['cpu_latency_ratio']:.3f}x | "
                             f"{q['bytes'] / 1e6:.3f} | {m['bytes'] / 1e6:.3f} |")
            lines.append("")
        lines += ["### Budgeted searches (measured-feedback loop on validation images; test = held out)", "",
                  "| search | status | iterations | configs | pred. top-1 drop | val drop | test drop | pred. latency | "
                  "CPU latency | pred. MB | measured MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in r["searches"]:
            if s["status"] == "infeasible":
                lines.append(f"| {s['name']} | infeasible | {len(s['log'])} | — | — | — | — | — | — | — | — |")
                continue
            p, v, t = s["predicted"], s["validation"], s["test"]
            lines.append(f"| {s['name']} | {s['status']} | {len(s['iterations'])} | {_configs(s['configs'])} | "
                         f"{p['top1_drop']:+.2f} | {v['top1_drop']:+.2f} | {t['test_drop']:+.2f} | "
                         f"{p['latency_ratio']:.3f}x | {t['cpu_latency_ratio']:.3f}x | {p['bytes'] / 1e6:.3f} | "
                         f"{t['bytes'] / 1e6:.3f} |")
        lines.append("")
        for s in r["searches"]:
            lines += [f"**{s['name']}** ({', '.join(s['budgets'])}):", "", "```", *s["log"]]
            if s["status"] == "infeasible":
                lines.append(f"error: {s['error']}")
            lines += ["```", ""]
    lines += ["## Closing note", "", *_closing(results), ""]
    return "\n".join(lines)


def _configs(counts: dict) -> str:
    return " ".join(f"{k}×{v}" for k, v in counts.items())


def _closing(results: list[dict]) -> list[str]:
    hybrid = next((r for r in results if r["model"] == "lite0-vit-real"), None)
    out = []
    if hybrid is None:
        out.append("The real-weight hybrid (lite0-vit-real) had no checkpoint when this ran, so its front is not here; "
                   "the figures below are lite0-real's. Re-run once hyfx/weights/lite0_vit_real.pth exists.")
    for r in results:
        front = r["fronts"].get("bytes[cpu]", [])
        if front:
            gaps = [p["measured"]["test_top1"] - p["predicted"]["top1"] for p in front]
            out.append(f"- {r['model']}: bytes front from {front[0]['predicted']['bytes'] / 1e6:.2f} MB to "
                       f"{front[-1]['predicted']['bytes'] / 1e6:.2f} MB; test top-1 minus predicted top-1 along it: "
                       f"{min(gaps):+.2f} to {max(gaps):+.2f} points.")
        for s in r["searches"]:
            if s["status"] == "infeasible":
                out.append(f"  - {s['name']}: no plan — {s['error']}")
                continue
            p, t = s["predicted"], s["test"]
            out.append(f"  - {s['name']}: chosen plan {_configs(s['configs'])}; test top-1 {t['test_top1']:.2f} vs "
                       f"predicted {r['fp32_test']['top1'] - p['top1_drop']:.2f} (measured − predicted drop "
                       f"{t['test_drop'] - p['top1_drop']:+.2f} points); bytes measured {t['bytes'] / 1e6:.3f} MB vs predicted "
                       f"{p['bytes'] / 1e6:.3f} MB; latency predicted {p['latency_ratio']:.3f}x ({s['device']} roofline) vs "
                       f"{t['cpu_latency_ratio']:.3f}x measured on this CPU's fake-quant model.")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["lite0-real", "lite0-vit-real"])
    parser.add_argument("--configs", default="", help="default W4A4,W4A8,W8A4,W8A8")
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=64, help="table top-1 images")
    parser.add_argument("--n-val", type=int, default=150, help="feedback-loop images")
    parser.add_argument("--n-test", type=int, default=None, help="held-out test images (default: all the rest)")
    parser.add_argument("--points", type=int, default=10, help="budget levels swept per front")
    parser.add_argument("--max-iter", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per latency median")
    parser.add_argument("--rounds", type=int, default=3, help="alternated reference/plan timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--reuse-table", action="store_true", help="load the table this run saved before (same images)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from the per-model JSON files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in [] if args.render_only else args.models:
        if name == "lite0-vit-real" and not zoo.HYBRID_CHECKPOINT.is_file():
            _log(f"skipping {name}: {zoo.HYBRID_CHECKPOINT} does not exist yet")
            continue
        result = run_model(name, args, out)
        (out / f"mixed_precision_{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    # the report covers every model with results here, so models run separately (or in parallel) end up together
    results = [json.loads(path.read_text()) for name in ("lite0-real", "lite0-vit-real")
               if (path := out / f"mixed_precision_{name}.json").is_file()]
    (out / "mixed_precision.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "mixed_precision.md").write_text(_markdown(results, args))
    _log(f"wrote {out / 'mixed_precision.json'} and {out / 'mixed_precision.md'} ({len(results)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
