"""GPTQ (Frantar et al. 2022): column-by-column rounding with error compensation through H^-1.

Columns are quantized left to right; each column's rounding error is spread over the columns
not yet quantized along the row of the upper Cholesky factor U of H^-1 (H = X^T X of the
layer's inputs), which minimises the output error tr(dW H dW^T) greedily. Work is organised in
blocks of ``block`` columns ("lazy batch" updates): inside a block the error is propagated
column by column within the block only, and the block's accumulated error reaches all later
columns in one matrix product, so the O(out * in^2) update runs as large GEMMs; the Python loop
is over the columns of one block. All rows are processed at once, so tensors that share H
(q/k/v, gate/up) can be stacked along rows and quantized in one call (the driver does this).

Damping: H += damp * mean(diag H) * I before factorising (damp = 0.01, the GPTQ default), which
keeps H^-1 well conditioned when calibration tokens are few or inputs nearly collinear; should
the factorisation still fail, damping is multiplied by 10 until it succeeds. Dead inputs
(H_jj = 0: an input that was always zero) get H_jj = 1 and weight 0, since any value is free.

Groups: by default (scale, zero) of a group are taken from the already-updated weights when the
group starts, as in the reference implementation. With ``act_order`` columns are processed in
order of decreasing H_jj (the most sensitive first, while the most freedom to compensate
remains) and groups are "static": their parameters are computed from the original weights in
the original column order before permuting, so a group's columns, scattered through the
permuted order, still share one (scale, zero) and the stored layout stays plain.

Besides the weight, :func:`gptq_with_losses` returns the loss each column contributed,
L_j = 1/2 ||w_:j - q_:j||^2 / U_jj^2, which is BAQ's per-column sensitivity. Cost: O(in^3) for
the factorisation plus O(out * in^2).
"""

from __future__ import annotations

import torch

from .base import QuantizedWeight
from .rtn import group_view, rtn_codes, rtn_params

DAMP = 0.01  # relative damping of H's diagonal, the GPTQ default
BLOCK = 128  # columns per lazy update


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
         act_order: bool = False, damp: float = DAMP, block: int = BLOCK) -> QuantizedWeight:
    """GPTQ codes of a [out, in] weight given its inputs' H [in, in] (any positive scaling of H)."""
    return gptq_with_losses(w, h, bits, group_size, symmetric, act_order, damp, block)[0]


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight [out, in], per-column loss [in]) with the defaults; the sensitivity pass's entry."""
    q, losses = gptq_with_losses(w, h, bits, group_size, symmetric)
    return q.dequantize(), losses


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; ``h`` must have no zero diagonal."""
    eye = torch.eye(h.shape[0], device=h.device)
    mean = torch.diag(h).mean()
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        damp *= 10
    raise torch.linalg.LinAlgError("H is not positive definite even with damping 1e5 x the default")


def gptq_with_losses(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                     act_order: bool = False, damp: float = DAMP,
                     block: int = BLOCK) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ codes and the per-column losses L_j (in the original column order)."""
    w = w.float().clone()
    h = h.float().clone()
    rows, cols = w.shape
    n_groups = -(-cols // group_size)
    dead = torch.diag(h) == 0  # inputs that were always zero: any value is free
    h[dead, dead] = 1
    w[:, dead] = 0
    scale = torch.zeros(rows, n_groups, device=w.device)
    zero = torch.zeros(rows, n_groups, device=w.device)
    col_group = torch.arange(cols, device=w.device) // group_size
    perm = None
    if act_order:  # static groups: parameters from the original weights, before permuting
        s, z = rtn_params(group_view(w, group_size), bits, symmetric)
        scale, zero = s[..., 0], z[..., 0]
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h, col_group = w[:, perm], h[perm][:, perm], col_group[perm]
    u = inverse_cholesky(h, damp)
    codes = torch.zeros_like(w)
    losses = torch.zeros(cols, device=w.device)
    for a in range(0, cols, block):
        b = min(a + block, cols)
        wb, errb = w[:, a:b].clone(), torch.zeros_like(w[:, a:b])
        for i in range(b - a):
            j = a + i
            g = col_group[j]
            if perm is None and j % group_size == 0:  # dynamic group: from the updated weights
                s, z = rtn_params(torch.cat([wb[:, i:], w[:, b:]], dim=1)[:, :group_size], bits, symmetric)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g:g + 1], zero[:, g:g + 1]
            c = rtn_codes(wb[:, i:i + 1], s, z, bits)
            q = ((c - z) * s)[:, 0]
            err = (wb[:, i] - q) / u[j, j]
            wb[:, i:] -= err[:, None] * u[j, j:b][None]
            errb[:, i] = err
            codes[:, j] = c[:, 0]
        losses[a:b] = 0.5 * errb.pow(2).sum(0)  # L_j = 1/2 ||w_j - q_j||^2 / U_jj^2
        w[:, b:] -= errb @ u[a:b, b:]
    if perm is not None:
        inv = torch.argsort(perm)
        codes, losses = codes[:, inv], losses[inv]
    return QuantizedWeight(codes.to(torch.uint8), scale, zero, bits, group_size, symmetric), losses
