"""Budget-filling heuristics: the marginal-gain greedy (warm start and repair) and the baselines.

All start from a feasible assignment and move groups to richer allowed candidates while the
budget allows. They differ only in the order of promotion: best error drop per extra bit
(greedy), a fixed position priority (llama.cpp-style heuristic), or a random order (random
baseline).
"""

from __future__ import annotations

import heapq
import time
from typing import Sequence

import numpy as np

from ..errors import BudgetError
from .problem import Assignment, Problem


def fill_greedily(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """From a feasible ``choice``, repeatedly take the move with the largest error decrease per
    extra bit that still fits (any richer allowed candidate, so non-convex tables are handled)."""
    G, C = problem.cost.shape
    used = problem.total_bits(choice)
    heap: list[tuple[float, int, int, int]] = []

    def push(g: int) -> None:
        c = choice[g]
        best = None
        for n in range(C):
            db = problem.bits[g, n] - problem.bits[g, c]
            de = problem.cost[g, c] - problem.cost[g, n]
            if problem.allowed[g, n] and db > 0 and de > 0 and (best is None or de / db > best[0]):
                best = (de / db, n)
        if best is not None:
            heapq.heappush(heap, (-best[0], g, best[1], c))

    for g in range(G):
        push(g)
    while heap:
        _, g, n, was = heapq.heappop(heap)
        if choice[g] != was:
            continue
        extra = problem.bits[g, n] - problem.bits[g, choice[g]]
        if used + extra <= problem.budget_bits:
            used += extra
            choice[g] = n
            push(g)
    return choice


def greedy_marginal(problem: Problem) -> Assignment:
    """The marginal-gain greedy from the cheapest allowed assignment."""
    t0 = time.perf_counter()
    choice = fill_greedily(problem, problem.cheapest())
    return Assignment(choice, "greedy", "feasible", problem.objective(choice), seconds=time.perf_counter() - t0)


def uniform(problem: Problem, bits: int) -> Assignment:
    """Every group at the candidate with ``bits`` bits (the richest such one that fits)."""
    cols = [j for j, c in enumerate(problem.candidates) if c.bits == bits]
    for j in reversed(cols):
        choice = np.full(problem.num_groups, j, dtype=np.int64)
        if problem.feasible(choice):
            return Assignment(choice, f"uniform-{bits}bit", "feasible", problem.objective(choice))
    raise BudgetError(f"uniform {bits}-bit does not fit the budget")


def _next_allowed(problem: Problem, g: int, c: int) -> int | None:
    for n in range(c + 1, len(problem.candidates)):
        if problem.allowed[g, n]:
            return n
    return None


def promote_in_order(problem: Problem, priority: Sequence[float], name: str) -> Assignment:
    """Start from the richest uniform assignment that fits, then promote groups one step at a
    time in ascending ``priority`` order, cycling over the groups until nothing fits."""
    G = problem.num_groups
    choice = problem.cheapest()
    for j in range(len(problem.candidates)):
        if problem.feasible(np.full(G, j)):
            choice = np.full(G, j, dtype=np.int64)
    used = problem.total_bits(choice)
    order = np.argsort(np.asarray(priority), kind="stable")
    progress = True
    while progress:
        progress = False
        for g in order:
            n = _next_allowed(problem, g, choice[g])
            if n is None:
                continue
            extra = problem.bits[g, n] - problem.bits[g, choice[g]]
            if used + extra <= problem.budget_bits:
                choice[g] = n
                used += extra
                progress = True
    return Assignment(choice, name, "feasible", problem.objective(choice))


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule: first and last eighth of the layers, and every third layer between."""
    return layer < n_layers / 8 or layer >= 7 * n_layers / 8 or (layer - n_layers // 8) % 3 == 2


def position_priority(layers: Sequence[int | None], roles: Sequence[str], n_layers: int) -> list[int]:
    """Priority tier of each unit (lower is promoted first), llama.cpp style: attn_v / down
    projections in use_more_bits layers, then the first and last layer, then the remaining
    attn_v / down projections, then everything else."""
    tiers = []
    for layer, role in zip(layers, roles):
        key = role in ("attn_v", "mlp_down", "expert_down", "shared_down")
        edge = layer is not None and (layer == 0 or layer == n_layers - 1)
        more = layer is not None and use_more_bits(layer, n_layers)
        tiers.append(0 if key and more else 1 if edge else 2 if key else 3)
    return tiers


def random_assignment(problem: Problem, seed: int) -> Assignment:
    """A random assignment that fills the budget: random promotion order from the cheapest."""
    rng = np.random.default_rng(seed)
    choice = problem.cheapest()
    used = problem.total_bits(choice)
    open_groups = list(range(problem.num_groups))
    while open_groups:
        k = int(rng.integers(len(open_groups)))
        g = open_groups[k]
        n = _next_allowed(problem, g, choice[g])
        extra = None if n is None else problem.bits[g, n] - problem.bits[g, choice[g]]
        if extra is None or used + extra > problem.budget_bits:
            open_groups.pop(k)
            continue
        choice[g] = n
        used += extra
    return Assignment(choice, f"random-seed{seed}", "feasible", problem.objective(choice))
