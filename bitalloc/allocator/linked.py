"""The multiple-choice knapsack with links, solved by OR-Tools CP-SAT (BitsMoE's joint problem).

    minimize   sum_{g,c} e_gc x_gc
    subject to sum_c x_gc = 1                                 for every group g
               sum_{g,c} bits_gc x_gc <= B                    exact integer storage bits
               sum_{c: bits_gc > 0} x_gc <= x_{p, on}        for every link (g needs parent p's option "on")
               x_gc = x_{h, d}                                for every equivalence (g takes c exactly when h takes d)
               x_gc in {0, 1}, x_gc = 0 where not allowed

A link is a fixed charge: an expert's factor slab may be stored only if the shared basis keeps
those ranks, and the basis costs bits once for all experts. That breaks the separable structure
the Lagrangian-core DP of ``exact.py`` relies on, so this model goes to CP-SAT whole; the reported
bound is CP-SAT's, and the gap is zero when it proves optimality. Errors are shifted per group and
scaled to integers as in ``ilp.py`` (the scale is reported).

Equivalences switch whole parts of the model between two forms (a BitsMoE layer is stored either
decomposed or per tensor: each group of the form not taken takes its "absent" option). A known
feasible choice (the per-tensor plan) may be given as a hint: CP-SAT starts from it, and the answer
is never worse than it, even when the time limit stops the search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
from ortools.sat.python import cp_model

from ..budget import Budget
from .ilp import OBJECTIVE_RANGE, run_cp_sat
from .problem import Assignment, budget_bits_within


@dataclass
class LinkedProblem:
    """Groups with one choice each among K columns, one storage budget, and parent links."""

    names: list[str]
    cost: np.ndarray  # [G, K] predicted loss increase
    bits: np.ndarray  # [G, K] int64 exact storage
    allowed: np.ndarray  # [G, K] bool
    counted_params: int  # denominator of bpp budgets
    links: list[tuple[int, int, int]] = field(default_factory=list)  # (child group, parent group, parent option)
    budget_bits: int = 0
    # (group, option, other group, other option): the group takes the option exactly when the other takes its own
    equivalences: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return len(self.names)

    def objective(self, choice: np.ndarray) -> float:
        return float(self.cost[np.arange(self.num_groups), choice].sum())

    def total_bits(self, choice: np.ndarray) -> int:
        return int(self.bits[np.arange(self.num_groups), choice].sum())

    def feasible(self, choice: np.ndarray) -> bool:
        rows = np.arange(self.num_groups)
        links_ok = all(self.bits[c, choice[c]] == 0 or choice[p] == on for c, p, on in self.links)
        same_ok = all((choice[g] == c) == (choice[h] == d) for g, c, h, d in self.equivalences)
        return (bool(self.allowed[rows, choice].all()) and self.total_bits(choice) <= self.budget_bits and links_ok
                and same_ok)

    def with_budget(self, budget: Budget) -> "LinkedProblem":
        """The problem under ``budget``; refuses one below the cheapest or above the richest allowed storage."""
        target = budget_bits_within(self.allowed, self.bits, self.counted_params, budget, "decomposed assignment",
                                    "raise the budget", "lower it")
        return replace(self, budget_bits=target)


def solve_linked(problem: LinkedProblem, time_limit_s: float, seed: int = 0,
                 hint: Optional[np.ndarray] = None) -> Assignment:
    """Optimal (or best found within ``time_limit_s``, with CP-SAT's bound) assignment of ``problem``; never worse
    than ``hint``, a feasible choice, when one is given."""
    if hint is not None and not problem.feasible(hint):
        raise ValueError("the hint is not a feasible choice of the linked problem")
    t0 = time.perf_counter()
    G = problem.num_groups
    # ---- Data: integer objective ----------------------------------------------------------
    base = np.where(problem.allowed, problem.cost, np.inf).min(1)
    shifted = np.where(problem.allowed, problem.cost - base[:, None], 0.0)
    top = float(shifted.max(1).sum())
    scale = OBJECTIVE_RANGE / top if top > 0 else 1.0
    icost = np.rint(shifted * scale).astype(np.int64)
    # ---- Model and variables -------------------------------------------------------------
    model = cp_model.CpModel()
    x = {(g, int(c)): model.new_bool_var(f"x[{g},{c}]") for g in range(G) for c in np.flatnonzero(problem.allowed[g])}
    # ---- Constraints ---------------------------------------------------------------------
    for g in range(G):
        model.add_exactly_one(x[g, int(c)] for c in np.flatnonzero(problem.allowed[g]))
    keys = list(x)
    variables = [x[k] for k in keys]
    model.add(cp_model.LinearExpr.weighted_sum(variables, [int(problem.bits[k]) for k in keys]) <= problem.budget_bits)
    for child, parent, on in problem.links:
        stored = [x[child, int(c)] for c in np.flatnonzero(problem.allowed[child] & (problem.bits[child] > 0))]
        if stored:
            model.add(sum(stored) <= x[parent, on])
    never = model.new_constant(0)  # an option that is not allowed is never taken
    for g, c, h, d in problem.equivalences:
        model.add(x.get((g, c), never) == x.get((h, d), never))
    # ---- Objective -----------------------------------------------------------------------
    model.minimize(cp_model.LinearExpr.weighted_sum(variables, [int(icost[k]) for k in keys]))
    if hint is not None:
        for g, c in keys:
            model.add_hint(x[g, c], c == hint[g])
    # ---- Solve ---------------------------------------------------------------------------
    solver, status = run_cp_sat(model, time_limit_s, seed, "decomposed assignment satisfies the budget")
    choice = np.array([next(int(c) for c in np.flatnonzero(problem.allowed[g]) if solver.value(x[g, int(c)]))
                       for g in range(G)], dtype=np.int64)
    if hint is not None and problem.objective(hint) < problem.objective(choice):
        choice = hint.astype(np.int64)  # the time limit stopped CP-SAT above the hint (or integer rounding did)
    objective = problem.objective(choice)
    bound = objective if status == cp_model.OPTIMAL else float(base.sum()) + solver.best_objective_bound / scale
    return Assignment(choice=choice, solver="linked-cpsat", status=solver.status_name(status).lower(),
                      objective=objective, bound=min(bound, objective), seconds=time.perf_counter() - t0,
                      objective_scale=scale)
