"""Lagrangian relaxation of the multiple-choice knapsack, exact repair, and duality bounds.

For each group the allowed (bits, error) points are reduced to their lower convex hull. The LP
relaxation of the problem is then solved exactly by taking hull segments in order of decreasing
error drop per bit until the budget is reached (at most one segment is taken fractionally); its
value equals the Lagrangian dual max_lambda L(lambda),

    L(lambda) = sum_g min_c (e_gc + lambda * bits_gc) - lambda * B  <=  optimum,

and lambda* is the slope of the fractional segment. Repair drops the fractional segment and
fills what budget is left greedily over all allowed candidates, which gives a feasible integer
assignment whose distance to the bound is the reported gap. The same lambda* drives reduced-
cost fixing for the exact solver: a candidate whose reduced cost alone lifts the bound above a
known solution cannot be optimal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .greedy import fill_greedily
from .problem import Assignment, Problem


@dataclass(frozen=True)
class Relaxation:
    lam: float  # optimal multiplier of the storage constraint (error per bit)
    bound: float  # LP = Lagrangian dual value, a lower bound on the integer optimum
    choice: np.ndarray  # integer hull solution before repair (feasible)


def _hulls(problem: Problem) -> list[np.ndarray]:
    """Per group: indices of allowed candidates on the lower convex hull, cheapest first."""
    out = []
    for g in range(problem.num_groups):
        idx = np.flatnonzero(problem.allowed[g])
        idx = idx[np.lexsort((problem.cost[g, idx], problem.bits[g, idx]))]
        hull: list[int] = []
        for j in idx:
            if hull and problem.cost[g, j] >= problem.cost[g, hull[-1]]:
                continue  # more bits, no less error: dominated
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # keep b only if the slope a->b is steeper (more error per bit) than b->j
                s_ab = (problem.cost[g, a] - problem.cost[g, b]) / (problem.bits[g, b] - problem.bits[g, a])
                s_bj = (problem.cost[g, b] - problem.cost[g, j]) / (problem.bits[g, j] - problem.bits[g, b])
                if s_ab > s_bj:
                    break
                hull.pop()
            hull.append(int(j))
        out.append(np.array(hull, dtype=np.int64))
    return out


def relax(problem: Problem) -> Relaxation:
    """Exact LP relaxation over the convex hulls (storage constraint only)."""
    hulls = _hulls(problem)
    choice = np.array([h[0] for h in hulls], dtype=np.int64)
    used = problem.total_bits(choice)
    value = problem.objective(choice)
    seg_g, seg_k, ratio, dbits, dcost = [], [], [], [], []
    for g, h in enumerate(hulls):
        for k in range(1, len(h)):
            db = problem.bits[g, h[k]] - problem.bits[g, h[k - 1]]
            de = problem.cost[g, h[k - 1]] - problem.cost[g, h[k]]
            seg_g.append(g), seg_k.append(k), ratio.append(de / db), dbits.append(db), dcost.append(de)
    order = np.lexsort((np.asarray(seg_k), -np.asarray(ratio))) if ratio else np.array([], dtype=np.int64)
    lam = 0.0
    for s in order:
        g, k = seg_g[s], seg_k[s]
        if used + dbits[s] <= problem.budget_bits:
            used += dbits[s]
            value -= dcost[s]
            choice[g] = hulls[g][k]
        else:  # the fractional segment: its slope is the optimal multiplier
            lam = ratio[s]
            value -= dcost[s] * (problem.budget_bits - used) / dbits[s]
            break
    return Relaxation(lam=float(lam), bound=float(value), choice=choice)


def reduced_costs(problem: Problem, lam: float) -> np.ndarray:
    """rc[g, c] = e_gc + lam*bits_gc - min_c'(...); any solution using (g, c) costs >= L(lam) + rc[g, c]."""
    penal = np.where(problem.allowed, problem.cost + lam * problem.bits, np.inf)
    return penal - penal.min(1, keepdims=True)


def solve_lagrangian(problem: Problem) -> Assignment:
    """Relaxation + repair for very large instances; reports the duality gap."""
    t0 = time.perf_counter()
    rel = relax(problem)
    choice = fill_greedily(problem, rel.choice.copy())
    return Assignment(choice, "lagrangian", "feasible", problem.objective(choice), bound=rel.bound,
                      seconds=time.perf_counter() - t0)
