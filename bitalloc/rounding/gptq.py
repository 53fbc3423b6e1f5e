"""GPTQ (Frantar et al. 2022): column-by-column rounding with error compensation through H^-1.

Columns are quantized left to right; each column's rounding error is spread over the columns
not yet quantized along the row of the upper Cholesky factor U of H^-1 (H = X^T X of the
layer's inputs), which minimises the output error tr(dW H dW^T) greedily. Work is organised in
blocks of ``block`` columns ("lazy batch" updates): inside a block the error is propagated
column by column within the block only, and the block's accumulated error reaches all later
columns in one matrix product, so the O(out * in^2) update runs as large GEMMs; the loop is over
the columns of one block. In torch that loop is ~13 tiny ops per column, launch-bound on a GPU;
on CUDA it runs as one fused Triton kernel per block where the kernel applies (``block_path``:
dynamic groups inside blocks, or act_order), with results equal to the torch loop, which
stays the reference and the path for CPU and the other configurations. All rows are processed
at once, so tensors that share H (q/k/v, gate/up) can be stacked along rows and quantized in one
call (the driver does this).

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

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from .base import QuantizedWeight
from .rtn import FP16_TINY, group_view, rtn_codes, rtn_params

DAMP = 0.01  # relative damping of H's diagonal, the GPTQ default
BLOCK = 128  # columns per lazy update
LoopPath = Literal["torch", "triton"]  # where a block's column loop runs (:func:`block_path`)


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
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, row-major (the block steps read its
    rows); ``h`` must have no zero diagonal."""
    eye = torch.eye(h.shape[0], device=h.device)
    mean = torch.diag(h).mean()
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).contiguous()
        damp *= 10
    raise torch.linalg.LinAlgError("H is not positive definite even with damping 1e5 x the default")


def block_path(device: torch.device, group_size: int, act_order: bool, block: int = BLOCK) -> LoopPath:
    """Where the per-column loop of a block runs: ``"triton"`` (the fused kernel) for CUDA tensors
    when Triton is importable and the kernel computes the configuration (its dynamic groups must
    lie inside blocks, see ``kernels.triton_gptq.supports``), else ``"torch"``. Both give equal
    results; the kernel only removes the launch-bound Python loop."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return "torch"
    from ..kernels import triton_gptq

    return "triton" if triton_gptq.supports(block, group_size, static_groups=act_order) else "torch"


def gptq_with_losses(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                     act_order: bool = False, damp: float = DAMP,
                     block: int = BLOCK) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ codes and the per-column losses L_j (in the original column order), on :func:`block_path`."""
    path = block_path(w.device, group_size, act_order, block)
    return gptq_with_losses_on(path, w, h, bits, group_size, symmetric, act_order, damp, block)


def gptq_with_losses_on(path: LoopPath, w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
                        symmetric: bool = False, act_order: bool = False, damp: float = DAMP,
                        block: int = BLOCK) -> tuple[QuantizedWeight, torch.Tensor]:
    """:func:`gptq_with_losses` with the block loop on ``path`` (tests and benchmarks compare the two)."""
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
    state = Columns(w, inverse_cholesky(h, damp), torch.zeros_like(w), scale, zero, col_group, bits, group_size,
                    symmetric, act_order)
    step = block_step_triton if path == "triton" else block_step_torch
    losses = torch.zeros(cols, device=w.device)
    for a in range(0, cols, block):
        b = min(a + block, cols)
        errb = step(state, a, b)
        losses[a:b] = 0.5 * errb.pow(2).sum(0)  # L_j = 1/2 ||w_j - q_j||^2 / U_jj^2
        w[:, b:] -= errb @ state.u[a:b, b:]
    codes = state.codes
    if perm is not None:
        inv = torch.argsort(perm)
        codes, losses = codes[:, inv], losses[inv]
    return QuantizedWeight(codes.to(torch.uint8), scale, zero, bits, group_size, symmetric), losses


@dataclass(frozen=True)
class Columns:
    """What a block step reads and writes: the weights (updated block by block, permuted under
    act_order), U, the codes, the groups' (scale, zero) and each column's group."""

    w: torch.Tensor
    u: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    col_group: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    static_groups: bool


def block_step_torch(c: Columns, a: int, b: int) -> torch.Tensor:
    """Quantize columns a:b, spreading each column's error over the rest of the block; returns
    the errors / U_jj [rows, b - a]. The reference: any group layout, a few torch ops per column."""
    w, u = c.w, c.u
    wb, errb = w[:, a:b].clone(), torch.zeros_like(w[:, a:b])
    for i in range(b - a):
        j = a + i
        g = c.col_group[j]
        if not c.static_groups and j % c.group_size == 0:  # dynamic group: from the updated weights
            s, z = rtn_params(torch.cat([wb[:, i:], w[:, b:]], dim=1)[:, :c.group_size], c.bits, c.symmetric)
            c.scale[:, g], c.zero[:, g] = s[:, 0], z[:, 0]
        s, z = c.scale[:, g:g + 1], c.zero[:, g:g + 1]
        q = rtn_codes(wb[:, i:i + 1], s, z, c.bits)
        err = (wb[:, i] - ((q - z) * s)[:, 0]) / u[j, j]
        wb[:, i:] -= err[:, None] * u[j, j:b][None]
        errb[:, i] = err
        c.codes[:, j] = q[:, 0]
    return errb


def block_step_triton(c: Columns, a: int, b: int) -> torch.Tensor:
    """:func:`block_step_torch` in one launch of the fused kernel (equal results, see its module)."""
    from ..kernels import triton_gptq

    errb = torch.empty(c.w.shape[0], b - a, device=c.w.device)
    triton_gptq.quantize_block(c.w, c.u, c.codes, errb, c.scale, c.zero, c.col_group, a, b, bits=c.bits,
                               group_size=c.group_size, symmetric=c.symmetric, static_groups=c.static_groups,
                               scale_floor=FP16_TINY)
    return errb

