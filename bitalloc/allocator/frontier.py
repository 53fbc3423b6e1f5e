"""The bits-vs-error frontier: every budget of a sweep solved from one error table.

``sweep`` re-solves the same problem for each budget (the sensitivity pass runs once, the problem is
built once), skipping budgets that the candidates cannot reach; ``report.frontier`` writes the plans,
a CSV and a plot.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..budget import MAX_BPP
from ..errors import BudgetError
from ..plan import Plan

MAX_POINTS = 10_000  # a sweep longer than this is a typo (a step of 1e-9), not a frontier


@dataclass
class FrontierPoint:
    target_bpp: float
    plan: Plan
    perplexity: Optional[float] = None

    @property
    def filename(self) -> str:
        return f"plan-{self.target_bpp:g}.json"


def budgets(start: float, stop: float, step: float) -> list[float]:
    """start, start + step, ... up to stop (inclusive, to 1e-9 of a step)."""
    if not all(math.isfinite(x) for x in (start, stop, step)) or step <= 0 or stop < start:
        raise BudgetError(f"empty sweep: --from {start} --to {stop} --step {step} (finite numbers, --step > 0, "
                          "--from <= --to)")
    if not 0 < start <= stop <= MAX_BPP:
        raise BudgetError(f"--from {start} --to {stop}: budgets are bits per parameter, 0 < bpp <= {MAX_BPP}")
    span = (stop - start) / step  # inf for a denormal step
    n = math.floor(span + 1e-9) + 1 if span < MAX_POINTS else MAX_POINTS + 1
    if n > MAX_POINTS:
        raise BudgetError(f"--from {start} --to {stop} --step {step} is over {MAX_POINTS} budgets "
                          "(use a larger --step)")
    return [round(start + i * step, 10) for i in range(n)]


def sweep(solve_one: Callable[[float], Plan], targets: Sequence[float]) -> list[FrontierPoint]:
    """``solve_one(bpp) -> Plan`` for every target; unreachable budgets are skipped with a warning."""
    points = []
    for t in targets:
        try:
            points.append(FrontierPoint(t, solve_one(t)))
        except BudgetError as exc:
            warnings.warn(f"skipping {t:g} bpp: {exc}", stacklevel=2)
    if not points:
        raise BudgetError("no budget of the sweep is reachable with these candidates")
    return points
