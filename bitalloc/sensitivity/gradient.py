"""Gradient family (DiscQuant / OBD): the calibration loss's own gradients w.r.t. each unit.

Per calibration sequence s, g_s is the gradient of its mean next-token loss l_s with respect to
the unit's weight (exact per sequence: the pass backpropagates one sequence at a time). With
n_pred = seqlen - 1 predicted tokens per sequence, per-token Fisher information is about n_pred
times the second moment of the per-sequence gradients, so the second-order expansion of the
calibration loss L = mean_s l_s around the fp weights predicts

    fisher:    (n_pred / 2) sum F * dW^2,  F = mean_s g_s^2           (diagonal Fisher; OBD / SqueezeLLM)
    gradient:  gbar . dW + (n_pred / 2) mean_s (g_s . dW)^2            (Taylor with the full empirical
                                                                        Fisher of the unit; gbar = mean_s g_s)

The full form keeps the correlations between a unit's weights that the diagonal drops, at the
cost of one dot product per sequence and candidate. Its slab split: the first-order term is
exact per slab, the second-order total is shared in proportion to mean_s (g_s . dW restricted to
the slab)^2. A negative total (possible through the first-order term) is clipped to 0.

Low-rank structure (DiscQuant's premise): the per-sequence gradients of a unit form an
[n_seq, numel] matrix G that is never held in memory; each g_s is sketched on arrival with a
tensor random projection y_s = vec(A^T g_s B) (A [out, SKETCH_SIDE], B [in, SKETCH_SIDE] Gaussian,
E ||y_s||^2 = ||g_s||^2), and the singular values of the [n_seq, SKETCH_SIDE^2] sketch estimate
G's: ``grad_eff_rank`` and ``grad_top_energy`` (share in the top GRAD_TOP_K directions).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import FamilyOutput, UnitContext, per_candidate, spectrum_stats
from .spectral import singular_energies

PREDICTORS = {
    "fisher": "(seqlen-1)/2 * sum F dW^2, F = mean over sequences of the squared per-sequence gradient",
    "gradient": "gbar.dW + (seqlen-1)/2 * mean_s (g_s.dW)^2 (second-order Taylor, full empirical Fisher)",
}
SKETCH_SIDE = 12
GRAD_TOP_K = 4


class Sketch:
    """Tensor random projection of [out, in] matrices to SKETCH_SIDE^2 numbers (seeded, reproducible)."""

    def __init__(self, shape: tuple[int, int], seed: int, device: torch.device, side: int = SKETCH_SIDE):
        gen = torch.Generator().manual_seed(seed)
        self.a = (torch.randn(shape[0], side, generator=gen) / side**0.5).to(device)
        self.b = (torch.randn(shape[1], side, generator=gen) / side**0.5).to(device)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        return (self.a.T @ (g @ self.b)).flatten()


def predict(ctx: UnitContext) -> FamilyOutput:
    n_pred, f, gbar = ctx.n_pred, ctx.fisher, ctx.grad_mean
    fisher = per_candidate(ctx, lambda dw: (f * dw.pow(2)).sum(0)) * (0.5 * n_pred)
    linear = per_candidate(ctx, lambda dw: (gbar * dw).sum(0))
    dots = ctx.dots.double().cpu().numpy()  # [n_seq, C, S]
    quad_total = 0.5 * n_pred * (dots.sum(2) ** 2).mean(0)  # [C]
    share = (dots**2).mean(0).T  # [S, C]
    norm = share.sum(0, keepdims=True)
    share = np.where(norm > 0, share / np.where(norm > 0, norm, 1), 1.0 / share.shape[0])
    taylor = linear + share * quad_total[None]
    totals = taylor.sum(0, keepdims=True)
    taylor = np.where(totals > 0, taylor, 0.0)
    stats = spectrum_stats(singular_energies(ctx.sketch), "grad", GRAD_TOP_K)
    return FamilyOutput({"fisher": fisher, "gradient": taylor}, stats)
