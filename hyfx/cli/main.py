"""`hyfx inspect | quantize | eval`: the pipeline from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

import hyfx
from hyfx import splits, zoo
from hyfx.capture import capture_report
from hyfx.data import data_config, example_input, load_image_folder, make_loader, verify_images
from hyfx.errors import HyfxError
from hyfx.evaluate import compare
from hyfx.files import check_writable, write_text
from hyfx.graph import HybridGraph
from hyfx.meta import SPLIT_OUTLIERS as SPLIT_META
from hyfx.passes.split_outliers import outlier_convs
from hyfx.quant.spec import check_bits
from hyfx.quant.targets import available_targets, check_bits_for_target
from hyfx.report import block_table, write_graph


def _model(args: argparse.Namespace) -> torch.nn.Module:
    return zoo.create(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)


def _captured(model: torch.nn.Module) -> tuple[torch.fx.GraphModule, dict]:
    config = data_config(model)
    gm = hyfx.capture(model, example_input(config))
    return gm, config


def cmd_inspect(args: argparse.Namespace) -> int:
    model = _model(args)
    gm, _ = _captured(model)
    hg = hyfx.analyze(gm)
    print(capture_report(gm).summary())
    print(block_table(hg))
    outliers = _weight_outliers(gm)
    if args.graph:
        for path in args.graph:
            print(f"wrote {write_graph(hg, path)}")
    if args.json:
        write_text(args.json, json.dumps({**_inspect_json(hg), "weight_outliers": outliers}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _weight_outliers(gm: torch.fx.GraphModule) -> dict:
    """The convs `--split-outliers` would split, announced: worth knowing before choosing low bit-widths."""
    outliers = outlier_convs(gm)
    if outliers:
        gains = ", ".join(f"{k} range ÷{v['range_gain']}" for k, v in outliers.items())
        print(f"weight outliers: {len(outliers)} convs hold weights far outside their channel's spread ({gains}); "
              "quantize with --split-outliers to keep low-bit resolution there")
    return outliers


def _inspect_json(hg: HybridGraph) -> dict:
    return {
        "blocks": [{"name": b.name, "kind": b.kind, "bridge": b.bridge, "counts": dict(b.counts), "layers": b.layers}
                   for b in hg.blocks],
        "bridges": [{"block": b.block, "layers": b.layers, "into": b.into, "exit_layers": b.exit_layers}
                    for b in hg.bridges],
    }


def _recipe_options(args: argparse.Namespace) -> dict:
    options = {}
    for bits in (args.bits, args.w_bits, args.a_bits):
        if bits is not None:
            check_bits(bits)
    if args.bits is not None:
        options.update(w_bits=args.bits, a_bits=args.bits)
    if args.w_bits is not None:
        options["w_bits"] = args.w_bits
    if args.a_bits is not None:
        options["a_bits"] = args.a_bits
    if args.edge_bits is not None:
        options["edge_bits"] = check_bits(args.edge_bits)
    return options


def _check_recipe_options(args: argparse.Namespace, recipe: hyfx.recipes.Recipe, options: dict) -> None:
    """Options the recipe or the target cannot take fail before the model is built (make_plan checks them again)."""
    check_bits_for_target(args.target, options.get("w_bits", 8), options.get("a_bits", 8))
    if "edge_bits" in options and "edge_bits" not in recipe.options:
        raise HyfxError(f"--edge-bits is an option of the qhyvit recipe, not of {args.recipe}: drop it or use qhyvit")


def cmd_quantize(args: argparse.Namespace) -> int:
    options = _recipe_options(args)  # bad bit-widths fail before the model is built
    if args.adaround is not None and args.adaround < 1:
        raise HyfxError(f"--adaround {args.adaround}: give a positive number of steps per layer (default 500)")
    if args.learn_activations is not None and args.learn_activations < 1:
        raise HyfxError(f"--learn-activations {args.learn_activations}: give a positive number of steps (default 150)")
    if args.reconstruct_blocks is not None and args.reconstruct_blocks < 1:
        raise HyfxError(f"--reconstruct-blocks {args.reconstruct_blocks}: give a positive number of steps per block "
                        "(default 500)")
    if args.reconstruct_blocks is not None and args.adaround is not None:
        raise HyfxError("--adaround and --reconstruct-blocks both learn the weights' rounding: give one of them")
    if args.split_outliers is not None and args.split_outliers <= 0:
        raise HyfxError(f"--split-outliers {args.split_outliers}: give a positive number of standard deviations")
    recipe = hyfx.recipes.get(args.recipe)
    _check_recipe_options(args, recipe, options)
    calib, _ = splits.calibration_split(args.model, load_image_folder(args.calib), args.n_calib, seed=args.seed,
                                        from_training=args.calib_from_training, calibration_only=True)
    verify_images(calib)  # a bad image folder fails before the model is built
    model = _model(args)
    gm, config = _captured(model)
    loader = make_loader(calib, config, batch_size=args.batch_size)
    hg = hyfx.analyze(gm, args.split_outliers)
    plan = hyfx.make_plan(args.recipe, hg, loader, target=args.target, bias_correction=args.bias_correction,
                          rounding_iters=args.adaround or 0, activation_steps=args.learn_activations or 0,
                          block_iters=args.reconstruct_blocks or 0, **options)
    plan.model = args.model
    plan.meta["calibration"] = {**plan.meta.get("calibration", {}), "images": calib.names(), "seed": args.seed,
                                 "source": "training" if args.calib_from_training else "held-out"}
    hyfx.save_plan(plan, args.out)
    print(f"{args.recipe} plan for {args.model}: {len(plan.layers)} layers, {plan.summary()}; "
          f"{len(calib)} calibration images; {plan.meta['plan_seconds']} s → {args.out}")
    if args.split_outliers is not None:
        split_layers = hg.gm.meta[SPLIT_META]["layers"]
        print(f"outlier weights split out of {len(split_layers)} convs: {', '.join(split_layers) or 'none'}")
    else:
        _weight_outliers(gm)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.n_eval is not None and args.n_eval < 1:
        raise HyfxError(f"--n-eval {args.n_eval}: give a positive number of images (or leave it out to use all)")
    plan = hyfx.load_plan(args.plan)
    if plan.model and plan.model != args.model:
        raise HyfxError(f"plan {args.plan} was made for {plan.model}, not {args.model}: pass the matching model")
    pool = splits.evaluation_images(args.model, args.data, plan.meta.get("calibration", {}).get("images", []),
                                    args.n_eval, seed=args.seed)
    if not len(pool):
        raise HyfxError(f"every image in {args.data} calibrated the plan or trained the model: pass other images")
    verify_images(pool)
    model = _model(args)
    classes = getattr(model, "num_classes", None)
    if classes and max(pool.labels) >= classes:
        raise HyfxError(f"{args.data} labels an image with class {max(pool.labels)}, beyond {args.model}'s {classes} "
                        "classes: fix the labels (0-based class indices)")
    gm, config = _captured(model)
    if args.deployed:
        deployed, label = _model_file(args.deployed, args.precision)
    else:
        deployed, label = _deployed(gm, plan, args.backend, args.precision)
    loader = make_loader(pool, config, batch_size=args.batch_size)
    results = compare(gm, {label: deployed}, loader)
    real = zoo.is_real_weights(args.model) or args.checkpoint is not None
    print(f"{args.model} on {len(pool)} images (calibration images excluded)"
          + ("" if real else " — RANDOM WEIGHTS: accuracy is meaningless, parity only"))
    width = max(16, len(label) + 2)
    print(f"{'model':<{width}}{'top-1':>8}{'top-5':>8}{'95% CI top-1':>18}{'agree':>8}{'KL':>10}")
    for name, acc in results.items():
        agree = f"{acc.agreement:7.2f}%" if acc.agreement is not None else f"{'':>8}"
        kl = f"{acc.kl:10.4f}" if acc.kl is not None else f"{'':>10}"
        ci = f"[{acc.top1_ci95[0]:.1f}, {acc.top1_ci95[1]:.1f}]"
        print(f"{name:<{width}}{acc.top1:7.2f}%{acc.top5:7.2f}%{ci:>18}{agree}{kl}")
    if args.json:
        payload = {"model": args.model, "plan": str(args.plan), "backend": args.backend, "deployed": args.deployed,
                   "label": label, "images": len(pool), "real_weights": real,
                   "results": {k: v.to_dict() for k, v in results.items()}}
        write_text(args.json, json.dumps(payload, indent=1) + "\n")
    return 0


BACKENDS = ("fake", "ort", "openvino")


def _model_file(path: str, precision: str) -> tuple[object, str]:
    """(images → logits, row label) of a model file `hyfx export` wrote, run as it is in its runtime."""
    if not Path(path).is_file():
        raise HyfxError(f"--deployed {path}: no such file; pass the .onnx or .xml that `hyfx export` wrote")
    suffix = Path(path).suffix
    if suffix not in (".onnx", ".xml"):
        raise HyfxError(f"--deployed {path}: expected an ONNX model (.onnx) or an OpenVINO IR (.xml)")
    runtime = "ONNX Runtime" if suffix == ".onnx" else "OpenVINO"
    try:
        if suffix == ".onnx":
            from hyfx.backends import ort

            return ort.runner(ort.session(path)), f"{Path(path).name} (ORT)"
        from hyfx.backends import openvino

        compiled = openvino.compile_model(path, precision)
        return openvino.runner(compiled), f"{Path(path).name} (OpenVINO {openvino.inference_precision(compiled)})"
    except Exception as e:  # the runtimes raise their own types (InvalidProtobuf, RuntimeError, ...)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HyfxError(f"--deployed {path}: {runtime} cannot load it ({reason}); export it again with hyfx export"
                        ) from None


def _deployed(gm: torch.fx.GraphModule, plan: hyfx.QuantPlan, backend: str, precision: str) -> tuple[object, str]:
    """(images → logits, row label): the plan as PyTorch fake quantization, or lowered and run in its runtime."""
    if backend == "fake":
        return hyfx.quantize(gm, plan), plan.recipe
    if backend == "ort":
        from hyfx.backends import ort

        return ort.runner(ort.session(hyfx.export(gm, plan, target="ort").model)), f"{plan.recipe} (ORT)"
    from hyfx.backends import openvino

    lowered = hyfx.export(gm, plan, target="openvino")
    compiled = openvino.compile_model(lowered.model, precision)
    narrowed = ", 7-bit weights: no VNNI" if lowered.narrowed else ""
    return openvino.runner(compiled), f"{plan.recipe} (OpenVINO {openvino.inference_precision(compiled)}{narrowed})"


def cmd_search(args: argparse.Namespace) -> int:
    from hyfx.cli.search import check_search_args, search_command
    from hyfx.graph import GraphRecipe

    check_search_args(args)  # bad budgets fail before the model is built
    model = _model(args)
    gm, config = _captured(model)
    real = zoo.is_real_weights(args.model) or args.checkpoint is not None
    return search_command(args, gm, config, splits.usable_images(args.model, args.calib), real,
                          rebuild=GraphRecipe(model, tuple(example_input(config).shape)))


def cmd_export(args: argparse.Namespace) -> int:
    from hyfx.cli.export import export_command

    gm, config = _captured(_model(args))
    return export_command(args, gm, config, partial(splits.usable_images, args.model))


def cmd_bench(args: argparse.Namespace) -> int:
    from hyfx.cli.ray_options import check_ray_args
    from hyfx.pipelines.bench import METHODS, bench_model, variants
    from hyfx.pipelines.bench_report import render

    for b in args.bits:
        check_bits(b)  # bad bit-widths fail before the model is built
    check_ray_args(args)
    if args.quick:
        args.bits, args.methods, args.no_ablation, args.no_full, args.runs = [8], ["minmax", "qhyvit"], True, True, 10
    rows = variants(args.methods or METHODS, ablation=not args.no_ablation, full=not args.no_full)
    out = Path(args.out or f"bench_{args.model}")

    def save(result: dict) -> None:  # partial results survive an interrupted run
        write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")

    torch.set_num_threads(args.threads)
    result = bench_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, folder=args.data,
                         n_calib=args.n_calib, n_eval=args.n_eval, seed=args.seed, bits=args.bits, rows=rows,
                         latency=not args.no_latency, runs=args.runs, threads=args.threads, on_update=save,
                         workers=args.workers, ray_address=args.ray_address)
    save(result)
    report = render([result], title=f"hyfx bench {args.model}")
    write_text(out.with_suffix(".md"), report + "\n")
    print(report)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({result['seconds']} s)")
    return 0


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a timm model name or a zoo entry ({', '.join(zoo.list_models())})")
    parser.add_argument("--checkpoint", help="local state dict to load into the architecture (strict)")
    parser.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network access)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyfx", description=hyfx.__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="blocks (cnn / transformer / bridge), node kinds, bridges")
    _add_model_args(p)
    p.add_argument("--graph", nargs="*", help="write the tagged graph: .dot, .png or .svg")
    p.add_argument("--json", help="write blocks and bridges as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("quantize", help="calibrate a recipe and write its QuantPlan (JSON)")
    _add_model_args(p)
    p.add_argument("--recipe", default="efficientquant", choices=hyfx.recipes.available())
    p.add_argument("--calib", required=True, help="image folder (class subfolders, or images + labels.csv)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration images drawn from --calib (default 32)")
    p.add_argument("--calib-from-training", action="store_true",
                   help="draw the calibration images from those the model was trained on (a zoo hybrid's "
                        "distillation images), as the PTQ papers calibrate on ImageNet train; every held-out image "
                        "is then left for eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, help="weight and activation bits (2-8)")
    p.add_argument("--w-bits", type=int)
    p.add_argument("--a-bits", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--target", default="fake", choices=available_targets(),
                   help="backend the plan must run on (ort: per-tensor activations; tensorrt: symmetric int8 only)")
    p.add_argument("--bias-correction", action="store_true",
                   help="add to each quantized conv / linear bias the mean output shift its weight rounding causes")
    p.add_argument("--adaround", type=int, nargs="?", const=500, default=None, metavar="ITERS",
                   help="learn each conv / linear weight's rounding (AdaRound, ITERS steps per layer, default 500) "
                        "after the recipe; slow: ~15 min for a lite0-sized model on 2 cores")
    p.add_argument("--reconstruct-blocks", type=int, nargs="?", const=500, default=None, metavar="ITERS",
                   help="after the recipe, learn every weight's rounding and activation scale block by block against "
                        "the FP32 block outputs (BRECQ with QDrop, ITERS steps per block, default 500)")
    p.add_argument("--edge-bits", type=int, metavar="BITS",
                   help="qhyvit: quantize the first and last weighted layers (stem conv, classifier) with BITS bits "
                        "(the low-bit PTQ literature keeps them at 8) instead of --bits")
    p.add_argument("--learn-activations", type=int, nargs="?", const=150, default=None, metavar="STEPS",
                   help="after the recipe, train every uniform activation scale at once for STEPS steps (default 150) "
                        "to minimise KL(FP32 || quantized) of the outputs on the calibration images; give it a few "
                        "hundred images (--n-calib), 32 overfit")
    p.add_argument("--split-outliers", type=float, nargs="?", const=16.0, default=None, metavar="SIGMA",
                   help="first move conv weights more than SIGMA robust std devs from their channel's median "
                        "(default 16) into a conv of their own, so the rest keep low-bit resolution; "
                        "the plan records it and eval / export apply it")
    p.add_argument("--out", default="plan.json")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="top-1/top-5 of FP32 vs the quantized model on the same images")
    _add_model_args(p)
    p.add_argument("--plan", required=True)
    p.add_argument("--data", required=True, help="image folder; the plan's calibration images are left out")
    p.add_argument("--n-eval", type=int, help="evaluate on this many images (default: all)")
    p.add_argument("--backend", choices=BACKENDS, default="fake",
                   help="where the quantized model runs: fake (PyTorch fake quantization, the plan itself), ort "
                        "(its ONNX QDQ export in ONNX Runtime) or openvino (in OpenVINO on this CPU)")
    p.add_argument("--deployed", metavar="FILE",
                   help="evaluate this file as written by `hyfx export` (.onnx in ONNX Runtime, .xml in OpenVINO) "
                        "instead of lowering the plan again; --plan still names the calibration images to leave out")
    p.add_argument("--precision", choices=("default", "f32"), default="default",
                   help="--backend openvino / an .xml --deployed: the float parts' precision (default: the CPU's choice, bf16 on "
                        "AVX-512 BF16 / AMX CPUs; f32 forces FP32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    from hyfx.cli.search import add_search_arguments

    p = sub.add_parser("search", help="HySquant: per-layer bit-widths under latency / energy / bytes / top-1 budgets")
    _add_model_args(p)
    add_search_arguments(p)
    p.set_defaults(func=cmd_search)

    from hyfx.cli.export import add_export_arguments

    p = sub.add_parser("export", help="lower a plan to ONNX QDQ for ONNX Runtime or TensorRT")
    _add_model_args(p)
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)

    from hyfx.cli.ray_options import add_ray_arguments
    from hyfx.pipelines.bench import METHODS

    p = sub.add_parser("bench", help="one model through the seed papers' tables (recipes × bits, full quantization, "
                                     "ablation) and ONNX Runtime latency / size")
    _add_model_args(p)
    p.add_argument("--data", help="image folder (default: $HYFX_SAMPLE_DIR or the shared ImageNet sample)")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--n-eval", type=int, help="evaluation images (default: every image not used for calibration)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6], help="W{b}A{b} settings (default 8 6)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help=f"default: {' '.join(METHODS)}")
    p.add_argument("--no-ablation", action="store_true", help="skip Q-HyViT's Table 3 ablation")
    p.add_argument("--no-full", action="store_true", help="skip full quantization (Q-HyViT's Table 2)")
    p.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency / size table")
    p.add_argument("--runs", type=int, default=30, help="timed runs per latency median")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="W8A8 minmax and qhyvit only, 10 timed runs")
    add_ray_arguments(p, "make the accuracy tables' plans")
    p.add_argument("--out", help="output stem: writes <stem>.json and <stem>.md (default bench_<model>)")
    p.set_defaults(func=cmd_bench)
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Every file the command will write is writable (its folder created if missing) before any work is done."""
    for name in ("out", "json", "front"):
        if getattr(args, name, None):
            path = Path(getattr(args, name))
            check_writable(path.with_suffix(".json") if args.command == "bench" and name == "out" else path,
                           f"--{name}")
    for path in getattr(args, "graph", None) or []:
        check_writable(path, "--graph")
    if getattr(args, "table", None) and not Path(args.table).is_file():
        check_writable(args.table, "--table")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="hyfx: %(message)s")
    if not args.verbose:  # torch's own logs and warnings (e.g. a failed export's graph dump) only with -v
        for name in ("torch", "torch._dynamo", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore")
    try:
        _check_outputs(args)
        return args.func(args)
    except HyfxError as exc:
        print(f"hyfx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every output is written atomically: an interrupted run leaves none behind
        print("hyfx: interrupted, nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
