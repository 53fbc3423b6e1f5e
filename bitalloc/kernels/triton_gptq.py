"""GPTQ's column loop over one block, fused: one program per tile of rows runs all of the block's columns.

Inside a block of GPTQ's lazy-batch loop (``bitalloc.rounding.gptq``) rows are independent: a
row's rounding error only moves later columns of the same row. The torch loop spends ~13 tiny
kernels per column on all rows at once, which on a GPU is launch-bound (about half of the
sensitivity pass on an H200). Here a program loads a ``[BLOCK_R, BLOCK_C]`` tile of the block
into registers and walks its columns: column i by a masked sum, the group's (scale, zero) at a
group start, the code, the error / U_jj, and the update of the tile by the error times row i of
U (U is upper triangular, so the whole row can be applied: left of the diagonal it is zero and
leaves finished columns unchanged). Codes, errors and dynamic (scale, zero) are stored; the
weight itself is only read, so a launch can be repeated (benchmarks, config sweeps).

The torch loop is the reference, and the kernel reproduces it bit for bit: every value goes
through the same IEEE fp32 operations in the same order (the reference lives in
``rounding/gptq.py`` because it reuses the RTN helpers, which this package may not import).
What that takes on CUDA:

* divisions are ``tl.math.div_rn`` (Triton's ``/`` on fp32 is the approximate ``div.full``);
* except where torch divides by a Python number (the scale's ``/ qmax``): torch's CUDA kernel
  multiplies by the fp32 reciprocal there, and so does the kernel, on the devices where torch
  does (``torch_divides_by_reciprocal``, asked once per device);
* launches pass ``enable_fp_fusion=False``: torch rounds ``err * u`` and the subtraction
  separately, an FMA would round once (this doubles the update's instructions; exactness wins);
* round half to even, like ``torch.round``, by adding and subtracting 2^23 (exact; libdevice's
  ``rint`` would do, but the interpreter cannot run libdevice, and the tests need it to);
* fp16 storage rounding by ``.to(tl.float16)`` (round to nearest even, as ``Tensor.half``);
* extracting a column by summing it with zeros and min/max reductions are exact.

Groups: dynamic groups are computed from the tile when they start, so they must lie inside the
block (``supports``); static groups (act_order) come precomputed, gathered per column for the
block. Bits and group size are runtime arguments: a process compiles one variant per
(symmetric, static groups), not one per width and group size.

The CPU tests run this kernel under the Triton interpreter against the torch loop on CPU;
``benchmarks/gptq_kernel.py`` checks it against the torch loop on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

MAX_BLOCK = 256  # widest block whose tile stays in registers (fp32, BLOCK_R rows)
_RNE_MAGIC: tl.constexpr = tl.constexpr(2.0**23)  # fp32 spacing is 1 on [2^23, 2^24)


@dataclass(frozen=True)
class Config:
    """Rows per program and warps per program (``DEFAULT`` is what launches use;
    ``benchmarks/gptq_kernel.py`` times alternatives)."""

    block_rows: int = 8
    num_warps: int = 4


DEFAULT = Config()


def supports(block: int, group_size: int, static_groups: bool) -> bool:
    """Whether the kernel computes this configuration exactly like the torch loop.

    A program sees one block, so a dynamic group (taken from the updated weights when it
    starts) must not reach past it: blocks must be whole groups. Static groups have no such
    limit. The block must fit one tile.
    """
    return 0 < block <= MAX_BLOCK and (static_groups or block % group_size == 0)


@triton.jit
def _round_half_even(x):
    """``torch.round`` for fp32: x + 2^23 rounds to an integer (ties to even), exactly undone by - 2^23."""
    magic = tl.where(x >= 0, _RNE_MAGIC, -_RNE_MAGIC)
    return tl.where(tl.abs(x) < _RNE_MAGIC, (x + magic) - magic, x)


@triton.jit
def _fp16(x):
    """Round to the nearest fp16 value, returned as fp32 (the stored precision of scales and zeros)."""
    return x.to(tl.float16).to(tl.float32)


@triton.jit
def _div_by_scalar(x, d, RECIPROCAL: tl.constexpr):
    """``x / d`` as torch computes a tensor divided by a Python number on this device."""
    if RECIPROCAL:
        return x * tl.math.div_rn(1.0, d)
    return tl.math.div_rn(x, d)


@triton.jit
def _group_params(tile, in_group, qmax, SYMMETRIC: tl.constexpr, RECIPROCAL: tl.constexpr,
                  SCALE_FLOOR: tl.constexpr):
    """[rows, 1] (scale, zero) of the tile's columns ``in_group``: ``rtn_params``' rule, op for op."""
    lo = tl.min(tl.where(in_group, tile, float("inf")), axis=1, keep_dims=True)
    hi = tl.max(tl.where(in_group, tile, float("-inf")), axis=1, keep_dims=True)
    if SYMMETRIC:
        absmax = tl.max(tl.where(in_group, tl.abs(tile), 0.0), axis=1, keep_dims=True)
        scale = _div_by_scalar(absmax, qmax * 0.5, RECIPROCAL)
    else:
        scale = _div_by_scalar(hi - lo, qmax, RECIPROCAL)
    scale = tl.maximum(_fp16(scale), SCALE_FLOOR)
    const = hi == lo  # no range: scale |c|, the code next to the zero reproduces c
    scale = tl.where(const & (lo != 0), _fp16(tl.abs(lo)), scale)
    if SYMMETRIC:
        zero = tl.zeros(scale.shape, tl.float32) + (qmax + 1.0) * 0.5
    else:
        zero = tl.where(const, (lo < 0).to(tl.float32), _fp16(_round_half_even(tl.math.div_rn(-lo, scale))))
    return scale, zero


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, codes_ptr, err_ptr, scale_ptr, zero_ptr, group_ptr, rows, ncols, qmax, group,
                       stride_w, stride_u, stride_c, stride_e, stride_s, SYMMETRIC: tl.constexpr,
                       STATIC: tl.constexpr, RECIPROCAL: tl.constexpr, SCALE_FLOOR: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Everything per column stays in the tile's layout: per-row values [BLOCK_R, 1] from
    # reductions, U's row loaded as a full (broadcast) tile, codes and errors collected in tiles
    # and stored at the end. Anything else is shuffled through shared memory at every column.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    live = (r < rows) & (c < ncols)
    tile = tl.load(w_ptr + r * stride_w + c, mask=live, other=0.0)
    u_rows = u_ptr + c + 0 * r  # row i of U's block, broadcast over the tile's rows
    codes = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    errs = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    if STATIC:  # every column's (scale, zero), [rows, n] like the weights, read once
        scales = tl.load(scale_ptr + r * stride_s + c, mask=live, other=1.0)
        zeros = tl.load(zero_ptr + r * stride_s + c, mask=live, other=0.0)
    scale = tl.full([BLOCK_R, 1], 1.0, tl.float32)
    zero = tl.zeros([BLOCK_R, 1], tl.float32)
    for i in range(ncols):
        col = c == i
        if STATIC:
            scale = tl.sum(tl.where(col, scales, 0.0), axis=1, keep_dims=True)
            zero = tl.sum(tl.where(col, zeros, 0.0), axis=1, keep_dims=True)
        else:
            if i % group == 0:  # a dynamic group starts: from the updated weights of its columns
                scale, zero = _group_params(tile, (c >= i) & (c < i + group) & (c < ncols), qmax, SYMMETRIC,
                                            RECIPROCAL, SCALE_FLOOR)
                g = tl.load(group_ptr + i)
                tl.store(scale_ptr + r * stride_s + g, scale, mask=r < rows)
                tl.store(zero_ptr + r * stride_s + g, zero, mask=r < rows)
        x = tl.sum(tl.where(col, tile, 0.0), axis=1, keep_dims=True)
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)) + zero, 0.0), qmax)
        err = tl.math.div_rn(x - (code - zero) * scale, tl.load(u_ptr + i * stride_u + i))
        tile = tile - err * tl.load(u_rows + i * stride_u, mask=c < ncols, other=0.0)
        codes = tl.where(col, code, codes)
        errs = tl.where(col, err, errs)
    tl.store(codes_ptr + r * stride_c + c, codes, mask=live)
    tl.store(err_ptr + r * stride_e + c, errs, mask=live)


@cache
def torch_divides_by_reciprocal(device: torch.device) -> bool:
    """Whether torch computes ``tensor / python_number`` as ``tensor * (1 / number)`` on ``device``.

    It does on CUDA (an optimisation in its division kernel; one ulp off at times), not on CPU.
    ``rtn_params`` divides by Python numbers, so the kernel must do the same as torch to give equal
    scales; asked once per device rather than assumed, since it is torch's choice, not a contract.
    """
    x = torch.linspace(1.0, 2.0, 4097, device=device)
    return not torch.equal(x / 3, x / torch.tensor(3.0, device=device))


def quantize_block(w: torch.Tensor, u: torch.Tensor, codes: torch.Tensor, err: torch.Tensor,
                   scale: torch.Tensor, zero: torch.Tensor, col_group: torch.Tensor, a: int, b: int, *,
                   bits: int, group_size: int, symmetric: bool, static_groups: bool, scale_floor: float) -> None:
    """GPTQ over columns ``a:b`` (one block), all fp32 on one device, 2-D tensors with unit column stride.

    ``w`` [rows, cols]: the weights, read only; ``u`` [cols, cols]: the upper Cholesky factor of
    H^-1; ``codes`` [rows, cols]: written at a:b, the codes as floats; ``err`` [rows, b - a]:
    written, the errors / U_jj; ``scale`` and ``zero`` [rows, groups]: read (static groups) or
    written at each group start (dynamic); ``col_group`` [cols]: each column's group;
    ``scale_floor``: the smallest stored scale (``rtn.FP16_TINY``).
    """
    cols = w.shape[1]
    groups_inside = static_groups or (a % group_size == 0 and (b % group_size == 0 or b == cols))
    if not (0 < b - a <= MAX_BLOCK and groups_inside):
        raise ValueError(f"the fused GPTQ block step does not compute columns {a}:{b} of {cols} with group "
                         f"{group_size} and {'static' if static_groups else 'dynamic'} groups")
    if any(t.dtype != torch.float32 or t.stride(1) != 1 for t in (w, u, codes, err, scale, zero)) \
            or scale.stride() != zero.stride():
        raise ValueError("the fused GPTQ block step needs fp32 tensors with unit column stride "
                         "(scale and zero alike)")
    if static_groups:  # per column, so that the kernel reads them like the weights
        scale, zero = scale[:, col_group[a:b]], zero[:, col_group[a:b]]
    cfg = DEFAULT
    rows = w.shape[0]
    grid = (triton.cdiv(rows, cfg.block_rows),)
    _gptq_block_kernel[grid](w[:, a:b], u[a:b, a:b], codes[:, a:b], err, scale, zero, col_group[a:b], rows, b - a,
                             float(2**bits - 1), group_size, w.stride(0), u.stride(0), codes.stride(0),
                             err.stride(0), scale.stride(0), SYMMETRIC=symmetric, STATIC=static_groups,
                             RECIPROCAL=torch_divides_by_reciprocal(w.device), SCALE_FLOOR=scale_floor,
                             BLOCK_R=cfg.block_rows, BLOCK_C=_tile_cols(b - a), num_warps=cfg.num_warps,
                             enable_fp_fusion=False)


def _tile_cols(n: int) -> int:
    """Tile width for a block of ``n`` columns: 128 or 256, so a short last block compiles nothing new."""
    return 128 if n <= 128 else MAX_BLOCK
