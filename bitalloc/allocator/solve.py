"""One entry point for every solver, chosen by name or automatically by problem size."""

from __future__ import annotations

from ..errors import ConstraintError
from .closed_form import solve_closed_form
from .exact import solve_exact
from .greedy import greedy_marginal
from .ilp import DEFAULT_TIME_LIMIT_S, solve_ilp
from .lagrangian import solve_lagrangian
from .problem import Assignment, Problem

SOLVERS = ("auto", "ilp", "lagrangian", "closed-form", "greedy")
# Beyond this many groups the exact solvers may take minutes; the Lagrangian bound is then
# within ~1e-5 of optimal on real tables and the gap is reported.
AUTO_EXACT_MAX_GROUPS = 200_000


def solve(problem: Problem, solver: str = "auto", time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0) -> Assignment:
    """Solve with ``solver``: auto | ilp | lagrangian | closed-form | greedy.

    ``ilp`` is exact: dynamic programming over the Lagrangian core for the storage budget
    alone (``exact.py``), OR-Tools CP-SAT when a second resource is constrained or the core is
    too large (``ilp.py``).
    """
    if solver not in SOLVERS:
        raise ConstraintError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    has_time = problem.time is not None and problem.time_budget is not None
    if solver == "auto":
        solver = "lagrangian" if problem.num_groups > AUTO_EXACT_MAX_GROUPS and not has_time else "ilp"
    if has_time and solver != "ilp":
        raise ConstraintError(f"the {solver} solver handles the storage budget only; use --solver ilp with a time budget")
    if solver == "ilp":
        return solve_exact(problem) or solve_ilp(problem, time_limit_s=time_limit_s, seed=seed)
    if solver == "lagrangian":
        return solve_lagrangian(problem)
    if solver == "closed-form":
        return solve_closed_form(problem)
    return greedy_marginal(problem)
