"""Multiple-choice knapsack as an integer linear program (scipy's HiGHS MILP): one config per layer.

x[l, c] ∈ {0, 1}, Σ_c x[l, c] = 1 for every layer; minimise Σ objective[l, c]·x[l, c] subject to
Σ cost_k[l, c]·x[l, c] ≤ budget_k for every constraint k, with pruned (l, c) fixed to 0 and previously
rejected assignments cut off (Σ_l x[l, chosen_l] ≤ L − 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hyfx.errors import HyfxError


@dataclass(frozen=True)
class Constraint:
    name: str  # what the error message calls it, e.g. "latency ≤ 0.8x"
    costs: np.ndarray  # layers × configs
    limit: float  # offset + Σ chosen costs must stay ≤ limit
    offset: float = 0.0  # what no choice changes (fixed latency, FP32 parameters)


class Infeasible(HyfxError):
    """No assignment meets the constraints; the message names the tightest one."""


def solve(objective: np.ndarray, constraints: Sequence[Constraint] = (), allowed: np.ndarray | None = None,
          exclude: Sequence[Sequence[int]] = (), time_limit: float = 60.0) -> list[int]:
    """The optimal config index per layer (ties broken by HiGHS); raises Infeasible naming the tightest budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # imported here: `import hyfx` stays light

    objective = np.asarray(objective, dtype=float)
    n_layers, n_configs = objective.shape
    allowed = np.ones_like(objective, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if not allowed.any(axis=1).all():
        layer = int(np.flatnonzero(~allowed.any(axis=1))[0])
        raise Infeasible(f"layer #{layer} has no allowed config left: widen the config set or the pruning threshold")
    n = n_layers * n_configs
    rows = [LinearConstraint(np.kron(np.eye(n_layers), np.ones(n_configs)), 1, 1)]
    for con in constraints:
        costs = np.where(allowed, np.asarray(con.costs, dtype=float), 0.0)
        # rows scaled to O(1): HiGHS's absolute feasibility tolerance would otherwise swamp costs of 1e-6 s
        scale = float(np.abs(costs).max()) or 1.0
        rhs = (con.limit - con.offset) / scale
        rows.append(LinearConstraint(costs.reshape(1, n) / scale, -np.inf, rhs + _slack(rhs)))
    for chosen in exclude:
        cut = np.zeros((n_layers, n_configs))
        cut[np.arange(n_layers), list(chosen)] = 1
        rows.append(LinearConstraint(cut.reshape(1, n), -np.inf, n_layers - 1))
    result = milp(c=np.where(allowed, objective, 0.0).reshape(n), constraints=rows, integrality=np.ones(n),
                  bounds=Bounds(np.zeros(n), allowed.reshape(n).astype(float)),
                  options={"time_limit": time_limit, "mip_rel_gap": 0.0})
    if result.x is None:
        raise Infeasible(diagnose(constraints, allowed, excluded=len(exclude)))
    x = result.x.reshape(n_layers, n_configs)
    return [int(i) for i in x.argmax(axis=1)]


def _slack(limit: float) -> float:
    """Float tolerance so a budget met exactly (e.g. every layer at the reference) stays feasible."""
    return 1e-9 * max(1.0, abs(limit))


def reachable(costs: np.ndarray, allowed: np.ndarray) -> tuple[float, float]:
    """The smallest and largest Σ cost any assignment of allowed configs can reach."""
    masked_lo = np.where(allowed, costs, np.inf)
    masked_hi = np.where(allowed, costs, -np.inf)
    return float(masked_lo.min(axis=1).sum()), float(masked_hi.max(axis=1).sum())


def diagnose(constraints: Sequence[Constraint], allowed: np.ndarray, excluded: int = 0) -> str:
    """Say which budget makes the problem infeasible: one unreachable alone, else the one with least room."""
    if not constraints:
        return "no assignment is left: every candidate was already tried and rejected"
    room = []
    for con in constraints:
        lo, hi = reachable(np.asarray(con.costs, dtype=float), allowed)
        lo, hi = lo + con.offset, hi + con.offset
        if lo > con.limit + _slack(con.limit):
            return (f"budget {con.name} cannot be met: the lowest any plan reaches is {lo:.4g} against a limit of "
                    f"{con.limit:.4g}; relax it (or widen the config set)")
        room.append(((con.limit - lo) / (hi - lo) if hi > lo else np.inf, con.name))
    tightest = min(room)[1]
    tail = f" ({excluded} rejected plans excluded)" if excluded else ""
    return (f"budgets cannot all be met at once{tail}; the tightest is {tightest} (least room between its limit and "
            "the lowest reachable value): relax it or another budget")
