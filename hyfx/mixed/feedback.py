"""HySquant's search: an integer linear program over the sensitivity table, then measured feedback, and the
whole workflow from a graph to a QuantPlan.

1. sensitivity table (hyfx/mixed/sensitivity.py): each layer × config quantized alone; KL proxy,
   top-1/top-5, latency, energy, weight bytes; layers whose top-1 collapses at low activation bits are fixed
   to wider ones.
2. an integer linear program over the table (additive cost model hyfx/mixed/cost.py, solver hyfx/mixed/ilp.py)
   picks one config per layer: minimise summed KL subject to the budgets.
3. the candidate is quantized and measured end to end (hyfx/mixed/measure.py: KL on the calibration images, top-1
   on held-out validation images, bytes read from the quantized graph, latency from a plan timer). When a budget
   is missed, or the measured accuracy falls short of the prediction, the cost model is corrected from the
   measurement and the ILP runs again (a missed plan is cut off). Every iteration is reported and kept in
   the plan's meta.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch.fx as fx

from hyfx.errors import HyfxError
from hyfx.graph import HybridGraph, analysed
from hyfx.hardware import DEFAULT_CONFIGS, Assignment, BitConfig, DeviceProfile, get_profile
from hyfx.mixed.budgets import Budget
from hyfx.mixed.cost import Corrections, CostModel
from hyfx.mixed.ilp import Infeasible, solve
from hyfx.mixed.measure import PlanEvaluator
from hyfx.mixed.sensitivity import Policies, SensitivityTable, build_table
from hyfx.quant.spec import QuantPlan


@dataclass
class MixedPrecisionResult:
    """The search's answer: one config per layer, its predicted and measured figures, and every iteration."""

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
           report: Callable[[str], None] | None = None) -> MixedPrecisionResult:
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
            return MixedPrecisionResult(assignment, predicted, None, iterations, budgets, ref, model.corr, "predicted")
        key = tuple(choice)
        measured = seen.get(key) or evaluate(assignment)
        seen[key] = measured
        # a figure the evaluator cannot measure (latency without a timer) is judged on its prediction
        figures = {**predicted, **{k: v for k, v in measured.items() if v is not None}}
        verdict = {str(b): b.met(figures, ref) for b in budgets}
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
                return MixedPrecisionResult(assignment, predicted, measured, iterations, budgets, ref, model.corr, "met")
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
    return MixedPrecisionResult(assignment_of(table, choice), predicted, measured, iterations, budgets, ref, model.corr,
                                "met")


@dataclass
class HySquantRun:
    """Everything run_hysquant made: the table, the search's result, the plan, and the policies behind it."""

    table: SensitivityTable
    result: MixedPrecisionResult
    plan: QuantPlan
    policies: Policies


def run_hysquant(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, budgets: Sequence[Budget | str],
                 eval_loader: Iterable | None = None, val_loader: Iterable | None = None,
                 configs: Sequence[BitConfig] = DEFAULT_CONFIGS, device: str | DeviceProfile = "cpu",
                 timer: Callable[[Assignment], float] | type | None = None, minimize: str = "kl", max_iter: int = 5,
                 tolerance: float = 1.0, table: SensitivityTable | None = None, policies: Policies | None = None,
                 model: str = "", observer: str = "minmax", report: Callable[[str], None] | None = None,
                 workers: int = 1, ray_address: str | None = None, rebuild: Callable | None = None,
                 progress: bool = True) -> HySquantRun:
    """Table → ILP → measured feedback → QuantPlan, keeping every intermediate for reports and benchmarks.

    `eval_loader`: labelled images for the table's top-1 (and pruning); `val_loader`: labelled images the
    feedback loop measures plans on; both disjoint from the calibration images (the caller splits).
    `timer` measures latency in the feedback loop: a plan timer (assignment → seconds), or a timer class built
    here as `timer(hg, policies, one calibration image)`: TorchTimer (the fake-quant model on this CPU) or
    hyfx.pipelines.hysquant.OrtTimer (the exported int8 model in ONNX Runtime; by name: that module's TIMERS).
    A saved `table` (and the `policies` it was built with) skips the sensitivity pass. `workers` / `ray_address` /
    `rebuild`: the table on Ray (see `build_table`).
    """
    budgets = [b if isinstance(b, Budget) else Budget.parse(b) for b in budgets]
    hg = analysed(gm)
    profile = device if isinstance(device, DeviceProfile) else get_profile(device)
    if table is None:
        table, policies = build_table(hg, calib_loader, eval_loader, configs, profile=profile, model=model,
                                      observer=observer, policies=policies, workers=workers,
                                      ray_address=ray_address, rebuild=rebuild, progress=progress)
    if policies is None:
        policies = Policies(hg, calib_loader, table.configs, table.layers, observer, progress)
    reference = {layer: table.reference for layer in table.layers}
    if isinstance(timer, str):
        raise HyfxError(f"timer {timer!r}: pass a timer class (TorchTimer, hyfx.pipelines.hysquant.OrtTimer; by name: "
                        "hyfx.pipelines.hysquant.TIMERS) or a callable (assignment → seconds)")
    if isinstance(timer, type):
        first = next(iter(calib_loader))
        timer = timer(hg, policies, first[0] if isinstance(first, (tuple, list)) else first)
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
