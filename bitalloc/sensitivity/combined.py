"""Combined: the families calibrated against measured truth on the model at hand, not hand-tuned.

After the calibration pass, the loss increase of quantizing a single unit is measured
(``truth.TruthRunner``) for a random sample of SAMPLE_UNITS units spread over the layers, at
the two narrowest candidates (where allocation decisions are made), on the first SAMPLE_SEQS
calibration sequences. A ridge least-squares fit of

    log truth = b + sum_k w_k log f_k,        f_k in FEATURES (each family's predicted error)

on standardised log features (ridge RIDGE on w) gives the combined prediction
exp(b + sum_k w_k log f_k) for every unit and candidate. The fit is refit for every model and
calibration text, so no constant is tuned to a particular checkpoint; its coefficients, sample
size and leave-one-out error are recorded in the score file's metadata. A unit's combined error
is split over its slabs in proportion to its ``fisher`` slab errors. Cost: 2 x SAMPLE_UNITS
partial forward passes over SAMPLE_SEQS sequences.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..model.inventory import Unit
from ..plan import Candidate

FEATURES = ("fisher", "gradient", "hessian", "spectral", "importance")
SAMPLE_UNITS = 16
SAMPLE_SEQS = 8
RIDGE = 1.0
MIN_SAMPLE = 6
FORMULA = "exp(b + sum_k w_k log f_k), (b, w) ridge-fitted on measured single-unit loss increases of a unit sample"


def sample_units(units: list[Unit], n: int, seed: int) -> list[int]:
    """Up to ``n`` indices of decoder-layer units, spread over the layers (round robin), seeded."""
    rng = np.random.default_rng(seed)
    by_layer: dict[int, list[int]] = {}
    for r, u in enumerate(units):
        if u.layer is not None:
            by_layer.setdefault(u.layer, []).append(r)
    queues = [list(rng.permutation(rows)) for _, rows in sorted(by_layer.items())]
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(int(q.pop()))
    return sorted(out)


def _logs(x: np.ndarray) -> np.ndarray:
    """log with a floor at 1e-6 of the median positive value (families can predict exact zeros)."""
    pos = x[x > 0]
    floor = 1e-6 * (np.median(pos) if len(pos) else 1.0)
    return np.log(np.maximum(x, floor))


def fit(features: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Ridge fit of target on features (both already in log space): (coef [K + 1] incl. intercept, LOO RMSE)."""
    mu, sd = features.mean(0), features.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    z = np.hstack([np.ones((len(target), 1)), (features - mu) / sd])
    reg = RIDGE * np.eye(z.shape[1])
    reg[0, 0] = 0.0
    a = z.T @ z + reg
    beta = np.linalg.solve(a, z.T @ target)
    hat = np.einsum("ij,ji->i", z, np.linalg.solve(a, z.T))
    loo = (target - z @ beta) / np.maximum(1 - hat, 1e-9)
    coef = np.concatenate([[beta[0] - (beta[1:] * mu / sd).sum()], beta[1:] / sd])
    return coef, float(np.sqrt(np.mean(loo**2)))


TruthOf = Callable[[list[tuple[Unit, Candidate]], Callable[[], None]], list[float]]


def calibrate(truth_of: TruthOf, units: list[Unit], candidates: list[Candidate], unit_errors: dict[str, np.ndarray],
              seed: int, advance: Callable[[], None]) -> tuple[np.ndarray, dict]:
    """([U, C] combined errors, metadata). ``unit_errors[name]`` is [U, C] for every name in FEATURES.

    ``truth_of(pairs, advance)`` measures the loss increase of each (unit, candidate) pair (all at
    once, so that a runner can share layer loads between them) and calls ``advance`` per pair.
    """
    narrow = sorted(range(len(candidates)), key=lambda j: candidates[j].bits)[:2]
    rows = sample_units(units, SAMPLE_UNITS, seed)
    pairs = [(r, j) for r in rows for j in narrow]
    logs = np.stack([_logs(unit_errors[k]) for k in FEATURES], axis=-1)  # [U, C, K]
    if len(pairs) < MIN_SAMPLE:
        return unit_errors["fisher"], {"note": f"only {len(rows)} units to sample; combined = fisher"}
    t = np.asarray(truth_of([(units[r], candidates[j]) for r, j in pairs], advance))
    pos = t[t > 0]
    target = np.log(np.maximum(t, 1e-3 * (np.median(pos) if len(pos) else 1.0)))
    coef, loo = fit(np.stack([logs[r, j] for r, j in pairs]), target)
    combined = np.exp(coef[0] + logs @ coef[1:])
    info = {"features": list(FEATURES), "intercept": float(coef[0]),
            "weights": dict(zip(FEATURES, map(float, coef[1:]))), "sample_units": len(rows),
            "sample_points": len(pairs), "loo_rmse_log": loo, "ridge": RIDGE}
    return combined, info
