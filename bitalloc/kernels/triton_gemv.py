"""GEMV for M = 1..4: CUDA cores, fp32 accumulation, every weight word read once.

A program owns ``BLOCK_N`` output rows and walks the whole of K, ``SPLIT`` tiles side by side
(split-K inside the program: the ``SPLIT`` strands' partial sums are reduced once, at the end,
so there is no second pass and no atomics; with ``BLOCK_N = 16``, N = 4096 rows give 256
programs). Per code: one LOP3 and one FADD give ``q - zero`` exactly (``code_minus_zero``), one
FFMA per activation row accumulates; per group and strand the zero point is read once before
and the scale once after: ``acc += s * sum (q - z) x``. With ``EVEN_K`` (K a multiple of 512)
the activation loads need no per-slice bounds mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .launch import Launch
from .layout import TILE, KernelWeight
from .triton_decode import MAGIC, code_minus_zero, load_plane

MAX_M = 4


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, sz_ptr, y_ptr, M, N, K, n_tiles, stride_xm, stride_ym, stride_qw,
                 stride_sz, magic, M_BUCKET, BITS: tl.constexpr, GROUP: tl.constexpr,
                 VWORDS: tl.constexpr, CPW: tl.constexpr, SPACING: tl.constexpr,
                 CODE_BITS: tl.constexpr, COLS: tl.constexpr, TILE: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLIT: tl.constexpr, PAIR: tl.constexpr):
    pid = tl.program_id(0)
    # 4-D [M, N, strand, column]: strand = a tile of its own, COLS = the tile's word columns.
    # With PAIR a thread also owns row n + BLOCK_N ("b"): written out as a second set of tensors in
    # the same layout, so the two rows share every activation load and bf16 -> fp32 conversion
    # (a second row in one tensor would get its own copy of each).
    m = tl.arange(0, BLOCK_M)[:, None, None, None]
    n = (pid * BLOCK_N * (1 + PAIR) + tl.arange(0, BLOCK_N))[None, :, None, None]
    strand = tl.arange(0, SPLIT)[None, None, :, None]
    col = tl.arange(0, COLS)[None, None, None, :]
    # Bases; inside a tile every slice, plane and group is a constant offset from them. x is
    # addressed as a full [M, N, strand, column] broadcast so that its loads land in the weights'
    # layout (no shared-memory shuffle per slice); zero points and scales are [1, N, strand, 1].
    w_base = qw_ptr + n * stride_qw + strand * (BITS * COLS) + col
    x_base = x_ptr + m * stride_xm + strand * TILE + col + n * 0
    sz_base = sz_ptr + n * stride_sz + strand * (2 * TILE // GROUP)
    b_off = BLOCK_N * stride_qw  # row n + BLOCK_N
    b_sz = BLOCK_N * stride_sz
    acc = tl.zeros((BLOCK_M, BLOCK_N, SPLIT, COLS), tl.float32)
    part = tl.zeros((BLOCK_M, BLOCK_N, SPLIT, COLS), tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N, SPLIT, COLS), tl.float32)
    part_b = tl.zeros((BLOCK_M, BLOCK_N, SPLIT, COLS), tl.float32)
    z = tl.zeros((1, BLOCK_N, SPLIT, 1), tl.float32)
    z_b = tl.zeros((1, BLOCK_N, SPLIT, 1), tl.float32)
    for t0 in range(0, n_tiles, SPLIT):
        tile_ok = (t0 + strand) < n_tiles
        wmask = (n < N) & tile_ok
        wmask_b = (n + BLOCK_N < N) & tile_ok
        xmask = (m < M) & tile_ok
        w_ptrs = w_base + t0 * (BITS * COLS)
        x_ptrs = x_base + t0 * TILE
        sz_ptrs = sz_base + t0 * (2 * TILE // GROUP)
        for v in tl.static_range(VWORDS):
            w = load_plane(w_ptrs, wmask, v, BITS, COLS)
            w_hi = w >> 16
            if PAIR:
                w_b = load_plane(w_ptrs + b_off, wmask_b, v, BITS, COLS)
                w_b_hi = w_b >> 16
            for i in tl.static_range(CPW):
                j = v * CPW + i
                g = 2 * ((j * COLS) // GROUP)
                if (j * COLS) % GROUP == 0:  # first slice of a group: its zero point
                    z = tl.load(sz_ptrs + g + 1, mask=wmask, other=0.0).to(tl.float32)
                    if PAIR:
                        z_b = tl.load(sz_ptrs + b_sz + g + 1, mask=wmask_b, other=0.0).to(tl.float32)
                if EVEN_K:
                    xv = tl.load(x_ptrs + j * COLS, mask=xmask, other=0.0).to(tl.float32)
                else:
                    kmask = (t0 + strand) * TILE + j * COLS + col < K
                    xv = tl.load(x_ptrs + j * COLS, mask=xmask & kmask, other=0.0).to(tl.float32)
                part += code_minus_zero(w, w_hi, z, magic, i * SPACING, CODE_BITS) * xv
                if PAIR:
                    part_b += code_minus_zero(w_b, w_b_hi, z_b, magic, i * SPACING, CODE_BITS) * xv
                if ((j + 1) * COLS) % GROUP == 0:  # last slice of a group: its scale
                    s = tl.load(sz_ptrs + g, mask=wmask, other=0.0).to(tl.float32)
                    acc += s * part
                    part = tl.zeros((BLOCK_M, BLOCK_N, SPLIT, COLS), tl.float32)
                    if PAIR:
                        s_b = tl.load(sz_ptrs + b_sz + g, mask=wmask_b, other=0.0).to(tl.float32)
                        acc_b += s_b * part_b
                        part_b = tl.zeros((BLOCK_M, BLOCK_N, SPLIT, COLS), tl.float32)
    m2 = tl.arange(0, BLOCK_M)[:, None]
    n2 = (pid * BLOCK_N * (1 + PAIR) + tl.arange(0, BLOCK_N))[None, :]
    y = tl.sum(tl.sum(acc, axis=3), axis=2)
    tl.store(y_ptr + m2 * stride_ym + n2, y.to(y_ptr.dtype.element_ty), mask=(m2 < M) & (n2 < N))
    if PAIR:
        y_b = tl.sum(tl.sum(acc_b, axis=3), axis=2)
        n2 += BLOCK_N
        tl.store(y_ptr + m2 * stride_ym + n2, y_b.to(y_ptr.dtype.element_ty), mask=(m2 < M) & (n2 < N))


# Words per thread and plane = BLOCK_N * SPLIT * COLS / (32 * num_warps): 8 (one 32-byte vector)
# or 4, twice over with PAIR. Larger tiles in one tensor make triton give the per-group scale/zero
# loads a layout of their own and shuffle them through shared memory at every use (seen in the
# TTGIR: 59 barriers per tile instead of 2). PAIR (a second row per thread, its own tensors) cuts
# the SASS from 6.1 to 4.9-5.5 instructions per code (4-bit, g128, sm_90) at the cost of registers.
CONFIGS = [
    triton.Config({"BLOCK_N": bn, "SPLIT": split, "PAIR": pair}, num_warps=warps, num_stages=2)
    for bn, split, warps, pair in ((16, 4, 4, 0), (16, 8, 8, 0), (8, 8, 4, 0), (8, 4, 2, 0),
                                   (8, 4, 4, 1), (8, 8, 4, 1), (8, 4, 2, 1))
]

_autotuned = triton.autotune(CONFIGS, key=["N", "K", "M_BUCKET", "BITS", "GROUP"],
                             cache_results=True)(_gemv_kernel)


def args(x: torch.Tensor, kw: KernelWeight, out: torch.Tensor) -> tuple:
    """The kernel's runtime arguments, in order (``launch.Launch`` passes them per call)."""
    m = x.shape[0]
    return (x, kw.qweight, kw.scale_zero, out, m, kw.out_features, kw.in_features, kw.tiles,
            x.stride(0), out.stride(0), kw.qweight.stride(0), kw.scale_zero.stride(0), MAGIC,
            triton.next_power_of_2(m))


def gemv(x: torch.Tensor, kw: KernelWeight, out: torch.Tensor, consts: dict[str, int],
         config: triton.Config | None = None, warmup: bool = False) -> Launch | None:
    """``out[:M] = x @ W.T`` for a 2-D ``x`` of at most ``MAX_M`` rows (unit stride along K).

    ``config`` pins one configuration (tests, the interpreter); None autotunes per shape.
    ``warmup`` compiles (every autotune configuration) without launching. Returns the compiled
    kernel bound for later calls of the same signature (None under the interpreter, or warmup).
    """
    a = args(x, kw, out)

    def grid(c: dict) -> tuple[int]:
        return (triton.cdiv(kw.out_features, c["BLOCK_N"] * (1 + c["PAIR"])),)

    meta = {**consts, "EVEN_K": kw.in_features % TILE == 0, "BLOCK_M": a[-1]}
    return launch.run(_gemv_kernel, _autotuned, grid, a, meta, config, warmup)
