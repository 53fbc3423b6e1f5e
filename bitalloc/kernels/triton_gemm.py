"""Small-batch GEMM on the tensor cores (``tl.dot``) and the dequantize kernel for large M.

GEMM: a program owns a ``BLOCK_M x BLOCK_N`` output tile and walks K in steps of
``STEP = min(group, 16 * codes per word)`` inputs, so a step lies in one group and one plane:
one word load per row and column, one shift/AND/OR + FADD per code gives ``q - zero`` exactly,
cast to the activation dtype (exact: |q - zero| <= 255), ``tl.dot`` accumulates in fp32, and the
group's scale multiplies the fp32 partial once per group (not each weight).

Dequantize: writes the fp16/bf16 weight for a cuBLAS matmul, the path above the dispatcher's
``GEMM_MAX_M``, meant for batches large enough that decoding once beats decoding per M tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import COLS, KernelWeight
from .triton_decode import load_plane


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, sz_ptr, y_ptr, M, N, K, n_tiles, stride_xm, stride_ym, stride_qw,
                 stride_sz, M_BUCKET, BITS: tl.constexpr, GROUP: tl.constexpr,
                 VWORDS: tl.constexpr, CPW: tl.constexpr, SPACING: tl.constexpr,
                 CODE_BITS: tl.constexpr, COLS: tl.constexpr, TILE: tl.constexpr,
                 STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    NS: tl.constexpr = STEP // COLS
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n1 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = n1[:, None, None]
    i3 = tl.arange(0, NS)[None, :, None]
    w_ptrs = qw_ptr + n3 * stride_qw + tl.arange(0, COLS)[None, None, :]
    sz3 = sz_ptr + n3 * stride_sz
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, STEP)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(n_tiles):
        tile_ptrs = w_ptrs + t * (BITS * COLS)
        for j0 in tl.static_range(0, TILE // COLS, NS):  # first slice of the step
            g = (t * TILE + j0 * COLS) // GROUP
            w = load_plane(tile_ptrs, n3 < N, j0 // CPW, BITS, COLS)
            z = tl.load(sz3 + 2 * g + 1, mask=n3 < N, other=0.0).to(tl.float32)
            codes = (w >> ((j0 % CPW + i3) * SPACING)) & ((1 << CODE_BITS) - 1)
            # 0x4B000000 is the fp32 2**23: OR-ed over a code (< 2**23) it reads 2**23 + code
            q = (codes | 0x4B000000).to(tl.float32, bitcast=True) - (z + 8388608.0)
            b = tl.reshape(q.to(x_ptr.dtype.element_ty), (BLOCK_N, STEP))
            k0 = t * TILE + j0 * COLS
            xk = tl.load(x_ptrs + k0, mask=(offs_m[:, None] < M) & (k0 + kk[None, :] < K), other=0.0)
            part = tl.dot(xk, tl.trans(b), part)
            if ((j0 + NS) * COLS) % GROUP == 0:
                s = tl.load(sz_ptr + n1 * stride_sz + 2 * g, mask=n1 < N, other=0.0).to(tl.float32)
                acc += part * s[None, :]
                part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    rows = offs_m[:, None]
    cols = n1[None, :]
    tl.store(y_ptr + rows * stride_ym + cols, acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M) & (cols < N))


@triton.jit
def _dequant_kernel(qw_ptr, sz_ptr, w_ptr, N, K, stride_qw, stride_sz, stride_w,
                    BITS: tl.constexpr, GROUP: tl.constexpr, VWORDS: tl.constexpr,
                    CPW: tl.constexpr, SPACING: tl.constexpr, CODE_BITS: tl.constexpr,
                    COLS: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    n3 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None, None]
    i3 = tl.arange(0, CPW)[None, :, None]
    c3 = tl.arange(0, COLS)[None, None, :]
    ptrs = qw_ptr + n3 * stride_qw + t * (BITS * COLS) + c3
    for v in tl.static_range(VWORDS):
        w = load_plane(ptrs, n3 < N, v, BITS, COLS)
        codes = (w >> (i3 * SPACING)) & ((1 << CODE_BITS) - 1)
        k = t * TILE + (v * CPW + i3) * COLS + c3
        sz = sz_ptr + n3 * stride_sz + 2 * (k // GROUP)
        s = tl.load(sz, mask=n3 < N, other=0.0).to(tl.float32)
        z = tl.load(sz + 1, mask=n3 < N, other=0.0).to(tl.float32)
        tl.store(w_ptr + n3 * stride_w + k, ((codes.to(tl.float32) - z) * s).to(w_ptr.dtype.element_ty),
                 mask=(n3 < N) & (k < K))


# Shared memory grows with num_stages x the static steps of a tile (each step's loads get their own
# pipeline buffers): 2 stages fit up to BLOCK_M = 64, 1 stage at 128 (232 KB per block on H200).
# BLOCK_N = 32 doubles the programs of small-M calls (at N = 4096 BLOCK_N = 64 gives 64 programs
# for 132 SMs); it was added after the measured run in docs/kernels.md.
CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages)
           for bn, warps, stages in ((64, 4, 2), (128, 8, 2), (128, 8, 1), (256, 8, 1), (32, 4, 2))]
_autotuned = triton.autotune(CONFIGS, key=["N", "K", "M_BUCKET", "BITS", "GROUP"],
                             cache_results=True)(_gemm_kernel)


def block_m(m: int) -> int:
    """Rows per tile: the batch rounded up to a power of two, 16 (mma's minimum) to 128."""
    return min(max(16, triton.next_power_of_2(m)), 128)


def gemm(x: torch.Tensor, kw: KernelWeight, out: torch.Tensor, consts: dict[str, int],
         config: triton.Config | None = None, warmup: bool = False) -> torch.Tensor:
    """``out = x @ W.T`` on the tensor cores; ``x`` 2-D with unit stride along K.

    ``config`` and ``warmup`` as for ``triton_gemv.gemv``.
    """
    m = x.shape[0]
    bm = block_m(m)
    step = min(kw.group_size, consts["CPW"] * COLS)
    args = (x, kw.qweight, kw.scale_zero, out, m, kw.out_features, kw.in_features, kw.tiles,
            x.stride(0), out.stride(0), kw.qweight.stride(0), kw.scale_zero.stride(0), bm)
    kernel, meta = (_autotuned, {}) if config is None else (_gemm_kernel, config.all_kwargs())
    if warmup:
        kernel.warmup(*args, STEP=step, BLOCK_M=bm, **consts, **meta, grid=(1,))
        return out
    kernel[lambda m_: (triton.cdiv(kw.out_features, m_["BLOCK_N"]), triton.cdiv(m, bm))](
        *args, STEP=step, BLOCK_M=bm, **consts, **meta)
    return out


def dequantize(kw: KernelWeight, dtype: torch.dtype, consts: dict[str, int],
               warmup: bool = False) -> torch.Tensor:
    """The ``[out, in]`` weight in ``dtype``, decoded on the device."""
    w = torch.empty(kw.out_features, kw.in_features, dtype=dtype, device=kw.qweight.device)
    block_n = 32
    args = (kw.qweight, kw.scale_zero, w, kw.out_features, kw.in_features, kw.qweight.stride(0),
            kw.scale_zero.stride(0), w.stride(0))
    if warmup:
        _dequant_kernel.warmup(*args, BLOCK_N=block_n, **consts, num_warps=4, grid=(1,))
        return w
    _dequant_kernel[(triton.cdiv(kw.out_features, block_n), kw.tiles)](
        *args, BLOCK_N=block_n, **consts, num_warps=4)
    return w
