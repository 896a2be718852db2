"""`hyfx search`: the HySquant workflow from the command line (arguments, image splits, reporting)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.fx as fx

import hyfx
from hyfx.cli.ray_options import add_ray_arguments, check_ray_args
from hyfx.data import ImageSet, make_loader, verify_images
from hyfx.errors import HyfxError
from hyfx.files import write_text
from hyfx.hardware import DEFAULT_CONFIGS, BitConfig
from hyfx.mixed import BUDGET_METRICS, Budget, SensitivityTable, pareto_front, plot_front, run_hysquant
from hyfx.pipelines.hysquant import TIMERS as TIMER_CLASSES
from hyfx.splits import search_split

TIMERS = ("none", "ort", "torch")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", required=True, help="image folder; calibration, table and validation images are drawn "
                                                  "from it (disjoint), the rest stay held out for `hyfx eval`")
    p.add_argument("--budget", action="append", default=[], metavar="METRIC=VALUE",
                   help=f"repeatable; METRIC in {', '.join(BUDGET_METRICS)}; VALUE absolute (ms, MB, points, nats) "
                        "or a ratio like 0.8x of the plan with every layer at the widest config")
    p.add_argument("--configs", default=",".join(c.name for c in DEFAULT_CONFIGS),
                   help="comma-separated per-layer choices (default W4A4,W4A8,W8A4,W8A8; bits 2-8)")
    p.add_argument("--minimize", default="kl", choices=("kl", "latency", "energy", "bytes"),
                   help="ILP objective (default: summed KL, i.e. maximise predicted accuracy)")
    p.add_argument("--device", default="cpu", help="roofline / energy profile: cpu (this machine), rtx3080, h100, "
                                                   "or a profile .json")
    p.add_argument("--timer", default="none", choices=TIMERS,
                   help="measure latency in the feedback loop: ort = the exported int8 model in ONNX Runtime, "
                        "torch = PyTorch fake-quant on this CPU "
                        "(default none: latency budgets are judged on the roofline prediction)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration images (ranges and the KL proxy)")
    p.add_argument("--n-eval", type=int, default=64, help="labelled images for the table's top-1/top-5 (0: KL only)")
    p.add_argument("--n-val", type=int, default=200, help="labelled images the feedback loop measures plans on")
    p.add_argument("--max-iter", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=1.0,
                   help="top-1 points measured accuracy may fall below the prediction before the model is corrected")
    p.add_argument("--table", help="sensitivity table .json: reused when it exists, else built and saved there "
                                   "(with .csv and heat-map .png beside it)")
    p.add_argument("--front", help="write Pareto fronts (predicted top-1/KL vs latency and vs bytes) to this .json "
                                   "and a .png beside it")
    p.add_argument("--observer", default="minmax", choices=("minmax", "percentile"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="plan.json")
    add_ray_arguments(p, "build the sensitivity table")


def check_search_args(args: argparse.Namespace) -> tuple[list[Budget], list[BitConfig]]:
    """Parse budgets and configs before any model is built, so bad input fails in a second."""
    if not args.budget:
        raise HyfxError("give at least one --budget, e.g. --budget bytes=0.75x or --budget latency=0.8x")
    budgets = [Budget.parse(b) for b in args.budget]
    configs = [BitConfig.parse(c) for c in args.configs.split(",") if c.strip()]
    if not configs:
        raise HyfxError("--configs is empty: list per-layer choices such as W4A8,W8A8")
    for name in ("n_calib", "n_eval", "n_val"):
        if getattr(args, name) < (1 if name == "n_calib" else 0):
            raise HyfxError(f"--{name.replace('_', '-')} must be {'positive' if name == 'n_calib' else '0 or more'}")
    check_ray_args(args)
    return budgets, configs


def search_command(args: argparse.Namespace, gm: fx.GraphModule, config: dict, pool: ImageSet, real: bool,
                   rebuild=None) -> int:
    budgets, configs = check_search_args(args)
    calib, sens, val = search_split(pool, args.n_calib, args.n_eval, args.n_val, args.seed)
    for images in (calib, sens, val):
        verify_images(images)
    loaders = [make_loader(s, config, args.batch_size) if len(s) else None for s in (calib, sens, val)]
    hg = hyfx.analyze(gm)
    table = None
    if args.table and Path(args.table).is_file():
        table = SensitivityTable.load(args.table)
        if table.layers != hg.layers() or table.model not in ("", args.model):
            raise HyfxError(f"table {args.table} was built for another model ({table.model}): remove it or pass another")
        print(f"reusing sensitivity table {args.table} ({len(table.layers)} layers × {len(table.configs)} configs)")
    if not real:
        print(f"{args.model} has RANDOM WEIGHTS: accuracy figures are meaningless (mechanics only)")
    run = run_hysquant(hg, loaders[0], budgets, eval_loader=loaders[1], val_loader=loaders[2], configs=configs,
                       device=args.device, timer=TIMER_CLASSES.get(args.timer), minimize=args.minimize,
                       max_iter=args.max_iter, tolerance=args.tolerance, table=table, model=args.model,
                       observer=args.observer, report=print, workers=args.workers, ray_address=args.ray_address,
                       rebuild=rebuild)
    if args.table and table is None:
        paths = run.table.save(Path(args.table).with_suffix(""))
        print(f"sensitivity table → {paths['json']}, {paths['csv']}, {paths['png']}")
    if run.table.pruned:
        print(f"pruned (collapse at low activation bits): {len(run.table.pruned)} layer configs")
    plan = run.plan
    plan.meta["calibration"] = {**plan.meta.get("calibration", {}), "seed": args.seed,
                                "images": calib.names() + sens.names() + val.names(),
                                "split": {"calib": len(calib), "table": len(sens), "validation": len(val)}}
    hyfx.save_plan(plan, args.out)
    result = run.result
    print(f"plan ({result.status}): {result.counts()} → {args.out}")
    for budget in budgets:
        verdict = result.iterations[-1].get("budgets", {}).get(str(budget)) if result.measured else None
        print(f"  {budget}: " + ("met (measured)" if verdict else "predicted met" if verdict is None else "MISSED"))
    print(f"held-out accuracy: hyfx eval {args.model} --plan {args.out} --data {args.calib}")
    if args.front:
        fronts = {axis: pareto_front(run.table, axis, corrections=result.corrections) for axis in ("latency", "bytes")}
        path = Path(args.front)
        write_text(path, json.dumps({"model": args.model, "fp32_top1": result.reference.get("fp32_top1"),
                                    "latency_source": run.table.latency_source, "fronts": fronts}, indent=1) + "\n")
        plot_front(fronts, path.with_suffix(".png"), title=f"{args.model}: HySquant Pareto fronts (predicted)",
                   fp32_top1=result.reference.get("fp32_top1"))
        print(f"Pareto fronts → {path}, {path.with_suffix('.png')}")
    return 0
