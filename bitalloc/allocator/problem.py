"""The allocation problem as plain arrays (no torch, no model objects).

Units tied together (q/k/v, gate/up) are collapsed into one *group* that takes a single
choice; a group's cost and storage are the sums over its members, and a candidate is allowed
for the group only if every member allows it (pins, bit bounds). Storage is exact integer
bits (``Candidate.storage_bits``: codes + scale + zero point per group of columns, or ggml blocks), so the budget constraint is met to
the bit. An optional second resource (e.g. kernel time per candidate) adds one more knapsack
constraint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from ..budget import Budget
from ..errors import BudgetError, ConstraintError
from ..plan import Candidate


# The secondary resource is an estimate (measured kernel time); it is met to this relative
# tolerance, which absorbs the integer rounding CP-SAT needs.
TIME_RTOL = 1e-6


@dataclass
class Problem:
    """min sum_g cost[g, c_g]  s.t.  sum_g bits[g, c_g] <= budget_bits, c_g allowed, one per group."""

    candidates: list[Candidate]  # sorted by storage cost (cheapest first)
    group_names: list[str]
    members: list[list[int]]  # unit indices per group
    cost: np.ndarray  # [G, C] float, predicted loss increase
    bits: np.ndarray  # [G, C] int64, exact storage
    budget_bits: int  # set by with_budget
    counted_params: int
    unit_names: list[str]
    numel: np.ndarray  # [G] parameters per group
    allowed: np.ndarray  # [G, C] bool
    time: Optional[np.ndarray] = None  # [G, C] float, secondary resource (e.g. kernel seconds)
    time_budget: Optional[float] = None

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def total_bits(self, choice: np.ndarray) -> int:
        return int(self.bits[np.arange(self.num_groups), choice].sum())

    def total_time(self, choice: np.ndarray) -> float:
        return 0.0 if self.time is None else float(self.time[np.arange(self.num_groups), choice].sum())

    def objective(self, choice: np.ndarray) -> float:
        return float(self.cost[np.arange(self.num_groups), choice].sum())

    def feasible(self, choice: np.ndarray) -> bool:
        ok = self.total_bits(choice) <= self.budget_bits and bool(self.allowed[np.arange(self.num_groups), choice].all())
        if self.time is not None and self.time_budget is not None:
            ok = ok and self.total_time(choice) <= self.time_budget * (1 + TIME_RTOL)
        return ok

    def unit_choices(self, choice: np.ndarray) -> np.ndarray:
        """Per-unit candidate index from a per-group choice."""
        out = np.empty(len(self.unit_names), dtype=np.int64)
        for g, us in enumerate(self.members):
            out[us] = choice[g]
        return out

    def with_errors(self, unit_errors: np.ndarray) -> "Problem":
        """The same problem with per-unit [U, C] errors (columns in ``self.candidates``' order)."""
        cost = np.stack([unit_errors[m].sum(0) for m in self.members]) if self.members else np.zeros((0, len(self.candidates)))
        return replace(self, cost=cost)

    def with_budget(self, budget: Budget) -> "Problem":
        """The same problem under ``budget``; refuses a budget outside what the allowed candidates reach."""
        return replace(self, budget_bits=budget_bits_within(
            self.allowed, self.bits, self.counted_params, budget, "assignment allowed",
            "raise the budget, add cheaper candidates or relax pins", "lower it or add richer candidates"))

    def cheapest(self) -> np.ndarray:
        """Per group, the allowed candidate with the least storage."""
        return np.where(self.allowed, self.bits, np.iinfo(np.int64).max).argmin(1)


@dataclass
class Assignment:
    """A solver's answer: one candidate index per group, with the solver's own account."""

    choice: np.ndarray
    solver: str
    status: str
    objective: float
    bound: Optional[float] = None
    seconds: float = 0.0
    objective_scale: Optional[float] = None
    note: Optional[str] = None

    @property
    def gap(self) -> Optional[float]:
        if self.bound is None:
            return None
        return max(0.0, self.objective - self.bound) / max(abs(self.objective), 1e-30)


def build_problem(unit_names: Sequence[str], shapes: Sequence[Sequence[int]], errors: Optional[np.ndarray],
                  candidates: Sequence[Candidate], tie_groups: Sequence[Sequence[str]], budget: Optional[Budget],
                  allowed: Optional[np.ndarray] = None, time_per_param: Optional[Sequence[float]] = None,
                  time_budget: Optional[float] = None) -> Problem:
    """Collapse ties, price every candidate exactly, and check that the budget is reachable.

    ``errors`` is a per-unit [U, C] array in ``candidates``' order (None: all zero, for checking a
    budget before the errors are known); ``allowed`` a per-unit [U, C] mask (pins, bounds);
    ``time_per_param`` a per-candidate cost of the secondary resource, multiplied by each unit's
    parameter count. ``budget`` None gives the structure alone (no budget yet, ``budget_bits`` 0).
    The same problem at another budget is :meth:`Problem.with_budget`, with other
    errors :meth:`Problem.with_errors`: the structure is built once.
    """
    order = sorted(range(len(candidates)), key=lambda j: (candidates[j].bpp, candidates[j].bits))
    cands = [candidates[j] for j in order]
    unit_allowed = np.ones((len(unit_names), len(cands)), bool) if allowed is None else np.asarray(allowed, bool)[:, order]
    index = {n: i for i, n in enumerate(unit_names)}
    grouped: set[int] = set()
    names, members = [], []
    for tie in tie_groups:
        idx = [index[m] for m in tie if m in index]
        if len(idx) > 1:
            names.append("+".join(unit_names[i] for i in idx))
            members.append(idx)
            grouped.update(idx)
    for i, n in enumerate(unit_names):
        if i not in grouped:
            names.append(n)
            members.append([i])
    rows = np.array([int(np.prod(s[:-1])) for s in shapes], dtype=np.int64)
    cols = np.array([int(s[-1]) for s in shapes], dtype=np.int64)
    numel = rows * cols
    C = len(cands)
    unit_bits = np.stack([c.storage_bits(rows, cols) for c in cands], axis=1) if len(shapes) else \
        np.zeros((0, C), np.int64)
    bits = np.stack([unit_bits[m].sum(0) for m in members]) if members else np.zeros((0, C), np.int64)
    ok = np.stack([unit_allowed[m].all(0) for m in members]) if members else np.zeros((0, C), bool)
    for g, m in enumerate(members):
        if not ok[g].any():
            raise ConstraintError(f"the constraints leave no common candidate for {' and '.join(unit_names[i] for i in m)}"
                                  + (" (a tie group: its members must share one choice)" if len(m) > 1 else ""))
    params = int(numel.sum())
    if params == 0:
        raise BudgetError("no tensor is left to quantize (everything is locked)")
    time = None
    if time_per_param is not None:
        per = np.asarray(time_per_param, dtype=np.float64)[order]
        time = np.stack([per * numel[m].sum() for m in members])
    group_numel = np.array([numel[m].sum() for m in members], dtype=np.int64)
    structure = Problem(cands, names, members, np.zeros((len(members), C)), bits, 0, params, list(unit_names),
                        group_numel, ok, time, time_budget)
    unit_errors = np.zeros((len(unit_names), C)) if errors is None else np.asarray(errors, dtype=np.float64)[:, order]
    problem = structure.with_errors(unit_errors)
    return problem if budget is None else problem.with_budget(budget)


def budget_bits_within(allowed: np.ndarray, bits: np.ndarray, params: int, budget: Budget, what: str,
                       raise_hint: str, lower_hint: str) -> int:
    """``budget`` in bits for ``params`` counted parameters, checked against the cheapest and richest
    storage the ``allowed`` [G, C] choices of ``bits`` reach (and capped at the richest).

    A budget outside that range is a :class:`BudgetError` naming both in bpp, the kind of assignment
    (``what``) and the fix (``raise_hint`` / ``lower_hint``).
    """
    budget_bits = budget.total_bits(params)
    lo = int(np.where(allowed, bits, np.iinfo(np.int64).max).min(1).sum())
    hi = int(np.where(allowed, bits, -1).max(1).sum())
    if budget_bits < lo:
        raise BudgetError(f"budget {budget.text} ({budget_bits / params:.4f} bpp) is below the cheapest {what} "
                          f"({lo / params:.4f} bpp); {raise_hint}")
    if budget_bits > hi + params * 1e-6:
        raise BudgetError(f"budget {budget.text} ({budget_bits / params:.4f} bpp) is above the richest {what} "
                          f"({hi / params:.4f} bpp); {lower_hint}")
    return min(budget_bits, hi)
