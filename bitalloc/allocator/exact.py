"""Exact solution of the storage-only knapsack by dynamic programming over the Lagrangian core.

With lambda* and bound L from the relaxation, every assignment x satisfies

    objective(x) = L + sum_g rc_g(x_g) + lambda* * (B - bits(x)),

with reduced costs rc >= 0 and slack B - bits(x) >= 0. Starting from the lambda*-optimal choice of
every group, a state is (extra bits, accumulated rc); a state whose L + rc already exceeds a known
solution U can never win and is dropped, and among states with the same extra bits only the
cheapest is kept. The surviving states are few (the gap U - L is tiny on real tables), so the DP
is exact and fast; it gives up (returns None) when the pruned state space still exceeds
``MAX_STATES``, and the caller falls back to CP-SAT.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from .greedy import fill_greedily
from .lagrangian import reduced_costs, relax
from .problem import Assignment, Problem

MAX_STATES = 200_000
_TOL = 1e-12


def solve_exact(problem: Problem) -> Optional[Assignment]:
    """Proven-optimal assignment for the storage constraint alone, or None if the core is too large."""
    t0 = time.perf_counter()
    if problem.time is not None:
        return None
    G = problem.num_groups
    rel = relax(problem)
    incumbent = fill_greedily(problem, rel.choice.copy())
    ub = problem.objective(incumbent)
    limit = ub - rel.bound + _TOL * max(abs(ub), 1e-30)  # a state may spend at most this much reduced cost
    rc = reduced_costs(problem, rel.lam)
    base = np.where(problem.allowed, rc, np.inf).argmin(1)  # lambda*-optimal choice per group
    base_bits = problem.total_bits(base)
    # state arrays: extra bits, reduced cost; per processed group: chosen option and parent index
    extra = np.zeros(1, dtype=np.int64)
    cost = np.zeros(1)
    trail: list[tuple[int, np.ndarray, np.ndarray]] = []
    for g in range(G):
        opts = np.flatnonzero(problem.allowed[g] & (rc[g] <= limit))
        if len(opts) == 1:
            continue
        d_bits = problem.bits[g, opts] - problem.bits[g, base[g]]
        new_extra = (extra[:, None] + d_bits[None, :]).ravel()
        new_cost = (cost[:, None] + rc[g, opts][None, :]).ravel()
        parent = np.repeat(np.arange(len(extra)), len(opts))
        option = np.tile(opts, len(extra))
        alive = new_cost <= limit
        new_extra, new_cost, parent, option = new_extra[alive], new_cost[alive], parent[alive], option[alive]
        order = np.lexsort((new_cost, new_extra))  # per extra-bits value, cheapest first
        first = np.ones(len(order), dtype=bool)
        first[1:] = new_extra[order][1:] != new_extra[order][:-1]
        keep = order[first]
        if len(keep) > MAX_STATES:
            return None
        extra, cost = new_extra[keep], new_cost[keep]
        trail.append((g, option[keep], parent[keep]))
    slack = problem.budget_bits - base_bits - extra
    final = np.where(slack >= 0, cost + rel.lam * slack, np.inf)
    if not np.isfinite(final).any():
        return None
    idx = int(final.argmin())
    choice = base.copy()
    for g, option, parent in reversed(trail):
        choice[g] = option[idx]
        idx = int(parent[idx])
    if problem.objective(choice) > ub:  # numerical safety: never return worse than the incumbent
        choice = incumbent
    obj = problem.objective(choice)
    return Assignment(choice, "exact-dp", "optimal", obj, bound=obj, seconds=time.perf_counter() - t0)
