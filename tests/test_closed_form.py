"""BAQ closed form: water-filling against cvxpy, the equal-loss structure, and integerization."""

import math

import cvxpy as cp
import numpy as np
import pytest

from bitalloc.allocator import build_problem, fit_sensitivity, solve, solve_closed_form, water_fill
from bitalloc.budget import parse_budget
from bitalloc.plan import Candidate

LN2 = math.log(2)


def _cvxpy_water_fill(c, n, code_bits, b_min, b_max):
    """The same problem in cvxpy, written in log-loss variables y = log(c n / s) - 2 ln2 b (an affine
    change of variables that keeps every exponential term O(1), so the conic solver is accurate)."""
    w = c * n
    s = float((w * 2.0 ** (-2 * code_bits / n.sum())).sum())  # objective at uniform bits
    logw = np.log(w / s)
    y = cp.Variable(len(c))
    bits = (logw - y) / (2 * LN2)
    share = n / n.sum()
    prob = cp.Problem(cp.Minimize(cp.sum(cp.exp(y))),
                      [share @ bits == code_bits / n.sum(), bits >= b_min, bits <= b_max])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=500)
    assert prob.status == cp.OPTIMAL
    return (logw - y.value) / (2 * LN2), prob.value * s


@pytest.mark.parametrize("seed", range(10))
def test_water_filling_matches_cvxpy(seed):
    rng = np.random.default_rng(seed)
    g = int(rng.integers(5, 60))
    c = rng.lognormal(0, 2.5, g)  # sensitivities over several decades
    n = rng.choice([4096, 16384, 65536], g).astype(float)
    code_bits = float(n.sum() * rng.uniform(2.2, 7.5))
    wf = water_fill(c, n, code_bits, 2.0, 8.0)
    ref_b, ref_obj = _cvxpy_water_fill(c, n, code_bits, 2.0, 8.0)
    np.testing.assert_allclose(wf.bits, ref_b, atol=1e-4)
    assert wf.objective == pytest.approx(ref_obj, rel=1e-4)
    assert float(n @ wf.bits) == pytest.approx(code_bits, rel=1e-12)


def test_equal_loss_structure():
    rng = np.random.default_rng(1)
    c = rng.lognormal(0, 3, 200)
    n = np.full(200, 4096.0)
    wf = water_fill(c, n, 4.0 * n.sum(), 2.0, 8.0)
    loss_per_param = c * 2.0 ** (-2 * wf.bits)
    inside = (wf.bits > 2.0 + 1e-9) & (wf.bits < 8.0 - 1e-9)
    assert inside.sum() > 100 and (~inside).sum() > 0
    level = loss_per_param[inside]
    np.testing.assert_allclose(level, level[0], rtol=1e-9)  # every interior unit has the same loss
    at_min = wf.bits <= 2.0 + 1e-9
    assert np.all(loss_per_param[at_min] <= level[0])  # would rather give bits away
    at_max = wf.bits >= 8.0 - 1e-9
    assert np.all(loss_per_param[at_max] >= level[0])  # would rather take more


def test_unclipped_closed_form_is_the_log_ratio_to_the_geometric_mean():
    rng = np.random.default_rng(2)
    c = rng.lognormal(0, 0.5, 50)
    n = rng.choice([1.0, 2.0, 4.0], 50)
    wf = water_fill(c, n, 4.0 * n.sum(), -100.0, 100.0)
    gm = math.exp(float(n @ np.log(c)) / n.sum())  # parameter-weighted geometric mean
    np.testing.assert_allclose(wf.bits, 4.0 + 0.5 * np.log2(c / gm), atol=1e-9)


def _model_problem(seed, g=40, budget="3.5"):
    rng = np.random.default_rng(seed)
    cands = [Candidate(bits=b, group_size=128) for b in (2, 3, 4, 5, 6, 8)]
    shapes = [(int(rng.choice([256, 512])), 1024) for _ in range(g)]
    c = rng.lognormal(0, 2, g)
    n = np.array([r * k for r, k in shapes], float)
    errors = c[:, None] * n[:, None] * 2.0 ** (-2 * np.array([x.bits for x in cands], float))[None, :]
    return build_problem([f"u{i}" for i in range(g)], shapes, errors, cands, [], parse_budget(budget)), c


def test_fit_recovers_the_model_and_integerization_is_near_optimal():
    p, c = _model_problem(3)
    np.testing.assert_allclose(fit_sensitivity(p), c, rtol=1e-9)
    cf = solve_closed_form(p)
    exact = solve(p, "ilp")
    assert p.feasible(cf.choice) and cf.solver == "closed-form" and "gap" in cf.note
    assert exact.objective <= cf.objective <= exact.objective * 1.02
    assert p.total_bits(cf.choice) > 0.99 * p.budget_bits
