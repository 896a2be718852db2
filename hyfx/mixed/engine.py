"""HySquant: per-layer bit-widths that maximise accuracy under hardware budgets, with measured feedback.

Workflow (the paper's Fig. 2, built):
1. sensitivity table (hyfx/recipes/sensitivity.py): each layer × config quantized alone; KL proxy,
   top-1/top-5, latency, energy, weight bytes; layers whose top-1 collapses at low activation bits are fixed
   to wider ones.
2. an integer linear program over the table (additive cost model, hyfx/recipes/ilp.py) picks one config
   per layer: minimise summed KL subject to the budgets.
3. the candidate is quantized and measured end to end (KL on the calibration images, top-1 on held-out
   validation images, bytes read from the quantized graph, latency from a backend timer). When a budget is
   missed, or the measured accuracy falls short of the prediction, the cost model is corrected from the
   measurement and the ILP runs again (a missed plan is cut off). Every iteration is reported and kept in
   the plan's meta.

Corrections: KL of a plan = β·Σ per-layer KL (β = measured / summed, layer interactions); top-1 drop =
α·KL (α fitted through the origin on every measured plan, the table's single-layer entries as prior);
latency savings vs the reference = s·(roofline savings) (s = measured / predicted savings); bytes get the
measured − predicted offset.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.evaluate import accuracy, kl_divergence, predict
from hyfx.graph import HybridGraph, analysed
from hyfx.hardware import DEFAULT_CONFIGS, Assignment, BitConfig, DeviceProfile, get_profile, model_bytes
from hyfx.mixed.ilp import Constraint, Infeasible, solve
from hyfx.mixed.sensitivity import Policies, SensitivityTable, build_table
from hyfx.timing import median_time

# ---------------------------------------------------------------------------------------------- budgets

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


def _met(budget: Budget, figures: dict, reference: dict) -> bool | None:
    """Whether figures meet the budget (None when the figure is not known)."""
    met = _met_raw(budget, figures, reference)
    return None if met is None else bool(met)  # numpy figures give numpy bools, which `is False` misses


def _met_raw(budget: Budget, figures: dict, reference: dict):
    if budget.metric in ("latency", "energy"):
        ratio = figures.get("latency_ratio")
        if ratio is None:
            return None
        return ratio <= _latency_ratio_limit(budget, reference) + 1e-9
    if budget.metric == "bytes":
        limit = budget.value * reference["bytes"] if budget.relative else budget.value
        return figures["bytes"] <= limit + 1e-6
    if budget.metric == "kl":
        return figures["kl"] <= budget.value + 1e-12
    drop = figures.get("top1_drop")
    if drop is None:
        return None
    if budget.metric == "top1-drop":
        return drop <= budget.value + 1e-9
    return reference["fp32_top1"] - drop >= budget.value - 1e-9


def _latency_ratio_limit(budget: Budget, reference: dict) -> float:
    if budget.relative:
        return budget.value
    if budget.metric == "latency":
        return budget.value / reference["latency"]
    return budget.value / reference["energy"]


# ---------------------------------------------------------------------------------------------- cost model


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
                limit = _latency_ratio_limit(b, reference)
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


# ---------------------------------------------------------------------------------------------- measurement


class TorchTimer:
    """PlanTimer on this CPU: median seconds of one forward (batch 1) of the PyTorch fake-quant model.

    Fake quantization computes in FP32 at every bit-width, so this backend measures the cost of the QDQ
    graph, not of integer kernels: it is the measured backend until an integer runtime (ORT) is wired in.
    """

    backend = "torch-cpu-fakequant"

    def __init__(self, hg: HybridGraph, policies: Policies, example: torch.Tensor, repeats: int = 9, cache: int = 4):
        from hyfx import quantize

        self.quantize = quantize
        self.hg, self.policies, self.example = hg, policies, example[:1]
        self.repeats = repeats
        self._models: dict[tuple, fx.GraphModule] = {}
        self._cache = cache

    def model(self, assignment: Assignment) -> fx.GraphModule:
        key = tuple(sorted((k, str(v)) for k, v in assignment.items()))
        if key not in self._models:
            if len(self._models) >= self._cache:
                self._models.pop(next(iter(self._models)))
            self._models[key] = self.quantize(self.hg, self.policies.plan(dict(assignment)))
        return self._models[key]

    def __call__(self, assignment: Assignment) -> float:
        model = self.model(assignment)
        with torch.no_grad():
            return median_time(lambda: model(self.example), repeats=self.repeats)


class OrtTimer(TorchTimer):
    """PlanTimer on ONNX Runtime's CPU int8 kernels: median seconds of one batch-1 run of the exported QDQ model.

    Integer kernels exist for 8-bit grids only: a narrower grid is exported with a Clip that keeps ORT from
    fusing the layer, so 4-bit choices measure slower here, which is what the feedback loop must learn.
    """

    backend = "ort-cpu-int8"

    def __init__(self, hg: HybridGraph, policies: Policies, example: torch.Tensor, repeats: int = 15, cache: int = 4,
                 threads: int = 2):
        super().__init__(hg, policies, example, repeats, cache)
        self.threads = threads
        self._inputs = self.example.numpy()

    def model(self, assignment: Assignment):
        from hyfx.backends import onnx_qdq
        from hyfx.backends import ort as hort

        key = tuple(sorted((k, str(v)) for k, v in assignment.items()))
        if key not in self._models:
            if len(self._models) >= self._cache:
                self._models.pop(next(iter(self._models)))
            plan = self.policies.plan(dict(assignment))
            exported = onnx_qdq.export(self.hg, plan, target="ort")
            self._models[key] = hort.session(exported.model, self.threads)
        return self._models[key]

    def __call__(self, assignment: Assignment) -> float:
        sess = self.model(assignment)
        feed = {sess.get_inputs()[0].name: self._inputs}
        return median_time(lambda: sess.run(None, feed), repeats=self.repeats)


TIMERS: dict[str, type[TorchTimer]] = {"torch": TorchTimer, "ort": OrtTimer}


def latency_ratio(timer: Callable[[Assignment], float], assignment: Assignment, reference: Assignment,
                  rounds: int = 3) -> tuple[float, float, float]:
    """Median time of `assignment` over that of `reference`, timed in alternation so drift hits both alike."""
    same = dict(assignment) == dict(reference)
    ref_times, times = [], []
    for _ in range(rounds):
        ref_times.append(timer(reference))
        times.append(ref_times[-1] if same else timer(assignment))  # the reference is 1.0x by definition
    ref, t = statistics.median(ref_times), statistics.median(times)
    return t / ref, t, ref


class PlanEvaluator:
    """Quantize an assignment and measure it end to end: KL on the calibration images, top-1/top-5 and FP32
    agreement on validation images, bytes read from the quantized graph, latency ratio from a timer."""

    def __init__(self, hg: HybridGraph, policies: Policies, calib_loader: Iterable, val_loader: Iterable | None = None,
                 timer: Callable[[Assignment], float] | None = None, reference: Assignment | None = None,
                 progress: bool = False):
        from hyfx import quantize

        self.quantize = quantize
        self.hg, self.policies, self.timer, self.reference = hg, policies, timer, reference
        self.progress = progress
        self.calib = [b[0] if isinstance(b, (tuple, list)) else b for b in calib_loader]
        with torch.no_grad():
            self.fp32_calib = torch.cat([hg.gm(x).float() for x in self.calib])
        self.val = list(val_loader) if val_loader is not None else None
        self.fp32_val = predict(hg.gm, self.val, desc="fp32", progress=progress) if self.val else None
        self.fp32 = accuracy(self.fp32_val) if self.fp32_val is not None else None
        self.latency_source = f"measured:{getattr(timer, 'backend', 'timer')}" if timer else None

    def __call__(self, assignment: Assignment) -> dict:
        qgm = self.quantize(self.hg, self.policies.plan(dict(assignment)))
        with torch.no_grad():
            logits = torch.cat([qgm(x).float() for x in self.calib])
        out: dict = {"kl": kl_divergence(self.fp32_calib, logits), "bytes": model_bytes(qgm),
                     "top1": None, "top5": None, "top1_drop": None, "agreement": None, "n_val": 0,
                     "latency_ratio": None}
        if self.val:
            acc = accuracy(predict(qgm, self.val, desc="plan", progress=self.progress), self.fp32_val)
            out.update(top1=acc.top1, top5=acc.top5, top1_drop=self.fp32.top1 - acc.top1, agreement=acc.agreement,
                       n_val=acc.n, val_kl=acc.kl)
        if self.timer is not None and self.reference is not None:
            ratio, t, ref = latency_ratio(self.timer, assignment, self.reference)
            out.update(latency_ratio=ratio, latency_s=t, reference_latency_s=ref, latency_source=self.latency_source)
        return out


# ---------------------------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    assignment: dict[str, BitConfig]
    predicted: dict
    measured: dict | None
    iterations: list[dict]
    budgets: list[Budget]
    reference: dict
    corrections: Corrections
    status: str  # "met" | "predicted" (no measurement) | "best-measured"

    def counts(self) -> dict[str, int]:
        return config_counts(self.assignment)

    def to_dict(self) -> dict:
        return {
            "status": self.status, "budgets": [str(b) for b in self.budgets], "reference": self.reference,
            "predicted": self.predicted, "measured": self.measured, "configs": self.counts(),
            "corrections": self.corrections.to_dict(), "iterations": self.iterations,
        }


def config_counts(assignment: Assignment) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in assignment.values():
        out[str(c)] = out.get(str(c), 0) + 1
    return dict(sorted(out.items()))


def assignment_of(table: SensitivityTable, choice: Sequence[int]) -> dict[str, BitConfig]:
    return {layer: table.configs[i] for layer, i in zip(table.layers, choice, strict=True)}


def _fmt_figures(fig: dict) -> str:
    parts = [f"KL {fig['kl']:.4f}"]
    if fig.get("top1_drop") is not None:
        parts.append(f"top-1 drop {fig['top1_drop']:+.2f}")
    if fig.get("latency_ratio") is not None:
        parts.append(f"latency {fig['latency_ratio']:.3f}x")
    parts.append(f"{fig['bytes'] / 1e6:.3f} MB")
    return ", ".join(parts)


def search(table: SensitivityTable, budgets: Sequence[Budget], evaluate: Callable[[Assignment], dict] | None = None,
           minimize: str = "kl", max_iter: int = 5, tolerance: float = 1.0,
           report: Callable[[str], None] | None = None) -> SearchResult:
    """ILP over the table, then measure → correct → re-solve until the measured plan meets every budget.

    `evaluate(assignment)` measures a plan (see PlanEvaluator); without it the ILP's answer is returned as a
    prediction. `tolerance` (top-1 points) is how far measured accuracy may fall below the prediction before
    the model is corrected and the search repeated.
    """
    report = report or (lambda line: None)
    model = CostModel(table)
    budgets = list(budgets)
    ref_assignment = model.ref_assignment
    ref = {"bytes": model.ref["bytes"], "latency": model.ref["latency"], "energy": model.ref["energy"],
           "fp32_top1": table.fp32.get("top1"), "latency_source": table.latency_source, "config": str(table.reference)}
    ref_measured = None
    if evaluate is not None:
        ref_measured = evaluate(ref_assignment)
        ref["bytes"] = ref_measured["bytes"]
        if ref_measured.get("reference_latency_s") is not None:
            ref["latency"] = ref_measured["reference_latency_s"]
            ref["energy"] = DeviceProfile.from_dict(table.device).energy(ref["latency"])
            ref["latency_source"] = ref_measured.get("latency_source", "measured")
        if ref_measured.get("top1") is not None:
            ref["fp32_top1"] = ref_measured["top1"] + ref_measured["top1_drop"]
            model.corr.fp32_top1 = ref["fp32_top1"]  # drops are measured from FP32 on the validation images
            model.corr.points.append((ref_measured["kl"], ref_measured["top1_drop"]))
        report(f"reference (all {table.reference}): {_fmt_figures(ref_measured)}")
    if any(b.metric in ("top1", "top1-drop") for b in budgets) and ref.get("fp32_top1") is None:
        raise HyfxError("top-1 budgets need labelled evaluation images: the table has no top-1 figures")
    objective = model.objective(minimize)
    allowed = table.mask()
    excluded: list[list[int]] = []
    iterations: list[dict] = []
    seen: dict[tuple, dict] = {}
    best: tuple | None = None  # (objective value, choice, predicted, measured) of plans meeting every budget
    previous: list[int] | None = None
    for it in range(1, max_iter + 1):
        try:
            choice = solve(objective, model.constraints(budgets, ref), allowed, excluded)
        except Infeasible as exc:
            if best is not None:
                report(f"iteration {it}: {exc}; keeping the best measured plan that met every budget")
                break
            history = f" after {it - 1} measured iteration(s)" if it > 1 else ""
            raise Infeasible(f"{exc}{history}") from None
        assignment = assignment_of(table, choice)
        predicted = model.predict(assignment)
        record = {"iteration": it, "configs": config_counts(assignment), "predicted": predicted,
                  "corrections": model.corr.to_dict()}
        if evaluate is None:
            record["status"] = "predicted"
            iterations.append(record)
            report(f"iteration {it}: predicted {_fmt_figures(predicted)} (no measurement)")
            return SearchResult(assignment, predicted, None, iterations, budgets, ref, model.corr, "predicted")
        key = tuple(choice)
        measured = seen.get(key) or evaluate(assignment)
        seen[key] = measured
        # a figure the evaluator cannot measure (latency without a timer) is judged on its prediction
        figures = {**predicted, **{k: v for k, v in measured.items() if v is not None}}
        verdict = {str(b): _met(b, figures, ref) for b in budgets}
        missed = [name for name, ok in verdict.items() if ok is False]
        short = (predicted.get("top1_drop") is not None and measured.get("top1_drop") is not None
                 and measured["top1_drop"] > predicted["top1_drop"] + tolerance)
        record.update(measured=measured, budgets=verdict, missed=missed, accuracy_short=short)
        iterations.append(record)
        report(f"iteration {it}: {config_counts(assignment)}\n  predicted {_fmt_figures(predicted)}\n"
               f"  measured  {_fmt_figures(measured)}"
               + (f"\n  missed: {', '.join(missed)}" if missed else "")
               + ("\n  measured accuracy short of the prediction: correcting" if short else ""))
        if not missed:
            value = float(sum(objective[i, c] for i, c in enumerate(choice)))
            if best is None or value < best[0]:
                best = (value, choice, predicted, measured)
            if not short:
                record["status"] = "met"
                return SearchResult(assignment, predicted, measured, iterations, budgets, ref, model.corr, "met")
        model.correct(assignment, predicted, measured)
        if missed:
            excluded.append(choice)
        elif choice == previous:
            break  # corrected, and the ILP still prefers this plan: it has converged
        previous = choice
    if best is None:
        last = iterations[-1] if iterations else {}
        raise HyfxError(f"no plan met every budget in {max_iter} measured iterations (last missed: "
                        f"{', '.join(last.get('missed', [])) or 'accuracy'}): relax the tightest budget or raise --max-iter")
    _, choice, predicted, measured = best
    return SearchResult(assignment_of(table, choice), predicted, measured, iterations, budgets, ref, model.corr, "met")


# ---------------------------------------------------------------------------------------------- the recipe


@dataclass
class HySquantRun:
    table: SensitivityTable
    result: SearchResult
    plan: object  # QuantPlan
    policies: Policies


def run_hysquant(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, budgets: Sequence[Budget | str],
                 eval_loader: Iterable | None = None, val_loader: Iterable | None = None,
                 configs: Sequence[BitConfig] = DEFAULT_CONFIGS, device: str | DeviceProfile = "cpu",
                 timer: Callable[[Assignment], float] | str | None = None, minimize: str = "kl", max_iter: int = 5,
                 tolerance: float = 1.0, table: SensitivityTable | None = None, policies: Policies | None = None,
                 model: str = "", observer: str = "minmax", report: Callable[[str], None] | None = None,
                 progress: bool = True) -> HySquantRun:
    """Table → ILP → measured feedback → QuantPlan, keeping every intermediate for reports and benchmarks.

    `eval_loader`: labelled images for the table's top-1 (and pruning); `val_loader`: labelled images the
    feedback loop measures plans on; both disjoint from the calibration images (the caller splits).
    `timer="ort"` times the exported int8 model in ONNX Runtime on this CPU, `"torch"` the fake-quant model; a
    callable (assignment → seconds) plugs another backend.
    A saved `table` (and the `policies` it was built with) skips the sensitivity pass.
    """
    budgets = [b if isinstance(b, Budget) else Budget.parse(b) for b in budgets]
    hg = analysed(gm)
    profile = device if isinstance(device, DeviceProfile) else get_profile(device)
    if table is None:
        table, policies = build_table(hg, calib_loader, eval_loader, configs, profile=profile, model=model,
                                      observer=observer, policies=policies, progress=progress)
    if policies is None:
        policies = Policies(hg, calib_loader, table.configs, table.layers, observer, progress)
    reference = {layer: table.reference for layer in table.layers}
    if isinstance(timer, str):
        if timer not in TIMERS:
            raise HyfxError(f"unknown timer {timer!r}: use one of {', '.join(TIMERS)} or pass a callable")
        first = next(iter(calib_loader))
        timer = TIMERS[timer](hg, policies, first[0] if isinstance(first, (tuple, list)) else first)
    evaluator = PlanEvaluator(hg, policies, calib_loader, val_loader, timer, reference, progress=progress)
    result = search(table, budgets, evaluator, minimize=minimize, max_iter=max_iter, tolerance=tolerance,
                    report=report)
    if evaluator.latency_source and result.measured is not None:
        result.reference["latency_source"] = evaluator.latency_source
    plan = policies.plan(result.assignment, model=model)
    plan.meta["search"] = result.to_dict()
    plan.meta["search"]["table"] = {"latency_source": table.latency_source, "device": table.device["name"],
                                    "configs": [c.name for c in table.configs], "pruned": table.pruned,
                                    "fp32": table.fp32}
    return HySquantRun(table, result, plan, policies)
