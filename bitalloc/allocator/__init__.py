"""Allocators: error tables (numpy) in, one candidate per unit out. Never imports torch."""

from .closed_form import continuous_optimum, fit_sensitivity, solve_closed_form, water_fill
from .constraints import Constraints
from .exact import solve_exact
from .greedy import greedy_marginal, position_priority, promote_in_order, random_assignment, uniform
from .ilp import solve_ilp
from .lagrangian import relax, solve_lagrangian
from .problem import Assignment, Problem, build_problem
from .solve import SOLVERS, solve

__all__ = ["SOLVERS", "Assignment", "Constraints", "Problem", "build_problem", "continuous_optimum", 
           "fit_sensitivity", "greedy_marginal", "position_priority", "promote_in_order", "random_assignment", "relax",
           "solve", "solve_closed_form", "solve_exact", "solve_ilp", "solve_lagrangian", "uniform", "water_fill"]
