"""Exact multiple-choice knapsack with OR-Tools CP-SAT, after reduced-cost fixing.

    minimize   sum_{g,c} e_gc x_gc
    subject to sum_c x_gc = 1                       for every group g (tie groups included)
               sum_{g,c} bits_gc x_gc <= B          exact integer storage bits
               sum_{g,c} time_gc x_gc <= T          optional second resource
               x_gc in {0, 1}, x_gc = 0 where (g, c) is not allowed (pins, bounds)

Before the model is built, the Lagrangian relaxation (``lagrangian.py``) gives a lower bound L
and multiplier lambda, and its repaired solution an upper bound U. Any solution that uses
(g, c) costs at least L + rc_gc (reduced cost at lambda), so every candidate with
L + rc_gc > U is removed: this is exact, and on real tables it leaves one or two candidates for
almost every group, so CP-SAT proves optimality of instances with 10^4 groups in about a second.

CP-SAT needs integer coefficients: the errors that remain variable are shifted per group and
scaled by s (recorded in the plan) so that the largest possible objective is about 1e12.
"""

from __future__ import annotations

import os
import time

import numpy as np
from ortools.sat.python import cp_model

from ..errors import BudgetError
from .greedy import fill_greedily
from .lagrangian import reduced_costs, relax
from .problem import TIME_RTOL, Assignment, Problem

OBJECTIVE_RANGE = 1e12
DEFAULT_TIME_LIMIT_S = 60.0
_FIX_TOL = 1e-9  # relative slack so that ties with the incumbent are never fixed away
_TIME_SCALE = 1e9  # the secondary resource is rounded to 1e-9 of its budget (see TIME_RTOL)


def solve_ilp(problem: Problem, time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0) -> Assignment:
    t0 = time.perf_counter()
    G, C = problem.cost.shape
    # ---- Data: bound, incumbent, reduced-cost fixing -------------------------------------
    rel = relax(problem)
    incumbent = fill_greedily(problem, rel.choice.copy())
    keep = problem.allowed.copy()
    if problem.feasible(incumbent):
        ub = problem.objective(incumbent)
        keep &= rel.bound + reduced_costs(problem, rel.lam) <= ub + _FIX_TOL * max(abs(ub), 1e-30)
        keep[np.arange(G), incumbent] = True
    base = np.where(keep, problem.cost, np.inf).min(1)
    shifted = np.where(keep, problem.cost - base[:, None], 0.0)
    top = float(shifted.max(1).sum())
    scale = OBJECTIVE_RANGE / top if top > 0 else 1.0
    icost = np.rint(shifted * scale).astype(np.int64)
    # ---- Model and variables -------------------------------------------------------------
    model = cp_model.CpModel()
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    for g in range(G):
        for c in np.flatnonzero(keep[g]):
            x[g, int(c)] = model.new_bool_var(f"x[{g},{c}]")
    # ---- Constraints ---------------------------------------------------------------------
    for g in range(G):
        model.add_exactly_one(x[g, int(c)] for c in np.flatnonzero(keep[g]))
    keys = list(x)
    variables = [x[k] for k in keys]
    model.add(cp_model.LinearExpr.weighted_sum(variables, [int(problem.bits[k]) for k in keys]) <= problem.budget_bits)
    if problem.time is not None and problem.time_budget is not None:
        unit = problem.time_budget / _TIME_SCALE
        model.add(cp_model.LinearExpr.weighted_sum(variables, [int(np.rint(problem.time[k] / unit)) for k in keys])
                  <= int(_TIME_SCALE * (1 + TIME_RTOL)))
    # ---- Objective -----------------------------------------------------------------------
    model.minimize(cp_model.LinearExpr.weighted_sum(variables, [int(icost[k]) for k in keys]))
    for g in range(G):
        for c in np.flatnonzero(keep[g]):
            model.add_hint(x[g, int(c)], int(c) == incumbent[g])
    # ---- Solve ---------------------------------------------------------------------------
    solver, status = run_cp_sat(model, time_limit_s, seed, "assignment satisfies the budget and constraints")
    choice = np.array([next(c for c in np.flatnonzero(keep[g]) if solver.value(x[g, int(c)])) for g in range(G)],
                      dtype=np.int64)
    objective = problem.objective(choice)
    bound = objective if status == cp_model.OPTIMAL else max(rel.bound, float(base.sum()) + solver.best_objective_bound / scale)
    return Assignment(choice=choice, solver="ilp-cpsat", status=solver.status_name(status).lower(),
                      objective=objective, bound=min(bound, objective), seconds=time.perf_counter() - t0,
                      objective_scale=scale)


def run_cp_sat(model: "cp_model.CpModel", time_limit_s: float, seed: int, what: str) -> tuple["cp_model.CpSolver", int]:
    """Solve ``model`` with the project's CP-SAT settings (time limit, up to 8 workers, seeded).

    Returns the solver and its status (optimal or feasible); otherwise raises :class:`BudgetError` saying
    that no ``what`` (e.g. "assignment satisfies the budget") exists within the limit.
    """
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = min(8, os.cpu_count() or 1)
    solver.parameters.random_seed = seed
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise BudgetError(f"no {what} ({solver.status_name(status).lower()})")
    return solver, status
