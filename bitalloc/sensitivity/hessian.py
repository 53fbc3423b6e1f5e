"""Hessian family (GPTQ / BAQ): the unit's own output error under its calibration inputs.

With H = sum_t x_t x_t^T over the T tokens that reach the unit, quantizing W to W + dW changes
the unit's outputs by a mean squared error per token of

    hessian:       tr(dW H dW^T) / T                          (exact for the unit's output)
    hessian_diag:  sum_j H_jj ||dW_:j||^2 / T                 (drops input correlations; HAWQ-like)
    baq:           sum_j c_j 2^(-2 b),  c_j = L_j(b_ref) 2^(2 b_ref)

where L_j(b_ref) is the loss GPTQ attributes to input column j when it quantizes the unit at the
lowest candidate width b_ref with error compensation (``rounding.gptq``), and the 2^(-2b) law is
BAQ's high-resolution model; c_j are the per-column sensitivities the closed-form allocator
water-fills over (slab granularity). All three are layer-local: they do not know how much the
unit's output matters to the loss, which is why they rank units across layers poorly (see
docs/sensitivity.md). Cost: one [out, in] x [in, in] product per candidate, and one GPTQ sweep,
O(out * in^2), per unit. An embedding (a lookup, no input matrix) uses its row lookup counts as
a diagonal H over rows, and GPTQ does not apply to it (baq = hessian_diag there).
"""

from __future__ import annotations

import numpy as np

from ..rounding.gptq import gptq_quantize
from .base import FamilyOutput, UnitContext, per_candidate, slab_sums

PREDICTORS = {
    "hessian": "tr(dW H dW^T) / tokens, H = sum of x x^T of the unit's inputs (layer-local output MSE)",
    "hessian_diag": "sum_j H_jj ||dW_:j||^2 / tokens (diagonal proxy)",
    "baq": "sum_j c_j 2^(-2b), c_j = GPTQ column loss at the lowest width b_ref times 2^(2 b_ref) (BAQ)",
}


def predict(ctx: UnitContext) -> FamilyOutput:
    n_cand = len(ctx.candidates)
    if ctx.tokens == 0:  # an expert no calibration token reached: filled from its peers later
        zeros = np.zeros((ctx.n_slabs, n_cand))
        return FamilyOutput({name: zeros for name in PREDICTORS})
    if ctx.h is None:  # embedding: diagonal H over rows
        rw = ctx.row_weights[:, None]
        exact = per_candidate(ctx, lambda dw: (rw * dw.pow(2)).sum(0)) / ctx.tokens
        return FamilyOutput({"hessian": exact, "hessian_diag": exact, "baq": exact})
    h = ctx.h
    full = per_candidate(ctx, lambda dw: (dw * (dw @ h)).sum(0)) / ctx.tokens
    h_jj = h.diagonal()
    diag = per_candidate(ctx, lambda dw: h_jj * dw.pow(2).sum(0)) / ctx.tokens
    ref = min(range(n_cand), key=lambda k: ctx.candidates[k].bits)
    c_ref = ctx.candidates[ref]
    _, col_loss = gptq_quantize(ctx.w, h / ctx.tokens, c_ref.bits, c_ref.group_size, c_ref.symmetric)
    c_slab = slab_sums(col_loss) * 4.0 ** c_ref.bits
    baq = np.stack([c_slab * 4.0 ** -c.bits for c in ctx.candidates], axis=1)
    return FamilyOutput({"hessian": full, "hessian_diag": diag, "baq": baq})

