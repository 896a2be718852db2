"""Pareto fronts of HySquant plans: min-KL plans under a sweep of latency (or bytes) limits, and their plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hyfx.errors import HyfxError
from hyfx.files import save_figure
from hyfx.mixed.cost import Corrections, CostModel
from hyfx.mixed.feedback import assignment_of, config_counts
from hyfx.mixed.ilp import Constraint, reachable, solve
from hyfx.mixed.sensitivity import SensitivityTable


def pareto_front(table: SensitivityTable, axis: str = "latency", points: int = 12,
                 corrections: Corrections | None = None) -> list[dict]:
    """Min-KL plans under a sweep of limits on `axis` (latency or bytes); the non-dominated ones, cheapest first."""
    column = {"latency": "latency", "bytes": "weight_bytes", "energy": "energy"}.get(axis)
    if column is None:
        raise HyfxError(f"cannot sweep {axis!r}: choose latency, energy or bytes")
    model = CostModel(table, corrections)
    costs, allowed, objective = table.matrix(column), table.mask(), table.matrix("kl")
    lo, hi = reachable(costs, allowed)
    found: dict[tuple, dict] = {}
    for limit in np.linspace(lo, hi, points):
        choice = solve(objective, [Constraint(axis, costs, float(limit))], allowed)
        key = tuple(choice)
        if key not in found:
            assignment = assignment_of(table, choice)
            pred = model.predict(assignment)
            found[key] = {"assignment": {k: str(v) for k, v in assignment.items()}, "configs": config_counts(assignment),
                          "predicted": pred}
    front = sorted(found.values(), key=lambda p: _axis_value(p["predicted"], axis))
    kept, best_kl = [], math.inf
    for p in front:
        if p["predicted"]["kl"] < best_kl - 1e-12:
            kept.append(p)
            best_kl = p["predicted"]["kl"]
    return kept


def _axis_value(pred: dict, axis: str) -> float:
    if axis == "latency":
        return pred["latency_ratio"]
    return pred["energy_model"] if axis == "energy" else pred["bytes"]


def plot_front(fronts: dict[str, list[dict]], path: str | Path, title: str = "", fp32_top1: float | None = None) -> Path:
    """One panel per axis: predicted (and, where present, measured) top-1 or KL against latency ratio / MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fronts), figsize=(5.2 * len(fronts), 4.0), squeeze=False)
    for ax, (axis, front) in zip(axes[0], fronts.items(), strict=True):
        xs = [_axis_value(p["predicted"], axis) / (1e6 if axis == "bytes" else 1) for p in front]
        use_top1 = fp32_top1 is not None and all(p["predicted"].get("top1_drop") is not None for p in front)
        ys = [fp32_top1 - p["predicted"]["top1_drop"] if use_top1 else p["predicted"]["kl"] for p in front]
        ax.plot(xs, ys, "o-", label="predicted")
        measured = [(x, p["measured"]) for x, p in zip(xs, front, strict=True) if p.get("measured")]
        if measured:
            key = "top1" if use_top1 else "kl"
            mx = [_axis_value(m, axis) / (1e6 if axis == "bytes" else 1) if axis == "bytes" else x for x, m in measured]
            ax.plot(mx, [m[key] for _, m in measured], "s--", label="measured")
        if use_top1:
            ax.axhline(fp32_top1, color="grey", lw=0.8, ls=":", label="FP32")
        ax.set_xlabel({"latency": "latency / reference (roofline)", "bytes": "model MB", "energy": "energy (paper)"}[axis])
        ax.set_ylabel("top-1 (%)" if use_top1 else "KL(FP32 ‖ plan)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=130)
    return Path(path)
