"""Markdown for `hyfx bench` results: the seed papers' tables with our numbers, the papers' beside them.

Our models are not the papers' models (no trained MobileViT / EfficientFormer weights can be had here), so a
paper's row and ours are compared by the drop versus their own FP32, never by absolute top-1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

PAPER_TABLES = Path(__file__).resolve().parents[1] / "reference" / "paper_tables.json"

EVALUATION_SET = (
    "Evaluation set: the sample folder holds 1000 ImageNet-1k images, **one per class**, not the 50,000-image "
    "validation set the papers use. A model's 32 calibration images and (for the distilled hybrid) its 500 "
    "training images are removed, so each model is evaluated on the remaining 468-968 images: each top-1 "
    "carries a 95% Wilson interval of roughly ±2-4 points, and one image is 0.1-0.2 points. Differences between "
    "recipes smaller than that interval are not significant on their own; the paired comparison with FP32 on "
    "the same images is the top-1 **agreement** (with its own 95% interval), and KL(FP32 ‖ quantized).")


def load_paper_tables(path: str | Path = PAPER_TABLES) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def fmt(value, spec: str = ".2f") -> str:
    """A table cell: `value` formatted, or a dash where there is none."""
    return "—" if value is None else format(value, spec)


def _cell(row: dict | None, key: str | None = "") -> str:
    """top-1 (drop vs FP32)."""
    if key is None:
        return "not in hyfx"
    if row is None:
        return "—"
    return f"{row['top1']:.2f} ({0.0 - row['drop_top1']:+.2f})"  # 0.0 - x: no "-0.00"


def _rows(result: dict, bits: int) -> dict:
    return result.get("accuracy", {}).get("bits", {}).get(str(bits), {})


def _paper_cell(value, fp32) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ({value - fp32 + 0.0:+.2f})" if fp32 is not None else f"{value:.2f}"


def method_table(results: Sequence[dict], bits: int, columns: Sequence[tuple[str, str]], paper_rows: list[dict]
                 ) -> list[str]:
    """Rows = models (ours, then the paper's), columns = FP32 and each method as `top-1 (drop)`."""
    header = ["model", "source", "FP32"] + [title for title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        rows = _rows(r, bits)
        if not rows:
            continue
        fp = rows["fp32"]
        lines.append(f"| {r['model']} | hyfx, this machine (n={fp['n']}) | {fp['top1']:.2f} | "
                     + " | ".join(_cell(rows.get(key) if key else None, key) for _, key in columns) + " |")
    for p in paper_rows:
        fp32 = p.get("fp32")
        lines.append(f"| {p['model']} | {p['source']} | {fmt(fp32)} | "
                     + " | ".join(_paper_cell(p["values"].get(title), fp32) for title, _ in columns) + " |")
    return lines


def detail_table(result: dict) -> list[str]:
    lines = ["| bits | recipe | table | top-1 | top-5 | top-1 95% CI | drop (pt) | agreement [95% CI] | KL | "
             "plan s (× FP32 pass) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for bits, rows in result.get("accuracy", {}).get("bits", {}).items():
        for label, r in rows.items():
            ci = f"[{r['top1_ci95'][0]:.1f}, {r['top1_ci95'][1]:.1f}]"
            agree = (f"{r['agreement']:.2f} [{r['agreement_ci95'][0]:.1f}, {r['agreement_ci95'][1]:.1f}]"
                     if r.get("agreement") is not None else "")
            plan = f"{r['plan_seconds']} ({r['plan_vs_fp32_pass']}×)" if "plan_seconds" in r else ""
            kl = f"{r['kl']:.4f}" if r.get("kl") is not None else ""
            lines.append(f"| W{bits}A{bits} | {label} | {r.get('table', '')} | {r['top1']:.2f} | {r['top5']:.2f} | "
                         f"{ci} | {r['drop_top1']:+.2f} | {agree} | {kl} | "
                         f"{plan} |")
    return lines


def latency_table(results: Sequence[dict]) -> list[str]:
    lines = ["| model | weights | config | bs1 ms | bs8 ms | bs1 × ORT FP32 | bs8 × ORT FP32 | bs1 × best quantize_static | "
             "MB | top-1 | agreement |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ort = r.get("ort")
        if not ort:
            continue
        acc = ort.get("accuracy", {})
        for config, t in ort["timings"].items():
            a = acc.get(config, {})
            lines.append(f"| {r['model']} | {'real' if r['real_weights'] else 'random'} | {config} | "
                         f"{fmt(t.get('bs1_ms'), '.1f')} | {fmt(t.get('bs8_ms'), '.1f')} | {fmt(t.get('bs1_x_fp32'))} | "
                         f"{fmt(t.get('bs8_x_fp32'))} | {fmt(t.get('bs1_x_qs'))} | {t['bytes'] / 1e6:.2f} | "
                         f"{fmt(a.get('top1'))} | {fmt(a.get('agreement'))} |")
        for config, note in ort["notes"].items():
            lines.append(f"| {r['model']} | | {config} | {note} |" + " |" * 7)
    return lines


TABLE1_COLUMNS = [("EasyQuant", "easyquant"), ("PTQ4ViT", "ptq4vit"), ("RepQ-ViT", "repqvit"), ("Q-HyViT", "qhyvit"),
                  ("HyQ", "hyq"), ("EfficientQuant", "efficientquant")]
QHYVIT_T1_COLUMNS = [("MinMax", "minmax"), ("EasyQuant", "easyquant"), ("PTQ4ViT", "ptq4vit"), ("RepQ-ViT", "repqvit"),
                     ("Q-HyViT", "qhyvit")]
FULL_COLUMNS = [("MinMax (full) / FQ-ViT", "minmax (full)"), ("RepQ-ViT (full)", "repqvit (full)"),
                ("Q-HyViT (full)", "qhyvit (full)")]
ABLATION_COLUMNS = [("scale only", "qhyvit: scale only"), ("+ granularity", "qhyvit: + granularity"),
                    ("+ scheme (Q-HyViT)", "qhyvit")]


def paper_rows(paper: dict, paper_key: str, table: str, bits: int, columns: Sequence[tuple[str, str | None]]
               ) -> tuple[list[dict], str | None]:
    """The paper's rows for one of our tables, as {model, source, fp32, values{column title: top-1}}, and the
    table's provenance line (None when the paper gives nothing for it)."""
    tab = paper.get(paper_key, {}).get(table) or {}
    out = []
    for model, row in (tab.get("rows") or {}).items():
        values = row.get(f"W{bits}A{bits}") or {}
        picked = {title: values[title] for title, _ in columns if isinstance(values.get(title), (int, float))}
        if picked:
            out.append({"model": model, "source": f"{tab['source']} †", "fp32": row.get("fp32"), "values": picked})
    return out, (f"† {tab['source']}: {tab['provenance']}." if out else None)


def render(results: Sequence[dict], paper: dict | None = None, title: str = "hyfx bench", level: int = 1) -> str:
    """The paper tables (ours beside the papers'), then each model's full table and the ORT latency table;
    `level` is the depth of the title heading (sections one deeper)."""
    paper = paper if paper is not None else load_paper_tables()
    h = "#" * (level + 1)
    lines = [f"{'#' * level} {title}", "", EVALUATION_SET, "",
             "Cells are `top-1 (change vs FP32)` in percent; paper rows are copied from the paper named in the source "
             "column (on their models and on ImageNet-val), ours are measured here.", ""]
    sections = [
        ("EfficientQuant Table 1 analogue (W8A8)", 8, TABLE1_COLUMNS, "efficientquant", "table1"),
        ("Q-HyViT Table 1: W8A8, partial quantization (softmax and norms in float)", 8, QHYVIT_T1_COLUMNS, "qhyvit",
         "table1"),
        ("Q-HyViT Table 1: W6A6, partial quantization", 6, QHYVIT_T1_COLUMNS, "qhyvit", "table1"),
        ("Q-HyViT Table 2: full quantization (softmax, LayerNorm, GroupNorm, BatchNorm inputs quantized), W8A8", 8,
         FULL_COLUMNS, "qhyvit", "table2"),
        ("Q-HyViT Table 2: full quantization, W6A6", 6, FULL_COLUMNS, "qhyvit", "table2"),
        ("Q-HyViT Table 3 ablation, W8A8", 8, ABLATION_COLUMNS, "qhyvit", "table3"),
        ("Q-HyViT Table 3 ablation, W6A6", 6, ABLATION_COLUMNS, "qhyvit", "table3"),
    ]
    for heading, bits, columns, key, table in sections:
        if not any(_rows(r, bits) for r in results):
            continue
        published, provenance = paper_rows(paper, key, table, bits, columns)
        lines += [f"{h} {heading}", "", *method_table(results, bits, columns, published), ""]
        if provenance:
            lines += [provenance, ""]
        elif key in paper:
            lines += [f"No published numbers for this table are available here ({paper[key].get('paper') or key}).", ""]
    for r in results:
        if r.get("accuracy"):
            acc = r["accuracy"]
            lines += [f"{h} {r['model']}: every run ({r['images']['evaluation']} evaluation images, "
                      f"{r['images']['calibration']} calibration; FP32 forward+backward pass over the calibration "
                      f"images {acc['fp32_pass_seconds']} s)", "", *detail_table(r), ""]
    if any(r.get("ort") for r in results):
        env = next(r["environment"] for r in results if r.get("ort"))
        ort = next(r["ort"] for r in results if r.get("ort"))
        lines += [f"{h} ONNX Runtime latency and size on this CPU", "",
                  f"{env['cpu']}, {env['cores']} cores, onnxruntime {env['onnxruntime']}, {ort['threads']} threads, "
                  f"medians of {ort['runs']} runs after 5 warm-up runs, all sessions of a model interleaved run by run; "
                  "ratios are to ORT FP32 (and to the faster valid quantize_static) from the same loop, >1 = faster. "
                  "top-1 / agreement: the ONNX model itself in ORT on the evaluation images (real weights only).", "",
                  *latency_table(results), ""]
    return "\n".join(lines)
