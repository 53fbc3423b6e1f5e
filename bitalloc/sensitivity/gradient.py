"""Gradient family (DiscQuant / OBD): the calibration loss's own gradients w.r.t. each unit.

Per calibration sequence s, g_s is the gradient of its mean next-token loss l_s with respect to
the unit's weight (exact per sequence: ``model.hooks.SampleGrads`` takes each sequence's own from a batched
backward pass). With
n_pred = seqlen - 1 predicted tokens per sequence, per-token Fisher information is about n_pred
times the second moment of the per-sequence gradients, so the second-order expansion of the
calibration loss L = mean_s l_s around the fp weights predicts

    fisher:    (n_pred / 2) sum F * dW^2,  F = mean_s g_s^2           (diagonal Fisher; OBD / SqueezeLLM)
    gradient:  [gbar . dW]_2se + (n_pred / 2) mean_s (g_s . dW)^2      (Taylor with the full empirical
                                                                        Fisher of the unit; gbar = mean_s g_s)

where [t]_2se = sign(t) max(|t| - 2 se(t), 0) soft-thresholds the first-order term at two standard
errors of its mean over sequences (``shrink_factor``): at a trained model gbar is mostly sampling
noise (on the reference models only 4-7% of units have a significant one), and unthresholded it
made a few MoE experts look free at 2 bits.

The full form keeps the correlations between a unit's weights that the diagonal drops, at the
cost of one dot product per sequence and candidate. Its slab split: the first-order term is
split like gbar . dW per slab, the second-order total is shared in proportion to mean_s (g_s . dW restricted to
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

from .base import FamilyOutput, UnitContext, per_candidate, singular_energies, spectrum_stats

PREDICTORS = {
    "fisher": "(seqlen-1)/2 * sum F dW^2, F = mean over sequences of the squared per-sequence gradient",
    "gradient": "[gbar.dW]_2se + (seqlen-1)/2 * mean_s (g_s.dW)^2 (second-order Taylor, full empirical Fisher; "
                "first-order term soft-thresholded at 2 standard errors)",
}
SIGNIFICANCE = 2.0  # standard errors the first-order term must exceed to be kept (soft threshold)
SKETCH_SIDE = 12
GRAD_TOP_K = 4


class Sketch:
    """Tensor random projection of [out, in] matrices to SKETCH_SIDE^2 numbers (seeded, reproducible)."""

    def __init__(self, shape: tuple[int, int], seed: int, device: torch.device, side: int = SKETCH_SIDE):
        gen = torch.Generator().manual_seed(seed)
        self.a = (torch.randn(shape[0], side, generator=gen) / side**0.5).to(device)
        self.b = (torch.randn(shape[1], side, generator=gen) / side**0.5).to(device)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """[..., out, in] -> [..., SKETCH_SIDE^2]: one sketch per matrix."""
        return torch.matmul(self.a.T, torch.matmul(g, self.b)).flatten(-2)


def shrink_factor(per_seq: np.ndarray) -> np.ndarray:
    """[C] factor that soft-thresholds the first-order term gbar.dW at SIGNIFICANCE standard errors.

    ``per_seq`` [n_seq, C] holds g_s . dW_c, whose mean is gbar.dW and whose spread gives its standard
    error. An insignificant mean gradient is sampling noise, and a minimiser would exploit its
    negative draws (a unit predicted to *gain* from 2 bits); the threshold keeps only the part of the
    term that the data supports.
    """
    n = per_seq.shape[0]
    t = per_seq.mean(0)
    se = per_seq.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full_like(t, np.inf)
    kept = np.sign(t) * np.maximum(np.abs(t) - SIGNIFICANCE * se, 0.0)
    return np.where(t != 0, kept / np.where(t != 0, t, 1.0), 0.0)


def predict(ctx: UnitContext) -> FamilyOutput:
    n_pred, f, gbar = ctx.n_pred, ctx.fisher, ctx.grad_mean
    fisher = per_candidate(ctx, lambda dw: (f * dw.pow(2)).sum(0)) * (0.5 * n_pred)
    linear = per_candidate(ctx, lambda dw: (gbar * dw).sum(0))
    dots = ctx.dots.double().cpu().numpy()  # [n_seq, C, S]
    linear *= shrink_factor(dots.sum(2))[None]
    quad_total = 0.5 * n_pred * (dots.sum(2) ** 2).mean(0)  # [C]
    share = (dots**2).mean(0).T  # [S, C]
    norm = share.sum(0, keepdims=True)
    share = np.where(norm > 0, share / np.where(norm > 0, norm, 1), 1.0 / share.shape[0])
    taylor = linear + share * quad_total[None]
    totals = taylor.sum(0, keepdims=True)
    taylor = np.where(totals > 0, taylor, 0.0)
    stats = spectrum_stats(singular_energies(ctx.sketch), "grad", GRAD_TOP_K)
    return FamilyOutput({"fisher": fisher, "gradient": taylor}, stats)
