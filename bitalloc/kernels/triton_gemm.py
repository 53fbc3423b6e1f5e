"""Small-batch GEMM on the tensor cores (``tl.dot``) and the dequantize kernel for large M.

GEMM: a program owns a ``BLOCK_M x BLOCK_N`` output tile and walks its share of K (split-K: with
``SPLIT_K`` > 1 the tiles of K are split among that many programs, so that small batches still fill
the GPU; the last to finish adds the fp32 partials in a fixed order) in steps of
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

from . import launch
from .launch import Launch
from .layout import COLS, KernelWeight
from .triton_decode import load_plane


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, sz_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, n_tiles, stride_xm,
                 stride_ym, stride_qw, stride_sz, M_BUCKET, BITS: tl.constexpr, GROUP: tl.constexpr,
                 VWORDS: tl.constexpr, CPW: tl.constexpr, SPACING: tl.constexpr,
                 CODE_BITS: tl.constexpr, COLS: tl.constexpr, TILE: tl.constexpr,
                 STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    NS: tl.constexpr = STEP // COLS
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
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
    for t in range(t_begin, t_end):
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
    ymask = (rows < M) & (cols < N)
    if SPLIT_K > 1:
        # Serial split-K: every split stores its fp32 partial, and the last of a tile to arrive (a
        # counter per tile, acq_rel) sums them in split order (deterministic) and resets the counter.
        tl.store(ws_ptr + (pid_k * M + rows) * N + cols, acc, mask=ymask)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        tile = pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k_split in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + (k_split * M + rows) * N + cols, mask=ymask, other=0.0,
                               cache_modifier=".cg")
            tl.store(y_ptr + rows * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        tl.store(y_ptr + rows * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _dequant_kernel(qw_ptr, sz_ptr, w_ptr, N, K, stride_qw, stride_sz, stride_w,
                    BITS: tl.constexpr, GROUP: tl.constexpr, VWORDS: tl.constexpr,
                    CPW: tl.constexpr, SPACING: tl.constexpr, CODE_BITS: tl.constexpr,
                    COLS: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    # A plane's CPW x COLS codes are PER consecutive inputs (slice i*COLS + column): decoded as a
    # [BLOCK_N, PER] block and stored as whole rows of PER contiguous outputs (vector stores);
    # the plane spans whole groups (one scale and zero per row and group) or lies in one.
    PER: tl.constexpr = CPW * COLS
    GPP: tl.constexpr = PER // GROUP if PER >= GROUP else 1  # groups per plane
    GW: tl.constexpr = PER // GPP  # inputs per scale within a plane
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    ptrs = qw_ptr + n[:, None] * stride_qw + t * (BITS * COLS) + tl.arange(0, COLS)[None, :]
    shifts = (tl.arange(0, CPW) * SPACING)[None, :, None]
    for v in tl.static_range(VWORDS):
        w = load_plane(ptrs, nmask[:, None], v, BITS, COLS)
        codes = (w[:, None, :] >> shifts) & ((1 << CODE_BITS) - 1)
        q = tl.reshape(codes, (BLOCK_N, GPP, GW)).to(tl.float32)
        g = (t * TILE + v * PER) // GROUP + tl.arange(0, GPP)
        sz = sz_ptr + n[:, None, None] * stride_sz + 2 * g[None, :, None]
        s = tl.load(sz, mask=nmask[:, None, None], other=0.0).to(tl.float32)
        z = tl.load(sz + 1, mask=nmask[:, None, None], other=0.0).to(tl.float32)
        deq = tl.reshape((q - z) * s, (BLOCK_N, PER)).to(w_ptr.dtype.element_ty)
        k = t * TILE + v * PER + tl.arange(0, PER)
        tl.store(w_ptr + n[:, None] * stride_w + k[None, :], deq, mask=nmask[:, None] & (k[None, :] < K))


# Shared memory grows with num_stages x the static steps of a tile (each step's loads get their own
# pipeline buffers): 2 stages fit up to BLOCK_M = 64, 1 stage at 128 (232 KB per block on H200).
# BLOCK_N = 32 doubles the programs of small-M calls (at N = 4096 BLOCK_N = 64 gives 64 programs
# for 132 SMs); it was added after the measured run in docs/kernels.md.
CONFIGS = [triton.Config({"BLOCK_N": bn, "SPLIT_K": split}, num_warps=warps, num_stages=stages)
           for bn, split, warps, stages in ((64, 1, 4, 2), (128, 1, 8, 2), (128, 1, 8, 1), (256, 1, 8, 1),
                                            (32, 1, 4, 2), (64, 2, 4, 2), (64, 4, 4, 2), (64, 8, 4, 2),
                                            (128, 4, 8, 2), (32, 4, 4, 2))]
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in CONFIGS)
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in CONFIGS)
_autotuned = triton.autotune(CONFIGS, key=["N", "K", "M_BUCKET", "BITS", "GROUP"],
                             cache_results=True)(_gemm_kernel)


def block_m(m: int) -> int:
    """Rows per tile: the batch rounded up to a power of two, 16 (mma's minimum) to 128."""
    return min(max(16, triton.next_power_of_2(m)), 128)


# device -> (fp32 partials, per-tile counters): split-K's scratch, kept between calls (no
# allocation per call, and CUDA graphs capture the same buffers); counters return to 0 at the end
# of every call. One scratch per device: split-K calls (``4 < M <= 64`` with a split config) on one
# device must not run concurrently on two streams. Not per stream, because ``torch.cuda.graph``
# captures on a stream of its own.
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def scratch(device: torch.device, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K's partial sums and tile counters for an ``m x n`` output, grown when too small."""
    floats = MAX_SPLIT_K * m * n
    tiles = triton.cdiv(n, MIN_BLOCK_N) * triton.cdiv(m, 16)
    have = _SCRATCH.get(device)
    if have is None or have[0].numel() < floats or have[1].numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"split-K scratch for a {m} x {n} output must exist before CUDA-graph capture: "
                               "run every layer and batch size once, eagerly, before capturing")
        floats = max(floats, have[0].numel() if have else 0)
        tiles = max(tiles, have[1].numel() if have else 0)
        have = (torch.empty(floats, dtype=torch.float32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
        _SCRATCH[device] = have
    return have


def args(x: torch.Tensor, kw: KernelWeight, out: torch.Tensor) -> tuple:
    """The kernel's runtime arguments, in order (``launch.Launch`` passes them per call)."""
    m = x.shape[0]
    ws, locks = scratch(x.device, m, kw.out_features)
    return (x, kw.qweight, kw.scale_zero, out, ws, locks, m, kw.out_features, kw.in_features, kw.tiles,
            x.stride(0), out.stride(0), kw.qweight.stride(0), kw.scale_zero.stride(0), block_m(m))


def gemm(x: torch.Tensor, kw: KernelWeight, out: torch.Tensor, consts: dict[str, int],
         config: triton.Config | None = None, warmup: bool = False) -> Launch | None:
    """``out = x @ W.T`` on the tensor cores; ``x`` 2-D with unit stride along K.

    ``config``, ``warmup`` and the result as for ``triton_gemv.gemv``.
    """
    a = args(x, kw, out)
    m, bm = x.shape[0], a[-1]

    def grid(c: dict) -> tuple[int, int, int]:
        return triton.cdiv(kw.out_features, c["BLOCK_N"]), triton.cdiv(m, bm), c["SPLIT_K"]

    meta = {**consts, "STEP": min(kw.group_size, consts["CPW"] * COLS), "BLOCK_M": bm}
    return launch.run(_gemm_kernel, _autotuned, grid, a, meta, config, warmup)


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
