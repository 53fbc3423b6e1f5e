"""Budget-filling heuristics: the marginal-gain greedy (ILP warm start) and the baselines.

All start from a feasible assignment and promote groups one candidate step at a time
(candidates are sorted cheapest first) while the budget allows. They differ only in the
order of promotion: best error drop per extra bit (greedy), a fixed position priority
(llama.cpp-style heuristic), or a random order (random baseline).
"""

from __future__ import annotations

import heapq
import time
from typing import Sequence

import numpy as np

from ..errors import BudgetError
from .problem import Assignment, Problem


def greedy_marginal(problem: Problem) -> Assignment:
    """Repeatedly take the promotion with the largest error decrease per extra bit that still fits."""
    t0 = time.perf_counter()
    G, C = problem.cost.shape
    choice = np.zeros(G, dtype=np.int64)
    used = problem.total_bits(choice)
    heap: list[tuple[float, int, int]] = []

    def push(g: int) -> None:
        c = choice[g]
        best = None
        for n in range(c + 1, C):  # best ratio over any richer candidate (handles non-convex tables)
            db = problem.bits[g, n] - problem.bits[g, c]
            de = problem.cost[g, c] - problem.cost[g, n]
            if db > 0 and (best is None or de / db > best[0]):
                best = (de / db, n)
        if best is not None and best[0] > 0:
            heapq.heappush(heap, (-best[0], g, best[1]))

    for g in range(G):
        push(g)
    while heap:
        _, g, n = heapq.heappop(heap)
        extra = problem.bits[g, n] - problem.bits[g, choice[g]]
        if used + extra <= problem.budget_bits:
            used += extra
            choice[g] = n
            push(g)
    return Assignment(choice, "greedy", "feasible", problem.objective(choice), seconds=time.perf_counter() - t0)


def uniform(problem: Problem, bits: int) -> Assignment:
    """Every group at the candidate with ``bits`` bits (the richest such one that fits)."""
    cols = [j for j, c in enumerate(problem.candidates) if c.bits == bits]
    for j in reversed(cols):
        choice = np.full(problem.num_groups, j, dtype=np.int64)
        if problem.total_bits(choice) <= problem.budget_bits:
            return Assignment(choice, f"uniform-{bits}bit", "feasible", problem.objective(choice))
    raise BudgetError(f"uniform {bits}-bit does not fit the budget")


def promote_in_order(problem: Problem, priority: Sequence[float], name: str) -> Assignment:
    """Start from the richest uniform assignment that fits, then promote groups one step at a
    time in ascending ``priority`` order, cycling over the groups until nothing fits."""
    G = problem.num_groups
    start = 0
    for j in range(len(problem.candidates)):
        if problem.total_bits(np.full(G, j)) <= problem.budget_bits:
            start = j
    choice = np.full(G, start, dtype=np.int64)
    used = problem.total_bits(choice)
    order = np.argsort(np.asarray(priority), kind="stable")
    progress = True
    while progress:
        progress = False
        for g in order:
            if choice[g] + 1 >= len(problem.candidates):
                continue
            extra = problem.bits[g, choice[g] + 1] - problem.bits[g, choice[g]]
            if used + extra <= problem.budget_bits:
                choice[g] += 1
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
    G, C = problem.cost.shape
    choice = np.zeros(G, dtype=np.int64)
    used = problem.total_bits(choice)
    open_groups = list(range(G))
    while open_groups:
        k = int(rng.integers(len(open_groups)))
        g = open_groups[k]
        extra = problem.bits[g, choice[g] + 1] - problem.bits[g, choice[g]] if choice[g] + 1 < C else None
        if extra is None or used + extra > problem.budget_bits:
            open_groups.pop(k)
            continue
        choice[g] += 1
        used += extra
    return Assignment(choice, f"random-seed{seed}", "feasible", problem.objective(choice))
