import itertools

import numpy as np
import pytest

from bitalloc.allocator import (build_problem, position_priority, promote_in_order,
                                random_assignment, relax, solve, solve_ilp, uniform)
from bitalloc.budget import parse_budget
from bitalloc.errors import BudgetError
from bitalloc.plan import DEFAULT_CANDIDATES, Candidate


def random_instance(seed: int, n_units: int = 6, ties: bool = True):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.choice([64, 128, 256])), int(rng.choice([128, 256, 384]))) for _ in range(n_units)]
    base = rng.lognormal(0, 2, size=n_units)
    # error falls ~4x per extra bit, with noise; 8 bit nearly free
    errors = np.stack([base * 4.0 ** -(b - 2) * rng.uniform(0.7, 1.3, n_units) for b in (2, 3, 4, 8)], 1)
    names = [f"u{i}" for i in range(n_units)]
    tie = [names[:2]] if ties else []
    return names, shapes, errors, tie


def brute_force(problem):
    best, best_c = np.inf, None
    for combo in itertools.product(range(len(problem.candidates)), repeat=problem.num_groups):
        c = np.array(combo)
        if problem.feasible(c):
            obj = problem.objective(c)
            if obj < best:
                best, best_c = obj, c
    return best, best_c


def random_constrained(seed: int):
    """<= 8 units x 4 candidates, random ties, random pins / bounds, sometimes a time budget."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    names, shapes, errors, _ = random_instance(seed, n_units=n, ties=False)
    ties = [names[:2]] if n > 3 and rng.random() < 0.5 else []
    allowed = rng.random((n, 4)) < 0.8
    allowed[np.arange(n), rng.integers(0, 4, n)] = True
    if ties:
        allowed[1] = allowed[0]
    kwargs = {}
    if rng.random() < 0.3:
        kwargs = dict(time_per_param=[1.0, 1.1, 1.3, 2.0], time_budget=float(sum(r * c for r, c in shapes)) * 1.25)
    for _ in range(50):  # draw budgets until one lies between the cheapest and richest allowed assignment
        try:
            return build_problem(names, shapes, errors, DEFAULT_CANDIDATES, ties,
                                 parse_budget(f"{rng.uniform(2.3, 8.2):.3f}"), allowed, **kwargs)
        except BudgetError:
            continue
    raise AssertionError("no feasible budget drawn")


@pytest.mark.parametrize("seed", range(200))
def test_exact_solvers_match_brute_force(seed):
    p = random_constrained(seed)
    best, _ = brute_force(p)
    if not np.isfinite(best):
        with pytest.raises(BudgetError):
            solve(p, "ilp")
        return
    for a in [solve(p, "ilp"), solve_ilp(p)]:
        assert a.status == "optimal"
        assert p.feasible(a.choice)
        assert a.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert a.gap is not None and a.gap < 1e-6
    if p.time is None:  # the relaxations bound the optimum from below and repair stays feasible
        rel = relax(p)
        assert rel.bound <= best * (1 + 1e-9) + 1e-12
        for a in [solve(p, "lagrangian"), solve(p, "greedy"), solve(p, "closed-form")]:
            assert p.feasible(a.choice) and a.objective >= best * (1 - 1e-9)


def test_tie_groups_share_one_choice():
    names, shapes, errors, _ = random_instance(3, n_units=5, ties=False)
    errors[0] *= 1000  # u0 wants bits, u1 does not: without the tie they would differ
    errors[1] *= 1e-4
    p = build_problem(names, shapes, errors, DEFAULT_CANDIDATES, [["u0", "u1"]], parse_budget("2.8"))
    per_unit = p.unit_choices(solve_ilp(p).choice)
    assert per_unit[0] == per_unit[1]
    free = build_problem(names, shapes, errors, DEFAULT_CANDIDATES, [], parse_budget("2.8"))
    free_units = free.unit_choices(solve_ilp(free).choice)
    assert free_units[0] != free_units[1]


def test_uniform_sensitivity_gives_uniform_bits():
    names = [f"u{i}" for i in range(8)]
    shapes = [(128, 256)] * 8
    errors = np.tile([16.0, 4.0, 1.0, 0.01], (8, 1))
    p = build_problem(names, shapes, errors, DEFAULT_CANDIDATES, [], parse_budget("3.25"))
    a = solve_ilp(p)
    assert set(a.choice.tolist()) == {1}  # everyone at 3 bit: convex costs favour no spread


def test_budget_is_met_exactly_and_bytes_budget():
    names, shapes, errors, tie = random_instance(7, n_units=6)
    params = sum(r * c for r, c in shapes)
    p = build_problem(names, shapes, errors, DEFAULT_CANDIDATES, tie, parse_budget(f"{params * 3.0 / 8}B"))
    assert p.budget_bits == params * 3
    a = solve_ilp(p)
    assert p.total_bits(a.choice) <= params * 3


@pytest.mark.parametrize("budget,match", [("2.0", "below the cheapest"), ("9.0", "above the richest")])
def test_infeasible_budgets(budget, match):
    names, shapes, errors, tie = random_instance(1)
    with pytest.raises(BudgetError, match=match):
        build_problem(names, shapes, errors, DEFAULT_CANDIDATES, tie, parse_budget(budget))


def test_baselines_fit_the_budget():
    names, shapes, errors, tie = random_instance(5, n_units=6)
    p = build_problem(names, shapes, errors, DEFAULT_CANDIDATES, tie, parse_budget("3.0"))
    for a in [uniform(p, 2), promote_in_order(p, list(range(p.num_groups)), "h"), random_assignment(p, 0)]:
        assert p.total_bits(a.choice) <= p.budget_bits
    with pytest.raises(BudgetError):
        uniform(p, 4)
    opt = solve_ilp(p).objective
    assert all(opt <= a.objective + 1e-12 for a in [uniform(p, 2), random_assignment(p, 1)])


def test_random_assignment_is_deterministic_per_seed():
    names, shapes, errors, tie = random_instance(9)
    p = build_problem(names, shapes, errors, DEFAULT_CANDIDATES, tie, parse_budget("3.0"))
    assert np.array_equal(random_assignment(p, 4).choice, random_assignment(p, 4).choice)


def test_position_priority_follows_llama_cpp_rule():
    tiers = position_priority([0, 0, 2, 3, 4, 7], ["attn_v", "attn_q", "mlp_down", "attn_q", "attn_q", "attn_q"], 8)
    # layer 0 (first eighth) attn_v first; edge layers next; other v/down next; middle rest last
    assert tiers == [0, 1, 2, 3, 3, 1]


def test_candidates_sorted_cheapest_first():
    names, shapes, errors, tie = random_instance(2)
    cands = [Candidate(bits=b, group_size=128) for b in (8, 2, 4, 3)]
    p = build_problem(names, shapes, errors[:, [3, 0, 2, 1]], cands, tie, parse_budget("3.0"))
    assert [c.bits for c in p.candidates] == [2, 3, 4, 8]
    ref = build_problem(names, shapes, errors, DEFAULT_CANDIDATES, tie, parse_budget("3.0"))
    assert np.allclose(p.cost, ref.cost)
