"""Pins, bit bounds and role ranges: resolution, refusal of contradictions, and solver respect."""

import numpy as np
import pytest

from bitalloc.allocator import Constraints, build_problem, solve
from bitalloc.budget import parse_budget
from bitalloc.errors import BudgetError, ConstraintError
from bitalloc.plan import DEFAULT_CANDIDATES

NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
         "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
ROLES = ["attn_q", "attn_k", "mlp_down", "mlp_down", "lm_head"]


def mask(**kw):
    return Constraints(**kw).allowed(NAMES, ROLES, DEFAULT_CANDIDATES)


def test_pins_fix_the_choice_and_win_over_bounds():
    m = mask(pins=("lm_head=8", r"layers\.0\..*down=4"), max_bits=3)
    assert m[4].tolist() == [False, False, False, True]
    assert m[2].tolist() == [False, False, True, False]
    assert m[3].tolist() == [True, True, False, False]  # max_bits 3 applies to the unpinned


def test_role_ranges_and_global_bounds_intersect():
    m = mask(role_bits=("mlp_down=3:8",), min_bits=4)
    assert m[2].tolist() == [False, False, True, True]
    assert m[0].tolist() == [False, False, True, True]


def test_per_layer_ranges_by_regex():
    m = mask(bits_ranges=(r"layers\.1\.=3:4", r"down_proj=2:3"))
    assert m[3].tolist() == [False, True, False, False]  # layer 1 down: [3,4] and [2,3]
    assert m[2].tolist() == [True, True, False, False]  # layer 0 down: [2,3]
    assert m[0].tolist() == [True, True, True, True]


@pytest.mark.parametrize("kw,needle", [
    (dict(pins=("q_proj=4", "self_attn=3")), "contradictory pins"),
    (dict(pins=("lm_head=5",)), "not among the candidates"),
    (dict(pins=("q_proj",)), "cannot parse pin"),
    (dict(pins=("(=4",)), "invalid regular expression"),
    (dict(min_bits=5, max_bits=4), "exceeds"),
    (dict(role_bits=("attn_q=5:6",)), "no candidate"),
    (dict(role_bits=("nonsense=2:4",)), "ROLE=LO:HI"),
    (dict(role_bits=("attn_q=6:2",)), "lower bound exceeds"),
    (dict(bits_ranges=(r"layers\.0\.=5:6",)), "no candidate"),
    (dict(bits_ranges=("4:8",)), "cannot parse bits range"),
])
def test_contradictions_are_refused(kw, needle):
    with pytest.raises(ConstraintError, match=needle):
        mask(**kw)


def test_unmatched_pin_is_refused():
    with pytest.raises(ConstraintError, match="matches no tensor"):
        Constraints(pins=("v_proj=4",)).check_all_pins_match(NAMES)


def _problem(constraints, budget="3.0", ties=()):
    rng = np.random.default_rng(0)
    shapes = [(256, 256)] * len(NAMES)
    errors = rng.lognormal(0, 1, (len(NAMES), 1)) * 4.0 ** -np.array([0, 1, 2, 6])[None, :]
    allowed = constraints.allowed(NAMES, ROLES, DEFAULT_CANDIDATES)
    return build_problem(NAMES, shapes, errors, DEFAULT_CANDIDATES, ties, parse_budget(budget), allowed)


def test_solvers_respect_pins_and_ties():
    c = Constraints(pins=("lm_head=8", "k_proj=2"))
    p = _problem(c, "4.0", ties=[NAMES[:2]])
    for name in ("ilp", "lagrangian", "greedy", "closed-form"):
        units = p.unit_choices(solve(p, name).choice)
        assert p.candidates[units[4]].bits == 8 and p.candidates[units[1]].bits == 2
        assert units[0] == units[1]  # q is tied to the pinned k


def test_pin_that_breaks_a_tie_group_is_refused():
    c = Constraints(pins=("q_proj=4", "k_proj=2"))
    with pytest.raises(ConstraintError, match="tie group"):
        _problem(c, ties=[NAMES[:2]])


def test_pins_over_budget_are_infeasible():
    with pytest.raises(BudgetError, match="below the cheapest"):
        _problem(Constraints(pins=(".*=8",)), "3.0")


def test_time_budget_is_respected():
    rng = np.random.default_rng(0)
    shapes = [(256, 256)] * 5
    errors = rng.lognormal(0, 1, (5, 1)) * 4.0 ** -np.array([0, 1, 2, 6])[None, :]
    free = build_problem(NAMES, shapes, errors, DEFAULT_CANDIDATES, [], parse_budget("5.0"))
    timed = build_problem(NAMES, shapes, errors, DEFAULT_CANDIDATES, [], parse_budget("5.0"),
                          time_per_param=[1.0, 1.0, 1.0, 3.0], time_budget=5 * 65536 * 1.2)
    a_free, a_timed = solve(free, "ilp"), solve(timed, "ilp")
    assert timed.total_time(a_free.choice) > timed.time_budget  # the constraint binds
    assert timed.feasible(a_timed.choice) and a_timed.status == "optimal"
    assert a_timed.objective >= a_free.objective
    with pytest.raises(ConstraintError, match="storage budget only"):
        solve(timed, "lagrangian")


def test_solutions_are_deterministic():
    p = _problem(Constraints(), "3.5")
    for name in ("ilp", "lagrangian", "closed-form", "greedy"):
        assert np.array_equal(solve(p, name, seed=3).choice, solve(p, name, seed=3).choice)
    with pytest.raises(ConstraintError, match="unknown solver"):
        solve(p, "simplex")
