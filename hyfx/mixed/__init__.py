"""HySquant, the mixed-precision engine: per-layer bit-widths that maximise accuracy under hardware budgets, with
measured feedback (the paper's Fig. 2, built).

  sensitivity  each layer × bit config quantized alone (KL, top-1, latency, energy, bytes); Policies, collapse pruning
  budgets      METRIC=VALUE limits and whether a plan's figures meet them
  cost         the additive cost model over the table, corrected by measurement
  ilp          one config per layer as an integer linear program
  measure      whole plans measured: TorchTimer, latency_ratio, PlanEvaluator
  feedback     ILP → measure → correct → re-solve (search), and run_hysquant: graph → QuantPlan
  pareto       min-KL plans under a sweep of limits, and their plot

Timers that need a backend (ONNX Runtime) live in hyfx.pipelines.hysquant; the `hysquant` recipe is
hyfx.recipes.hysquant.
"""

from hyfx.mixed.budgets import BUDGET_METRICS, Budget
from hyfx.mixed.cost import Corrections, CostModel, fit_drop_per_kl, linear_drop, predicted_drop, prior_drop_per_kl
from hyfx.mixed.feedback import HySquantRun, MixedPrecisionResult, assignment_of, config_counts, run_hysquant, search
from hyfx.mixed.ilp import Constraint, Infeasible, solve
from hyfx.mixed.measure import PlanEvaluator, TorchTimer, latency_ratio
from hyfx.mixed.pareto import pareto_front, plot_front
from hyfx.mixed.sensitivity import Entry, Policies, SensitivityTable, build_table, collapse_pruning, heatmap, reprice

__all__ = ["BUDGET_METRICS", "Budget", "Constraint", "Corrections", "CostModel", "Entry", "HySquantRun", "Infeasible",
           "MixedPrecisionResult", "PlanEvaluator", "Policies", "SensitivityTable", "TorchTimer", "assignment_of",
           "build_table", "collapse_pruning", "config_counts", "fit_drop_per_kl", "heatmap", "latency_ratio",
           "linear_drop", "pareto_front", "plot_front", "predicted_drop", "prior_drop_per_kl", "reprice",
           "run_hysquant", "search", "solve"]
