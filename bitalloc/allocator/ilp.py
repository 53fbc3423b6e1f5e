"""Exact multiple-choice knapsack with OR-Tools CP-SAT.

    minimize   sum_{g,c} round(s * e_gc) x_gc
    subject to sum_c x_gc = 1                      for every group g (tie groups included)
               sum_{g,c} bits_gc x_gc <= B           exact integer storage bits
               x_gc in {0, 1}

CP-SAT needs integer coefficients: errors are scaled by s (recorded in the plan) so that
the largest possible objective is about 1e12, which keeps every error above 1e-12 of the
total distinguishable. The greedy solution is given as a hint, and the status, objective,
best bound and optimality gap are reported as the solver proved them.
"""

from __future__ import annotations

import os
import time

import numpy as np
from ortools.sat.python import cp_model

from ..errors import BudgetError
from .greedy import greedy_marginal
from .problem import Assignment, Problem

OBJECTIVE_RANGE = 1e12
DEFAULT_TIME_LIMIT_S = 60.0


def solve_ilp(problem: Problem, time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0) -> Assignment:
    t0 = time.perf_counter()
    G, C = problem.cost.shape
    # ---- Data ---------------------------------------------------------------------------
    top = float(problem.cost.max(1).sum())
    scale = OBJECTIVE_RANGE / top if top > 0 else 1.0
    icost = np.rint(problem.cost * scale).astype(np.int64)
    # ---- Model and variables -------------------------------------------------------------
    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x[{g},{c}]") for c in range(C)] for g in range(G)]
    # ---- Constraints ---------------------------------------------------------------------
    for g in range(G):
        model.add_exactly_one(x[g])
    flat = [x[g][c] for g in range(G) for c in range(C)]
    model.add(cp_model.LinearExpr.weighted_sum(flat, problem.bits.ravel().tolist()) <= problem.budget_bits)
    # ---- Objective -----------------------------------------------------------------------
    model.minimize(cp_model.LinearExpr.weighted_sum(flat, icost.ravel().tolist()))
    hint = greedy_marginal(problem).choice
    for g in range(G):
        for c in range(C):
            model.add_hint(x[g][c], c == hint[g])
    # ---- Solve ---------------------------------------------------------------------------
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = min(8, os.cpu_count() or 1)
    solver.parameters.random_seed = seed
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise BudgetError(f"the integer program found no assignment within the budget ({solver.status_name(status)})")
    choice = np.array([next(c for c in range(C) if solver.value(x[g][c])) for g in range(G)], dtype=np.int64)
    return Assignment(choice=choice, solver="ilp-cpsat", status=solver.status_name(status).lower(),
                      objective=problem.objective(choice), bound=solver.best_objective_bound / scale,
                      seconds=time.perf_counter() - t0, objective_scale=scale)
