"""The allocation problem as plain arrays (no torch, no model objects).

Units tied together (q/k/v, gate/up) are collapsed into one *group* that takes a single
choice; a group's cost and storage are the sums over its members. Storage is exact integer
bits (codes + fp16 scale + fp16 zero per group of columns), so the budget constraint is
met to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..budget import Budget, tensor_bits
from ..errors import BudgetError
from ..plan import Candidate


@dataclass
class Problem:
    """min sum_g cost[g, c_g]  s.t.  sum_g bits[g, c_g] <= budget_bits, one c_g per group."""

    candidates: list[Candidate]  # sorted by storage cost (cheapest first)
    group_names: list[str]
    members: list[list[int]]  # unit indices per group
    cost: np.ndarray  # [G, C] float, predicted loss increase
    bits: np.ndarray  # [G, C] int64, exact storage
    budget_bits: int
    counted_params: int
    unit_names: list[str] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def total_bits(self, choice: np.ndarray) -> int:
        return int(self.bits[np.arange(self.num_groups), choice].sum())

    def objective(self, choice: np.ndarray) -> float:
        return float(self.cost[np.arange(self.num_groups), choice].sum())

    def unit_choices(self, choice: np.ndarray) -> np.ndarray:
        """Per-unit candidate index from a per-group choice."""
        out = np.empty(len(self.unit_names), dtype=np.int64)
        for g, us in enumerate(self.members):
            out[us] = choice[g]
        return out


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

    @property
    def gap(self) -> Optional[float]:
        if self.bound is None:
            return None
        return max(0.0, self.objective - self.bound) / max(abs(self.objective), 1e-30)


def build_problem(unit_names: Sequence[str], shapes: Sequence[Sequence[int]], errors: np.ndarray,
                  candidates: Sequence[Candidate], tie_groups: Sequence[Sequence[str]], budget: Budget) -> Problem:
    """Collapse ties, price every candidate exactly, and check that the budget is reachable."""
    order = sorted(range(len(candidates)), key=lambda j: (candidates[j].bpp, candidates[j].bits))
    cands = [candidates[j] for j in order]
    errors = np.asarray(errors, dtype=np.float64)[:, order]
    index = {n: i for i, n in enumerate(unit_names)}
    grouped: set[int] = set()
    names, members = [], []
    for k, tie in enumerate(tie_groups):
        idx = [index[m] for m in tie if m in index]
        if len(idx) > 1:
            names.append(f"tie{k}:" + "+".join(unit_names[i] for i in idx))
            members.append(idx)
            grouped.update(idx)
    for i, n in enumerate(unit_names):
        if i not in grouped:
            names.append(n)
            members.append([i])
    unit_bits = np.array([[_storage(shapes[i], c) for c in cands] for i in range(len(unit_names))], dtype=np.int64)
    cost = np.stack([errors[m].sum(0) for m in members]) if members else np.zeros((0, len(cands)))
    bits = np.stack([unit_bits[m].sum(0) for m in members]) if members else np.zeros((0, len(cands)), np.int64)
    params = int(sum(int(np.prod(s)) for s in shapes))
    if params == 0:
        raise BudgetError("no tensor is left to quantize (everything is locked)")
    budget_bits = budget.total_bits(params)
    lo, hi = int(bits.min(1).sum()), int(bits.max(1).sum())
    if budget_bits < lo:
        raise BudgetError(f"budget {budget.text} ({budget_bits / params:.4f} bpp) is below the cheapest assignment "
                          f"({lo / params:.4f} bpp, every tensor at {cands[0].id}); raise the budget or add cheaper candidates")
    if budget_bits > hi + params * 1e-6:
        raise BudgetError(f"budget {budget.text} ({budget_bits / params:.4f} bpp) is above the richest assignment "
                          f"({hi / params:.4f} bpp, every tensor at {cands[-1].id}); lower it or add richer candidates")
    return Problem(cands, names, members, cost, bits, min(budget_bits, hi), params, list(unit_names))


def _storage(shape: Sequence[int], c: Candidate) -> int:
    rows = int(np.prod(shape[:-1]))
    return tensor_bits(rows, int(shape[-1]), c.bits, c.group_size)
