"""HySquant's budgets: what a plan must stay within (latency, energy, bytes, KL, top-1), parsed from
METRIC=VALUE text, and whether a plan's figures meet them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hyfx.errors import HyfxError

_UNITS = {
    "latency": {"s": 1.0, "ms": 1e-3, "us": 1e-6},
    "bytes": {"b": 1.0, "kb": 1e3, "mb": 1e6, "kib": 1024.0, "mib": 1024.0**2},
}
BUDGET_METRICS = ("latency", "energy", "bytes", "top1", "top1-drop", "kl")


@dataclass(frozen=True)
class Budget:
    """One limit: latency / energy / bytes / kl ≤ value, top1 ≥ value, top1-drop ≤ value (points below FP32).

    `relative` budgets ("0.8x") are multiples of the reference plan's figure (every layer at the widest config).
    """

    metric: str
    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> Budget:
        metric, sep, raw = text.partition("=")
        metric, raw = metric.strip().lower().replace("_", "-"), raw.strip().lower()
        if not sep or metric not in BUDGET_METRICS:
            raise HyfxError(f"bad budget {text!r}: write METRIC=VALUE with METRIC one of {', '.join(BUDGET_METRICS)}, "
                            "e.g. latency=0.8x, bytes=3MB, top1-drop=0.5")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*([a-z]*)", raw)
        if not m:
            raise HyfxError(f"bad budget value in {text!r}: a number, optionally with x (relative) or a unit")
        number, unit = float(m.group(1)), m.group(2)
        if unit == "x":
            if metric in ("top1", "top1-drop", "kl"):
                raise HyfxError(f"budget {text!r}: {metric} takes an absolute value (points or nats), not a ratio")
            return cls(metric, number, True)
        if unit:
            scale = _UNITS.get(metric, {}).get(unit)
            if scale is None:
                units = ", ".join(_UNITS.get(metric, {})) or "none"
                raise HyfxError(f"unknown unit {unit!r} in budget {text!r}: use x or one of: {units}")
            number *= scale
        if number < 0 or (metric not in ("top1-drop",) and number == 0):
            raise HyfxError(f"budget {text!r} must be positive")
        return cls(metric, number, False)

    def __str__(self) -> str:
        op = "≥" if self.metric == "top1" else "≤"
        return f"{self.metric} {op} {self.value:g}{'x' if self.relative else ''}"

    def met(self, figures: dict, reference: dict) -> bool | None:
        """Whether a plan's figures meet the budget (None when the figure is not known)."""
        met = self._met(figures, reference)
        return None if met is None else bool(met)  # numpy figures give numpy bools, which `is False` misses

    def _met(self, figures: dict, reference: dict):
        if self.metric in ("latency", "energy"):
            ratio = figures.get("latency_ratio")
            if ratio is None:
                return None
            return ratio <= self.latency_ratio_limit(reference) + 1e-9
        if self.metric == "bytes":
            limit = self.value * reference["bytes"] if self.relative else self.value
            return figures["bytes"] <= limit + 1e-6
        if self.metric == "kl":
            return figures["kl"] <= self.value + 1e-12
        drop = figures.get("top1_drop")
        if drop is None:
            return None
        if self.metric == "top1-drop":
            return drop <= self.value + 1e-9
        return reference["fp32_top1"] - drop >= self.value - 1e-9

    def latency_ratio_limit(self, reference: dict) -> float:
        """A latency or energy budget as a limit on the plan's latency over the reference plan's."""
        if self.relative:
            return self.value
        if self.metric == "latency":
            return self.value / reference["latency"]
        return self.value / reference["energy"]
