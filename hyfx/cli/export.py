"""`hyfx export`: arguments, then plan → ONNX QDQ (or the ORT CPU int8 lowering), optionally with a parity check."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hyfx.errors import HyfxError
from hyfx.files import check_writable, write_text
from hyfx.quant.targets import available_targets, get_target
from hyfx.splits import evaluation_images, plan_calibration_images


def _lowered_targets() -> list[str]:
    return [name for name in available_targets() if get_target(name).lowering is not None]


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, help="a plan from `hyfx quantize`")
    p.add_argument("--target", choices=_lowered_targets(), default="ort",
                   help="ort / tensorrt: ONNX QDQ; openvino: OpenVINO IR (.xml + .bin)")
    p.add_argument("--out", help="output file (default model.onnx; model.xml for --target openvino)")
    p.add_argument("--log2-mode", default="exact", choices=("exact", "table", "uniform", "fp8"),
                   help="how log2 post-softmax quantizers are lowered (exact/table: faithful; uniform/fp8: fast)")
    p.add_argument("--symmetric", action="store_true",
                   help="make an asymmetric plan symmetric int8 first (TensorRT has no zero points)")
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm separate (the plan's exact graph)")
    p.add_argument("--cpu-int8", action="store_true",
                   help="int8 only where this CPU runs it faster, chosen by timing (ort: needs --calib; openvino: "
                        "the layers left float lose their quantizers)")
    p.add_argument("--fast-weights", action="store_true",
                   help="--cpu-int8 without VNNI: 7-bit weights in transformer / bridge layers too (u8s8 kernels; "
                        "a little faster where attention blocks dominate, e.g. MobileViT; less accurate)")
    p.add_argument("--calib", help="image folder for --cpu-int8's extra ranges (the plan's own images are used)")
    p.add_argument("--check", help="image folder: report the runtime's parity with PyTorch on --n-check evaluation "
                                   "images (ONNX Runtime, or OpenVINO for --target openvino)")
    p.add_argument("--n-check", type=int, default=100)
    p.add_argument("--json", help="write the export report as JSON")


def export_command(args: argparse.Namespace, gm, config: dict, pool_of) -> int:
    """`hyfx export`: plan → ONNX QDQ (or the CPU int8 lowering), optionally with a parity check.

    `pool_of(folder)` returns the usable images of a folder (the CLI drops a zoo model's training images).
    """
    import hyfx
    from hyfx.data import make_loader
    from hyfx.evaluate import Parity

    args.out = args.out or ("model.xml" if args.target == "openvino" else "model.onnx")
    if args.target == "openvino" and Path(args.out).suffix != ".xml":
        raise HyfxError(f"an OpenVINO IR is written as .xml + .bin: pass --out {Path(args.out).with_suffix('.xml')}")
    check_writable(args.out, "--out")
    plan = hyfx.load_plan(args.plan)
    if plan.model and plan.model != args.model:
        raise HyfxError(f"plan {args.plan} was made for {plan.model}, not {args.model}: pass the matching model")
    calib_names = plan.meta.get("calibration", {}).get("images", [])
    info = None
    if args.cpu_int8 and args.target == "openvino":
        from hyfx.pipelines.openvino_cpu import compile_openvino

        if args.no_fold_bn or args.symmetric:
            raise HyfxError("--cpu-int8 for OpenVINO folds BatchNorm and keeps the plan's schemes: drop --no-fold-bn "
                            "/ --symmetric")
        ov_cpu = compile_openvino(gm, plan, log2_mode=args.log2_mode)
        result, info = ov_cpu.export, ov_cpu.info
        result.save(args.out)
        why = " (int8 not faster here)" if info.float_layers else ""
        print(f"OpenVINO CPU int8: {len(info.int8_layers)} layers int8, {len(info.float_layers)} left float{why}; "
              f"float parts in {info.precision}, {'VNNI' if info.vnni else 'no VNNI'}")
    elif args.cpu_int8:
        from hyfx.pipelines import ort_cpu

        if args.target != "ort":
            raise HyfxError("--cpu-int8 lowers for a CPU runtime: use --target ort or --target openvino")
        if not args.calib:
            raise HyfxError("--cpu-int8 calibrates the int8 kernels' extra quantizers: pass --calib DIR")
        calib = plan_calibration_images(pool_of(args.calib), calib_names)
        cpu = ort_cpu.compile_cpu(gm, plan, make_loader(calib, config, batch_size=16), path=args.out,
                                  log2_mode=args.log2_mode, exact_weights=[] if args.fast_weights else None)
        result, info = cpu.export, cpu.info
        print(f"CPU int8 lowering: {len(info.int8_layers)} layers int8, {len(info.fp32_layers)} left FP32 "
              f"(int8 not faster here), {info.weight_bits}-bit weights ({'VNNI' if info.vnni else 'no VNNI'}; "
              f"8-bit in depthwise convs and {len(info.uint8_weight_layers)} transformer / bridge layers)")
    else:
        result = hyfx.export(gm, plan, args.out, target=args.target, log2_mode=args.log2_mode,
                             fold_bn=not args.no_fold_bn, symmetric=args.symmetric)
    print(f"{args.out}: {result.report.summary()}")
    if getattr(result, "narrowed", None):
        print(f"{len(result.narrowed)} layers' weights narrowed to 7 bits: this CPU has no VNNI, and OpenVINO's int8 "
              "kernels saturate 8-bit weights without it")
    if args.check:
        pool = evaluation_images(args.model, args.check, calib_names, args.n_check, seed=0)
        loader = list(make_loader(pool, config, batch_size=25))
        fp32 = hyfx.analyze(gm).gm
        if args.target == "openvino":
            from hyfx.backends import openvino

            parity = openvino.parity(openvino.compile_model(result.model), result.reference, loader, fp32=fp32)
        else:
            from hyfx.backends import ort

            parity = ort.parity(result.model, result.reference, loader, fp32=fp32)
        result.report.parity = parity.to_dict()
        print(Parity(**result.report.parity).summary())
    if args.json:
        payload = {"model": args.model, "plan": str(args.plan), "out": str(args.out), **result.report.to_dict()}
        if info is not None:
            payload["cpu_int8"] = info.to_dict()
        write_text(args.json, json.dumps(payload, indent=1, default=str) + "\n")
    return 0
