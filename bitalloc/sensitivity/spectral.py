"""Spectral family (BitsMoE): how the unit's energy is spread over singular directions.

For the activation-weighted weight M = W H^(1/2) / sqrt(T) (whose squared singular values sum to
the unit's mean output energy per token):

    energy      E = sum_k sigma_k(M)^2 = tr(W H W^T) / T
    rank-k      share of E in the top ceil(k_frac * rank) singular values (k_frac = TOP_FRACTION)
    eff. rank   exp(entropy of sigma_k^2 / E)
    rank slabs  E split over consecutive RANK_SLAB singular values: the energy of each spectral
                unit, the quantity BitsMoE's spectral-unit ILP allocates over

The per-candidate error is ``spectral = E * ||dW_c||^2 / ||W||^2``: the unit's output energy
times the candidate's relative noise (``base.scaled_noise``). E is the trace above, summed in fp64
from one fp32 product W H; the spectra (statistics and rank slabs: diagnostics the allocator does
not read) come from eigenvalues of the smaller Gram matrix in fp32, O(min(out, in)^3) per unit.
Why fp32 there: the fp64 eigenvalue problems were the family's whole cost (37 s of an 8B-shaped pass)
while fp32 gives each eigenvalue to about 1e-6 of the largest, far inside what shares and effective
ranks are read to; the score itself does not depend on them. The spectrum of W alone (without its
inputs) is no longer computed: nothing read it, and it was half the eigenvalue work.
"""

from __future__ import annotations

import numpy as np
import torch

from ..plan import RANK_SLAB
from .base import FamilyOutput, UnitContext, scaled_noise, singular_energies, spectrum_stats

PREDICTORS = {"spectral": "E * ||dW||^2 / ||W||^2, E = sum of squared singular values of W H^(1/2) / sqrt(T)"}
TOP_FRACTION = 0.125
DAMP = 1e-6  # relative diagonal damping of H before its Cholesky factorisation


def top_k(rank: int) -> int:
    return max(1, int(np.ceil(TOP_FRACTION * rank)))


def activation_energies(ctx: UnitContext) -> tuple[float, np.ndarray]:
    """(E, squared singular values of W H^(1/2) / sqrt(T)); E exactly as their sum, without them.

    out <= in: eigenvalues of W (H / T) W^T. Otherwise of L^T W^T W L with L L^T = H / T (Cholesky,
    damped by DAMP of the mean diagonal; an eigendecomposition of H if even that fails). An
    embedding uses its rows scaled by sqrt(lookup share).
    """
    w = ctx.w.float()
    if ctx.h is None:
        scaled = w * (ctx.row_weights.float() / ctx.tokens).sqrt()[:, None]
        return float(scaled.double().pow(2).sum()), singular_energies(scaled, torch.float32)
    h = ctx.h.float() / ctx.tokens
    wh = w @ h
    energy = float((wh * w).double().sum())
    if w.shape[0] <= w.shape[1]:
        return energy, np.clip(torch.linalg.eigvalsh(wh @ w.T).flip(0).double().cpu().numpy(), 0, None)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    factor, info = torch.linalg.cholesky_ex(h + DAMP * h.diagonal().mean().clamp_min(1e-30) * eye)
    if int(info) != 0:
        evals, evecs = torch.linalg.eigh(h)
        factor = evecs * evals.clamp_min(0).sqrt()
    return energy, singular_energies(w @ factor, torch.float32)


def predict(ctx: UnitContext) -> FamilyOutput:
    if ctx.tokens == 0:
        return FamilyOutput({"spectral": np.zeros((ctx.n_slabs, len(ctx.candidates)))})
    energy, sq = activation_energies(ctx)
    stats = spectrum_stats(sq, "spectral_act", top_k(len(sq)))
    n = -(-len(sq) // RANK_SLAB)
    slabs = np.pad(sq, (0, n * RANK_SLAB - len(sq))).reshape(n, RANK_SLAB).sum(1)
    return FamilyOutput({"spectral": scaled_noise(ctx, energy)}, stats, {"rank_slab_energy": slabs})
