"""Spectral family (BitsMoE): how the unit's energy is spread over singular directions.

For the weight W and for the activation-weighted weight M = W H^(1/2) / sqrt(T) (whose squared
singular values sum to the unit's mean output energy per token):

    energy      E = sum_k sigma_k(M)^2 = tr(W H W^T) / T
    rank-k      share of E in the top ceil(k_frac * rank) singular values (k_frac = TOP_FRACTION)
    eff. rank   exp(entropy of sigma_k^2 / E)
    rank slabs  E split over consecutive RANK_SLAB singular values: the energy of each spectral
                unit, the quantity BitsMoE's spectral-unit ILP allocates over

The per-candidate error is ``spectral = E * ||dW_c||^2 / ||W||^2``: the unit's output energy
times the candidate's relative noise (``base.scaled_noise``). Singular values come from the
eigenvalues of the smaller Gram matrix, O(min(out, in)^3) per unit.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import FamilyOutput, UnitContext, scaled_noise, spectrum_stats

PREDICTORS = {"spectral": "E * ||dW||^2 / ||W||^2, E = sum of squared singular values of W H^(1/2) / sqrt(T)"}
TOP_FRACTION = 0.125
RANK_SLAB = 64  # singular values per spectral unit (BitsMoE regroups ranks in slabs of 64)


def singular_energies(m: torch.Tensor) -> np.ndarray:
    """Squared singular values of ``m``, descending, from the eigenvalues of its smaller Gram matrix."""
    m = m.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return np.clip(torch.linalg.eigvalsh(gram).flip(0).cpu().numpy(), 0, None)


def top_k(rank: int) -> int:
    return max(1, int(np.ceil(TOP_FRACTION * rank)))


def activation_weighted(ctx: UnitContext) -> torch.Tensor:
    """W H^(1/2) / sqrt(T) (rows scaled by sqrt(lookup share) for an embedding), in float64.

    H^(1/2) comes from an eigendecomposition with negative round-off eigenvalues clipped, so
    rank-deficient H (an expert that saw few tokens) is fine.
    """
    if ctx.h is None:
        return ctx.w.double() * (ctx.row_weights.double() / ctx.tokens).sqrt()[:, None]
    evals, evecs = torch.linalg.eigh(ctx.h.double() / ctx.tokens)
    return ctx.w.double() @ (evecs * evals.clamp_min(0).sqrt())


def predict(ctx: UnitContext) -> FamilyOutput:
    stats = spectrum_stats(singular_energies(ctx.w), "spectral_w", top_k(min(ctx.w.shape)))
    if ctx.tokens == 0:
        return FamilyOutput({"spectral": np.zeros((ctx.n_slabs, len(ctx.candidates)))}, stats)
    sq = singular_energies(activation_weighted(ctx))
    stats.update(spectrum_stats(sq, "spectral_act", top_k(len(sq))))
    n = -(-len(sq) // RANK_SLAB)
    slabs = np.pad(sq, (0, n * RANK_SLAB - len(sq))).reshape(n, RANK_SLAB).sum(1)
    return FamilyOutput({"spectral": scaled_noise(ctx, float(sq.sum()))}, stats, {"rank_slab_energy": slabs})
