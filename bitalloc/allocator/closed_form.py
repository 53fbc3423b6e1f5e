"""BAQ's closed form: water-filling of bits under the high-resolution loss model.

Loss model per group: e_g(b) = c_g * n_g * 2^(-2b) (n_g parameters, b code bits). Minimising
sum_g e_g(b_g) subject to sum_g n_g b_g = B (code bits; scale/zero overhead is fixed for a given
group size) and b_min <= b_g <= b_max gives, from the Lagrangian stationarity condition
2 ln2 * c_g * 2^(-2 b_g) = lambda, the closed form

    b_g = clip(mu + 1/2 log2 c_g, b_min, b_max),

which without clipping is b_g = B/N + 1/2 log2(c_g / GM(c)) (GM: parameter-weighted geometric
mean). The water level mu is found by bisection. Equal-loss structure: every group strictly
inside [b_min, b_max] ends with the same loss per parameter, c_g 2^(-2 b_g) = lambda / (2 ln2).

c_g is fitted per group from its error table, log(e_gc) = log(c_g n_g) - 2 ln2 * bits_c in the
least-squares sense. Integerization re-solves the discrete candidate set under the same model
by Lagrangian relaxation and repair (``lagrangian.py``), which meets the budget exactly; the
model's duality gap is reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from .lagrangian import solve_lagrangian
from .problem import Assignment, Problem

LN2 = math.log(2.0)
_BISECT_ITERS = 64  # the bracket is < 100 bits wide: 64 halvings leave < 1e-17 bits


@dataclass(frozen=True)
class WaterFill:
    bits: np.ndarray  # continuous code bits per group
    mu: float  # water level: b = clip(mu + 1/2 log2 c)
    objective: float  # sum c n 2^(-2b)


def fit_sensitivity(problem: Problem) -> np.ndarray:
    """c_g from the error table: mean over candidates with positive error of log(e) + 2 ln2 b - log n."""
    b = np.array([c.bits for c in problem.candidates], dtype=np.float64)
    cost = np.where(problem.cost > 0, problem.cost, np.nan)
    with np.errstate(all="ignore"):
        logc = np.nanmean(np.log(cost) + 2 * LN2 * b[None, :], axis=1) - np.log(problem.numel)
    return np.exp(np.nan_to_num(logc, nan=-np.inf))


def water_fill(c: np.ndarray, n: np.ndarray, code_bits: float, b_min: float, b_max: float) -> WaterFill:
    """Continuous optimum of sum c n 2^(-2b) s.t. sum n b = code_bits, b in [b_min, b_max]."""
    n = n.astype(np.float64)
    total = float(n.sum())
    target = min(max(code_bits, b_min * total), b_max * total)
    a = np.where(c > 0, 0.5 * np.log2(np.where(c > 0, c, 1.0)), -np.inf)
    lo = b_min - float(a[np.isfinite(a)].max(initial=0.0)) - 1.0
    hi = b_max - float(a[np.isfinite(a)].min(initial=0.0)) + 1.0
    for _ in range(_BISECT_ITERS):
        mu = 0.5 * (lo + hi)
        used = float(n @ np.clip(mu + a, b_min, b_max))
        lo, hi = (mu, hi) if used < target else (lo, mu)
    bits = np.clip(0.5 * (lo + hi) + a, b_min, b_max)
    return WaterFill(bits, 0.5 * (lo + hi), float((c * n * 2.0 ** (-2 * bits)).sum()))


def continuous_optimum(problem: Problem, c: np.ndarray) -> WaterFill:
    """Water-filling for the problem's budget; overhead bits are those of the cheapest candidate's group size."""
    b = np.array([cand.bits for cand in problem.candidates], dtype=np.float64)
    overhead = problem.bits[:, 0] - problem.numel * int(b[0])
    code_bits = problem.budget_bits - float(overhead.sum())
    return water_fill(c, problem.numel, code_bits, float(b.min()), float(b.max()))


def solve_closed_form(problem: Problem) -> Assignment:
    """Water-filling on fitted c_g, then exact-budget integerization on the candidate set."""
    t0 = time.perf_counter()
    c = fit_sensitivity(problem)
    b = np.array([cand.bits for cand in problem.candidates], dtype=np.float64)
    modelled = replace(problem, cost=c[:, None] * problem.numel[:, None] * 2.0 ** (-2 * b[None, :]))
    cont = continuous_optimum(problem, c)
    a = solve_lagrangian(modelled)
    note = (f"continuous optimum: mean {float(problem.numel @ cont.bits) / problem.counted_params:.3f} code bits, "
            f"model loss {cont.objective:.6g}; integer model loss {a.objective:.6g}, model duality gap {a.gap:.2e}")
    return Assignment(a.choice, "closed-form", "feasible", problem.objective(a.choice), bound=None,
                      seconds=time.perf_counter() - t0, note=note)
