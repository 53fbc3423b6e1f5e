"""GPTQ (Frantar et al. 2022): column-by-column rounding with error compensation through H^-1.

Columns are quantized left to right; each column's rounding error is spread over the columns
not yet quantized along the row of the upper Cholesky factor U of H^-1 (H = X^T X of the
layer's inputs, damped by 1% of its mean diagonal), which minimises the output error
tr(dW H dW^T) greedily. Group (scale, zero) are taken from the already-updated weights when a
group starts, as in the reference implementation. Besides the weight, it returns the loss
each column contributed, L_j = 1/2 ||w_:j - q_:j||^2 / U_jj^2, which is BAQ's per-column
sensitivity. Cost: O(in^3) for the factorisation plus O(out * in^2).
"""

from __future__ import annotations

import torch

from .rtn import rtn_params, rtn_round

DAMP = 0.01  # relative damping of H's diagonal, the GPTQ default
BLOCK = 128  # columns per lazy update


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight [out, in], per-column loss [in]) for a [out, in] weight and its H [in, in]."""
    w = w.float().clone()
    h = h.float().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs that were always zero: any value is free
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * torch.diag(h).mean() * torch.eye(cols, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros_like(w)
    losses = torch.zeros(cols, device=w.device)
    scale = zero = None
    for a in range(0, cols, BLOCK):
        b = min(a + BLOCK, cols)
        wb, errb = w[:, a:b].clone(), torch.zeros_like(w[:, a:b])
        for i in range(b - a):
            j = a + i
            if j % group_size == 0:
                group = torch.cat([wb[:, i:], w[:, b:]], dim=1)[:, :group_size]
                scale, zero = rtn_params(group, bits, symmetric)
            q = rtn_round(wb[:, i:i + 1], scale, zero, bits)[:, 0]
            err = (wb[:, i] - q) / u[j, j]
            wb[:, i:] -= err[:, None] * u[j, j:b][None]
            errb[:, i] = err
            q_all[:, j] = q
        losses[a:b] = 0.5 * errb.pow(2).sum(0)  # L_j = 1/2 ||w_j - q_j||^2 / U_jj^2
        w[:, b:] -= errb @ u[a:b, b:]
    return q_all, losses
