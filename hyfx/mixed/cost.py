"""HySquant's cost model: a plan's figures predicted from the sensitivity table's per-layer sums, and corrected by
measurement.

Corrections: KL of a plan = β·Σ per-layer KL (β = measured / summed, layer interactions); top-1 drop =
α·KL (α fitted through the origin on every measured plan, the table's single-layer entries as prior);
latency savings vs the reference = s·(roofline savings) (s = measured / predicted savings); bytes get the
measured − predicted offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from hyfx.errors import HyfxError
from hyfx.hardware import Assignment
from hyfx.mixed.budgets import Budget
from hyfx.mixed.ilp import Constraint, Infeasible
from hyfx.mixed.sensitivity import SensitivityTable


@dataclass
class Corrections:
    """What measurement has taught the additive model so far."""

    kl_scale: float = 1.0  # β
    drop_per_kl: float | None = None  # α, top-1 points per nat of KL while drops are small
    fp32_top1: float | None = None  # F, the FP32 top-1 drops are measured from
    latency_scale: float = 1.0  # s
    bytes_offset: float = 0.0
    points: list[tuple[float, float]] = field(default_factory=list)  # measured (KL, top-1 drop) of whole plans

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("points")
        return data


def predicted_drop(kl: float, alpha: float, fp32_top1: float) -> float:
    """Top-1 drop from KL: α·KL while small, saturating at the FP32 top-1 (accuracy cannot go below zero).

    drop = F·(1 − exp(−α·KL / F)); the inverse, linear_drop, maps measured drops back onto α·KL.
    """
    return fp32_top1 * (1.0 - np.exp(-alpha * np.asarray(kl, dtype=float) / fp32_top1))


def linear_drop(drop: float | np.ndarray, fp32_top1: float) -> float | np.ndarray:
    """−F·ln(1 − drop/F): the α·KL a measured drop corresponds to (drops near F are clipped)."""
    return -fp32_top1 * np.log1p(-np.minimum(drop, 0.99 * fp32_top1) / fp32_top1)


def fit_drop_per_kl(kl: np.ndarray, drop: np.ndarray, fp32_top1: float) -> float:
    """α by least squares through the origin on linear_drop(drop) = α·KL (never negative)."""
    kl, drop = np.asarray(kl, dtype=float), np.asarray(drop, dtype=float)
    good = np.isfinite(kl) & np.isfinite(drop)
    denom = float((kl[good] ** 2).sum())
    if denom <= 0:
        return 0.0
    return max(0.0, float((kl[good] * linear_drop(drop[good], fp32_top1)).sum()) / denom)


def prior_drop_per_kl(table: SensitivityTable) -> float | None:
    """α from the single-layer entries (pruned cells out)."""
    if not table.has_accuracy():
        return None
    mask = table.mask()
    drop = table.fp32["top1"] - table.matrix("top1")
    return fit_drop_per_kl(table.matrix("kl")[mask], drop[mask], table.fp32["top1"])


class CostModel:
    """Predicted figures of an assignment: the table's sums, corrected by measurement."""

    def __init__(self, table: SensitivityTable, corrections: Corrections | None = None):
        self.table = table
        self.corr = corrections or Corrections(drop_per_kl=prior_drop_per_kl(table), fp32_top1=table.fp32.get("top1"))
        self.ref_assignment = {layer: table.reference for layer in table.layers}
        self.ref = table.totals(self.ref_assignment)

    def sums(self, assignment: Assignment) -> dict[str, float]:
        return self.table.totals(dict(assignment))

    def predict(self, assignment: Assignment) -> dict:
        raw = self.sums(assignment)
        kl = self.corr.kl_scale * raw["kl"]
        saving = (self.ref["latency"] - raw["latency"]) / self.ref["latency"]
        drop = None
        if self.corr.drop_per_kl is not None and self.corr.fp32_top1:
            drop = float(predicted_drop(kl, self.corr.drop_per_kl, self.corr.fp32_top1))
        return {
            "kl": kl,
            "top1_drop": drop,
            "top1": None if drop is None else self.corr.fp32_top1 - drop,
            "latency_ratio": 1.0 - self.corr.latency_scale * saving,
            "latency_model": raw["latency"],
            "energy_model": raw["energy"],
            "bytes": raw["bytes"] + self.corr.bytes_offset,
        }

    def constraints(self, budgets: Sequence[Budget], reference: dict) -> list[Constraint]:
        """Budgets as linear constraints on the table's columns: offset + Σ cost·x ≤ limit."""
        t = self.table
        out = []
        for b in budgets:
            if b.metric in ("latency", "energy"):
                limit = b.latency_ratio_limit(reference)
                s = self.corr.latency_scale
                if s <= 0 and limit < 1:
                    raise Infeasible(
                        f"budget {b} cannot be met: on {reference.get('latency_source', 'this backend')} narrower "
                        "bit-widths were measured to save no time, so nothing goes below the reference plan")
                # ratio = 1 − s·(ref − Σ)/ref  ⇔  s/ref · Σ lat ≤ limit − 1 + s  (fixed latency cancels)
                costs = s * t.matrix("latency") / self.ref["latency"]
                offset = 1 - s + s * t.fixed["latency"] / self.ref["latency"]
                out.append(Constraint(str(b), costs, limit, offset))
            elif b.metric == "bytes":
                limit = b.value * reference["bytes"] if b.relative else b.value
                out.append(Constraint(str(b), t.matrix("weight_bytes"), limit, t.fixed["bytes"] + self.corr.bytes_offset))
            elif b.metric == "kl":
                out.append(Constraint(str(b), self.corr.kl_scale * t.matrix("kl"), b.value))
            else:
                if self.corr.drop_per_kl is None:
                    raise HyfxError(f"budget {b} needs top-1 figures: give labelled evaluation images (--calib with "
                                    "labels) so the table and the search can measure accuracy")
                fp32 = self.corr.fp32_top1
                drop_limit = b.value if b.metric == "top1-drop" else fp32 - b.value
                if drop_limit >= fp32:
                    continue  # no plan can lose more than everything
                # drop(β·ΣKL) ≤ limit  ⇔  α·β·ΣKL ≤ linear_drop(limit): linear in the table's KL column
                alpha = self.corr.drop_per_kl * self.corr.kl_scale
                out.append(Constraint(str(b), alpha * t.matrix("kl"), float(linear_drop(drop_limit, fp32))))
        return out

    def objective(self, minimize: str) -> np.ndarray:
        columns = {"kl": "kl", "latency": "latency", "energy": "energy", "bytes": "weight_bytes"}
        if minimize not in columns:
            raise HyfxError(f"cannot minimise {minimize!r}: choose one of {', '.join(columns)}")
        return self.table.matrix(columns[minimize])

    def correct(self, assignment: Assignment, predicted: dict, measured: dict) -> None:
        """Fold one measurement into the model (see the module docstring)."""
        raw = self.sums(assignment)
        if measured.get("kl") is not None and raw["kl"] > 0:
            self.corr.kl_scale = measured["kl"] / raw["kl"]
        if measured.get("top1_drop") is not None and measured.get("kl") is not None:
            self.corr.points.append((measured["kl"], measured["top1_drop"]))
            k, d = zip(*self.corr.points, strict=True)
            self.corr.drop_per_kl = fit_drop_per_kl(np.array(k), np.array(d), self.corr.fp32_top1)
        if measured.get("latency_ratio") is not None:
            predicted_saving = (self.ref["latency"] - raw["latency"]) / self.ref["latency"]
            if predicted_saving > 1e-9:
                measured_saving = 1.0 - measured["latency_ratio"]
                self.corr.latency_scale = min(5.0, max(0.0, measured_saving / predicted_saving))
        if measured.get("bytes") is not None:
            self.corr.bytes_offset += measured["bytes"] - predicted["bytes"]
