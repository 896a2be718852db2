"""HySquant's sensitivity table on Ray against the serial table: speed-up, per-task overhead, and a projection.

One model, its layers × --configs on --n-calib calibration + --n-eval labelled images, built three ways on this
machine, each with one torch thread per worker: serial (no Ray), on a local Ray with 1 worker, and with --workers
workers. The tables must be identical (checked); the report gives the wall seconds of each, the speed-up, the
per-task overhead (Ray with one worker against serial, over its tasks) and, from the measured per-evaluation
cost, what the full table (every layer × 4 configs) on ImageNet-val (50,000 images) would take on K machines of
this kind — computed, not run.

    python benchmarks/distributed_table.py                      # lite0-vit-real, 2 workers
Needs the distributed extra (`pip install -e ".[distributed]"`). Writes benchmarks/results/distributed_table.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hyfx import ray_workers, zoo
from hyfx.cpu import cpu_info
from hyfx.data import data_config, example_input, load_image_folder, make_loader, split
from hyfx.graph import GraphRecipe
from hyfx.hardware import DEFAULT_CONFIGS, BitConfig, this_cpu
from hyfx.mixed import distributed
from hyfx.mixed.sensitivity import CHUNK, Policies, build_table

RESULTS = Path(__file__).resolve().parent / "results"
IMAGENET_VAL = 50_000


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite0-vit-real")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample"))
    parser.add_argument("--configs", default="W4A8,W8A8")
    parser.add_argument("--n-calib", type=int, default=16)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "distributed_table"))
    args = parser.parse_args(argv)

    model = zoo.create(args.model).eval()
    config = data_config(model)
    recipe = GraphRecipe(model, tuple(example_input(config).shape))
    hg = recipe()
    calib, evaluation = split(load_image_folder(args.data), args.n_calib, args.n_eval)
    calib_loader = list(make_loader(calib, config, batch_size=16))
    eval_loader = list(make_loader(evaluation, config, batch_size=16))
    configs = [BitConfig.parse(c) for c in args.configs.split(",")]
    profile = this_cpu()
    torch.set_num_threads(1)
    common = dict(profile=profile, chunk=CHUNK, progress=False)
    common["policies"] = Policies(hg, calib_loader, configs, hg.layers(), progress=False)  # ranges once, shared

    serial, t_serial = _timed(lambda: build_table(hg, calib_loader, eval_loader, configs, **common)[0])
    runs = {}
    for workers in (1, args.workers):
        table, wall = _timed(lambda w=workers: build_table(hg, calib_loader, eval_loader, configs, workers=w,
                                                           ray_address=None if w > 1 else "local",
                                                           rebuild=recipe, **common)[0])
        runs[workers] = {**ray_workers.LAST_RUN, "pool_seconds": ray_workers.LAST_RUN["wall_seconds"],
                         "wall_seconds": wall, "identical_to_serial": table.to_dict() == serial.to_dict()}

    n_images = args.n_calib + args.n_eval
    layers = len(hg.layers())
    per_eval = t_serial / (layers * len(configs) * n_images)
    one = runs[1]
    setup = max(one["setup_seconds"])  # a worker rebuilding the graph (capture + analysis), once per worker
    overhead = (one["wall_seconds"] - t_serial - setup) / one["tasks"]  # Ray's own cost per task (and its start-up)
    speedup = t_serial / runs[args.workers]["wall_seconds"]
    full_serial = per_eval * layers * len(DEFAULT_CONFIGS) * IMAGENET_VAL
    projection = []
    for machines in (1, 4, 16, 64):
        workers = machines * args.workers
        efficiency = speedup / args.workers  # as measured on this machine (two workers sharing its cores)
        tasks = len(distributed.plan_tasks(IMAGENET_VAL, CHUNK, hg.layers(), workers))
        seconds = full_serial / (workers * efficiency) + setup + overhead * tasks / workers
        projection.append({"machines": machines, "workers": workers, "tasks": tasks, "hours": seconds / 3600})
    report = {
        "model": args.model, "layers": layers, "configs": [c.name for c in configs], "images": n_images,
        "cpu": {"model": cpu_info().model, "flags": {f: f in cpu_info().flags for f in ("avx2", "avx512f",
                                                                                          "avx512_vnni", "amx_tile")}},
        "serial_seconds": t_serial, "runs": {str(k): v for k, v in runs.items()}, "speedup": speedup,
        "worker_setup_seconds": setup, "per_task_overhead_seconds": overhead, "seconds_per_evaluation": per_eval,
        "full_table": {"layers": layers, "configs": len(DEFAULT_CONFIGS), "images": IMAGENET_VAL,
                       "serial_hours": full_serial / 3600, "projection": projection,
                       "note": "computed from the measured per-evaluation cost and speed-up, not run"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = [f"# Sensitivity table on Ray: {args.model}, {layers} layers × {len(configs)} configs × {n_images} images",
          "", f"CPU: {report['cpu']['model']}, one torch thread per worker.", "",
          "| run | wall s | × serial | identical to serial |", "|---|---|---|---|",
          f"| serial (no Ray) | {t_serial:.1f} | 1.00 | — |"]
    for k, v in runs.items():
        md.append(f"| Ray, {k} worker{'s' if int(k) > 1 else ''} | {v['wall_seconds']:.1f} | "
                  f"{t_serial / v['wall_seconds']:.2f} | {v['identical_to_serial']} |")
    noise = " (below zero: within this machine's run-to-run noise)" if overhead < 0 else ""
    md += ["", "Wall seconds include starting the local Ray. A worker's set-up (rebuilding the graph): "
           f"{setup:.1f} s. Per-task overhead (Ray 1 worker − serial − set-up, over {one['tasks']} tasks): "
           f"{overhead:.2f} s{noise}; per evaluation (layer × config × image): {per_eval * 1e3:.2f} ms.", "",
           f"Full table, computed (not run): {layers} layers × {len(DEFAULT_CONFIGS)} configs × {IMAGENET_VAL} images "
           f"= {full_serial / 3600:.1f} h serial on one thread of this CPU.", "",
           "| machines (× workers) | hours |", "|---|---|"]
    md += [f"| {p['machines']} (× {args.workers}) | {p['hours']:.1f} |" for p in projection]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
