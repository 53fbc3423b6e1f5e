"""Allocators: error tables (numpy) in, one candidate per unit out. Never imports torch."""

from .greedy import greedy_marginal, position_priority, promote_in_order, random_assignment, uniform
from .ilp import solve_ilp
from .problem import Assignment, Problem, build_problem

__all__ = ["Assignment", "Problem", "build_problem", "greedy_marginal", "position_priority", "promote_in_order",
           "random_assignment", "solve_ilp", "uniform"]
