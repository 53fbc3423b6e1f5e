"""llama.cpp's weight types (ggml): their prices, and quantizers that give llama.cpp's own bytes.

A plan for llama.cpp is priced and judged in the types llama-quantize will write, so the error
predicted for a tensor at Q4_K must be the error of llama.cpp's Q4_K, not of a look-alike grid.
:func:`quantize` reproduces ggml's reference quantizers (``quantize_row_q*_K_ref``, and with an
importance matrix ``quantize_row_q*_K_impl``) byte for byte, and :func:`dequantize` reads the
blocks back exactly as gguf-py (and ggml) do.

Being byte-exact means doing every float32 operation of the C code in the same order: products
and quotients are taken one by one (never fused, never a division turned into a multiplication by
a reciprocal), sums are accumulated left to right (torch's reductions add in another order, and
on CPU its cumsum accumulates in double), C float literals keep their float32 value (0.1f),
square roots go through float64 (torch's float32 sqrt on CPU is not correctly rounded), rounding
is to nearest-even like ggml's ``nearest_int``, and the searches keep the first candidate that
improves strictly. Each search
runs for all blocks at once; the only Python loops are over the positions inside a block and
over a search's candidates. The reference is ggml as built for x86-64 (no contraction of a*b+c
into FMA); builds that contract, such as ARM ones, can differ in the last bit of a few scales.

The type table :data:`GGML_TYPES` (block length and bytes per block) lives in :mod:`bitalloc.budget`,
which prices plans with it without importing torch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..budget import GGML_TYPES, GgmlType, ggml_row_allowed

QK_K = 256  # weights per K-quant super-block
_EPS = float(np.float32(1e-15))  # ggml's GROUP_MAX_EPS: below it a group counts as all zero
_CHUNK = 8192  # super-blocks per pass (whole rows): bounds the searches' memory to a few hundred MB


def ggml_type(name: str) -> GgmlType:
    """The type called ``name`` (as llama.cpp spells it, e.g. ``"Q4_K"``)."""
    try:
        return GGML_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r}; known: {', '.join(GGML_TYPES)}") from None


def row_allowed(qtype: str, cols: int) -> bool:
    """Whether rows of ``cols`` weights can be stored as ``qtype`` (blocks never straddle rows)."""
    return ggml_row_allowed(ggml_type(qtype).name, cols)


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of ``cols`` weights stored as ``qtype``."""
    t = ggml_type(qtype)
    _check_cols(t, cols)
    return cols // t.block_size * t.type_size


def _check_cols(t: GgmlType, cols: int) -> None:
    if not row_allowed(t.name, cols):
        raise ValueError(f"{t.name} stores rows in blocks of {t.block_size} weights; "
                         f"a row of {cols} weights is not a multiple of {t.block_size}")


# ---------------------------------------------------------------- float32 arithmetic as ggml does it

def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """a / b, correctly rounded. A Python number is expanded to a full tensor first: torch computes
    number / tensor through a reciprocal (a quarter of the quotients off by an ulp on CPU), and may
    do the like for tensor / number on other devices."""
    ref = a if isinstance(a, torch.Tensor) else b
    assert isinstance(ref, torch.Tensor)
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(ref, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(ref, b)
    return torch.div(a, b)


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (torch's float32 CPU kernel is not; through float64
    it is, since a double has more than twice a float's precision)."""
    return torch.sqrt(t.double()).float()


def _seqsum(t: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Sum over the last axis term by term, left to right, in t's dtype: a C ``for`` loop.

    ``from_first`` starts from the first term instead of from 0 (they differ only for -0.0).
    """
    terms = t.movedim(-1, 0).contiguous()
    acc = terms[0] if from_first else terms[0] + 0.0
    for term in terms[1:]:
        acc = acc + term
    return acc


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back, as ggml stores d and dmin (round to nearest even)."""
    return t.half().float()


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    """[N] float32 -> [N, 2] little-endian fp16 bytes."""
    return t.half().contiguous().view(torch.uint8).view(-1, 2)


def _bytes_half(b: torch.Tensor) -> torch.Tensor:
    """[N, 2] fp16 bytes -> [N] float32."""
    return b.contiguous().view(torch.float16).view(-1).float()


def _max0(x: torch.Tensor) -> torch.Tensor:
    """max(0, x...) over the last axis: ggml's scans that start from 0 and keep a strictly larger value."""
    m = x.amax(-1)
    return torch.where(m > 0, m, 0.0)


def _abs_max_signed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the first x that attains it) over the last axis, as ggml's scans find them."""
    ax = x.abs()
    i = ax.argmax(-1, keepdim=True)  # first occurrence, like the strict '>' of the C scan
    return ax.gather(-1, i).squeeze(-1), x.gather(-1, i).squeeze(-1)


# ---------------------------------------------------------------- ggml's scale searches, per group

def _make_qx(x: torch.Tensor, nmax: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric grid {-nmax..nmax-1}*scale for each row of x [G, n] (ggml's make_qx_quants with
    rmse_type 1): 19 trial scales around -nmax/max, least weighted squares for each, the best kept.
    ``w`` defaults to x*x. Returns (scale [G], codes + nmax [G, n])."""
    if w is None:
        w = x * x
    amax, mx = _abs_max_signed(x)
    zero = amax < _EPS
    wx = w * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        sumlx, suml2 = _seqsum(torch.stack([wx * q, w * q * q]))
        return q, sumlx, suml2

    L, sumlx, suml2 = fit(_div(float(-nmax), mx))
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        num = float(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        q, slx, sl2 = fit(_div(num, mx))
        take = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(take[:, None], q, L)
        scale = torch.where(take, slx / sl2, scale)
        best = torch.where(take, scale * slx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, L + nmax)


def _sweep(x: torch.Tensor, w: torch.Tensor, L: torch.Tensor, lo: int | None, hi: int,
           check_before: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to 5 sweeps over the positions of each group, moving one code at a time to its best value
    for the rest of the group whenever that raises sumlx^2/suml2 (the weighted fit of the best
    scale). A sweep that changes nothing leaves everything as it was, so ggml's early exit needs no
    counterpart. ggml tests suml2 > 0 before the move in make_qp_quants (``check_before``) and after
    it in make_q3_quants. Returns (codes, sumlx, suml2)."""
    L = L.clone()
    wx = w * x
    sumlx, suml2 = _seqsum(torch.stack([wx * L, w * L * L]))
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li, wxi = w[:, i], x[:, i], L[:, i], wx[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = torch.round(xi * sl2 / slx).clamp(lo, hi)
            slx_new = slx + wxi * new
            sl2_new = sl2 + wi * new * new
            ok = sl2 > 0 if check_before else sl2_new > 0
            take = (slx > 0) & ok & (new != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    return L, sumlx, suml2


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with rmse: start from -nmax/max, then up to 5 sweeps that move one
    code at a time when it raises sumlx^2/suml2 (weights x^2). Returns (scale, codes + nmax); an
    all-zero group gets codes 0 (not nmax), as in ggml, which matters for the bytes."""
    amax, mx = _abs_max_signed(x)
    zero = amax < _EPS
    L = torch.round(_div(float(-nmax), mx)[:, None] * x).clamp(-nmax, nmax - 1)
    L, sumlx, suml2 = _sweep(x, x * x, L, -nmax, nmax - 1, check_before=False)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, L + nmax)


def _make_qkx(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
              use_mad: bool, v3: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric grid {0..nmax}*scale - min for each row of x [G, n] (ggml's make_qkx2_quants, or
    make_qkx3_quants with ``v3``): nstep+1 trial scales, each refitted by weighted least squares of
    scale and min (min kept <= 0), the lowest weighted error (squared, or absolute with
    ``use_mad``) kept. Each trial starts from the best min so far, so the trials run in order.
    Returns (scale, -min, codes)."""
    mx = x.amax(-1)
    mn = x.amin(-1)
    mn = torch.where(mn > 0, 0.0, mn)
    degenerate = mx <= mn if v3 else mx == mn
    sum_w = _seqsum(w, from_first=True)
    sum_x = _seqsum(w * x, from_first=True)

    def err(scale: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        diff = scale[:, None] * q + m[:, None] - x
        return _seqsum(w * (diff.abs() if use_mad else diff * diff))

    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    best = err(scale, mn, L)
    for step in range(nstep + 1):
        num = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        v = _div(num, mx - mn)[:, None] * (x - mn[:, None])
        if v3:  # guards against a min that has moved next to max (v infinite or NaN)
            q = torch.where(v > 0, torch.round(torch.where(v < nmax, v, torch.full_like(v, nmax))), 0.0)
        else:
            q = torch.round(v).clamp(0, nmax)
        wq = w * q
        sum_l, sum_l2, sum_xl = _seqsum(torch.stack([wq, wq * q, wq * x]))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, this_min, q)
        take = (D > 0) & (cur < best)
        L = torch.where(take[:, None], q, L)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    return torch.where(degenerate, 0.0, scale), -mn, torch.where(degenerate[:, None], 0.0, L)


def _make_qp(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid {0..nmax}*scale for non-negative x [G, n] (ggml's make_qp_quants, used on the sub-block
    scales and mins with an importance matrix): 9 trial scales by weighted error, then up to 5
    one-code-at-a-time sweeps. Returns (scale, codes)."""
    mx = _max0(x)
    zero = mx < _EPS
    iscale = _div(float(nmax), mx)
    L = torch.round(iscale[:, None] * x)
    scale = _div(1.0, iscale)
    diff = x - scale[:, None] * L
    best = _seqsum(w * diff * diff)
    for step in (*range(-4, 0), *range(1, 5)):
        trial = _div(float(np.float32(0.1) * np.float32(step) + np.float32(nmax)), mx)
        q = torch.round(trial[:, None] * x).clamp(max=nmax)
        diff = x - _div(1.0, trial)[:, None] * q
        mse = _seqsum(w * diff * diff)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, trial, iscale)
    L = torch.round(iscale[:, None] * x).clamp(max=nmax)
    L, sumlx, suml2 = _sweep(x, w, L, None, nmax, check_before=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, L)


# ---------------------------------------------------------------- bit packing

def _u8(t: torch.Tensor) -> torch.Tensor:
    """Integer-valued float or int tensor -> uint8, wrapping as a C assignment to uint8_t does."""
    return (t.to(torch.int64) & 0xFF).to(torch.uint8)


def _pack_fields(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, k, m] codes of ``bits`` bits -> [N, m] bytes, field j at bit j*bits (k*bits <= 8)."""
    shifts = torch.arange(q.shape[1], device=q.device) * bits
    return _u8((q.to(torch.int64) << shifts[None, :, None]).sum(1))


def _unpack_fields(b: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_fields`: [N, m] bytes -> [N, k, m] int64 codes."""
    shifts = torch.arange(k, device=b.device) * bits
    return (b.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins [N, 8] -> 12 bytes."""
    ls, lm = ls.to(torch.int64), lm.to(torch.int64)
    return _u8(torch.cat([ls[:, :4] | (ls[:, 4:] >> 4) << 6,
                          lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                          (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4], dim=1))


def _unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int64)
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | (b[:, 0:4] >> 6) << 4], dim=1)
    mn = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | (b[:, 4:8] >> 6) << 4], dim=1)
    return sc, mn


def _pack_scales_q3(s: torch.Tensor) -> torch.Tensor:
    """Q3_K: sixteen 6-bit scales [N, 16] -> 12 bytes (low nibbles in 0-7, high crumbs in 8-11)."""
    s = s.to(torch.int64)
    low = (s[:, :8] & 0xF) | (s[:, 8:] & 0xF) << 4
    high = _pack_fields((s >> 4).view(-1, 4, 4), 2)  # byte 8+k holds scale 4*i+k at bits 2i
    return torch.cat([_u8(low), high], dim=1)


def _unpack_scales_q3(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int64)
    low = torch.cat([b[:, :8] & 0xF, b[:, :8] >> 4], dim=1)
    high = _unpack_fields(b[:, 8:12], 4, 2).reshape(-1, 16)
    return low | high << 4


# ---------------------------------------------------------------- the types

def _requant(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, old: torch.Tensor,
             lo: int, hi: int, offset: int) -> torch.Tensor:
    """Final codes on the stored (fp16, integer-scaled) grid: x [S, n] per sub-block step d [S] and
    offset m [S]; sub-blocks whose step is 0 keep the search's codes, as ggml does."""
    v = x + m[:, None] if m is not None else x
    q = torch.round(v / d[:, None]).clamp(lo, hi) + offset
    return torch.where((d != 0)[:, None], q, old)


def _superblock_weights(x: torch.Tensor, imatrix: torch.Tensor, sigma_factor: int, n: int) -> torch.Tensor:
    """ggml's weights with an importance matrix: qw * sqrt(sigma2 + x^2), sigma2 = factor * sum(x^2)
    / 256 over the super-block; returned per sub-block of n weights."""
    sigma2 = _div(sigma_factor * _seqsum(x * x), float(QK_K))
    return (imatrix * _sqrt(sigma2[:, None] + x * x)).reshape(-1, n)


def _q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Q2_K, 84 bytes per 256 weights: 16 sub-blocks of 16 with codes 0..3 and their own scale and
    min, each a 4-bit multiple of the fp16 super-block d / dmin. Layout: scales (low nibble scale,
    high nibble min) [16], codes 4 per byte [64], d, dmin. ``x`` [N, 256] -> bytes [N, 84]."""
    N = x.shape[0]
    xs = x.reshape(-1, 16)
    if qw is None:
        scales, mins, L = _make_qkx(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True, v3=False)
        scales, mins = scales.view(N, 16), mins.view(N, 16)
        max_scale, max_min = _max0(scales), _max0(mins)
        ls = torch.where(max_scale[:, None] > 0, torch.round(_div(15.0, max_scale)[:, None] * scales), 0.0)
        lm = torch.where(max_min[:, None] > 0, torch.round(_div(15.0, max_min)[:, None] * mins), 0.0)
        d, dmin = _div(max_scale, 15.0), _div(max_min, 15.0)
    else:
        w = _superblock_weights(x, qw, 1, 16)
        scales, mins, L = _make_qkx(xs, w, 3, -0.9, 0.05, 36, use_mad=False, v3=True)
        sw = _seqsum(w).view(N, 16)
        d, ls = _make_qp(scales.view(N, 16), 15, sw)
        dmin, lm = _make_qp(mins.view(N, 16), 15, sw)
    packed = _u8((ls.to(torch.int64) & 0xFF) | lm.to(torch.int64) << 4)
    d, dmin = _fp16(d), _fp16(dmin)
    sc = packed.to(torch.int64)
    L = _requant(xs, (d[:, None] * (sc & 0xF)).view(-1), (dmin[:, None] * (sc >> 4)).view(-1), L, 0, 3, 0)
    qs = _pack_fields(L.view(N, 2, 4, 32).movedim(1, 2).reshape(N, 4, 64), 2)
    return torch.cat([packed, qs, _half_bytes(d), _half_bytes(dmin)], dim=1)


def _q3_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Q3_K, 110 bytes per 256 weights: 16 sub-blocks of 16, symmetric codes -4..3, signed 6-bit
    sub-block scales times the fp16 d. Layout: high code bits [32], low 2 code bits [64], packed
    scales [12], d."""
    N = x.shape[0]
    xs = x.reshape(-1, 16)
    if qw is None:
        scales, L = _make_q3(xs, 4)
        scales = scales.view(N, 16)
        _, max_scale = _abs_max_signed(scales)
        iscale = _div(-32.0, max_scale)
        ls = torch.where(max_scale[:, None] != 0, torch.round(iscale[:, None] * scales).clamp(-32, 31) + 32, 0.0)
        d = torch.where(max_scale != 0, _div(1.0, iscale), 0.0)
    else:
        w = _superblock_weights(x, qw, 2, 16)
        scales, L = _make_qx(xs, 4, w)
        d, ls = _make_qx(scales.view(N, 16), 32, _seqsum(w).view(N, 16))
    d = _fp16(d)
    step = (d[:, None] * (ls - 32)).view(-1)
    L = _requant(xs, step, None, L, -4, 3, 4).view(N, 8, 32).to(torch.int64)
    hmask = _pack_fields(L >> 2, 1)
    qs = _pack_fields((L & 3).view(N, 2, 4, 32).movedim(1, 2).reshape(N, 4, 64), 2)
    return torch.cat([hmask, qs, _pack_scales_q3(ls), _half_bytes(d)], dim=1)


def _q45_k(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> torch.Tensor:
    """Q4_K (nmax 15, 144 bytes) and Q5_K (nmax 31, 176 bytes) per 256 weights: 8 sub-blocks of 32
    with codes 0..nmax, a 6-bit scale and a 6-bit min each, times the fp16 d and dmin. Layout: d,
    dmin, packed scales and mins [12], (Q5_K: fifth code bits [32]), low 4 code bits [128]."""
    N = x.shape[0]
    xs = x.reshape(-1, 32)
    if qw is None:
        av_x = _sqrt(_div(_seqsum(xs * xs), 32.0))
        w = av_x[:, None] + xs.abs()
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = _make_qkx(xs, w, nmax, rmin, 0.1, nstep, use_mad=False, v3=False)
        scales, mins = scales.view(N, 8), mins.view(N, 8)
        max_scale, max_min = _max0(scales), _max0(mins)
        inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, _div(63.0, max_min), 0.0)
        ls = _u8(torch.round(inv_scale[:, None] * scales)).clamp(max=63)
        lm = _u8(torch.round(inv_min[:, None] * mins)).clamp(max=63)
        d, dmin = _div(max_scale, 63.0), _div(max_min, 63.0)
    else:
        w = _superblock_weights(x, qw, 2, 32)
        scales, mins, L = _make_qkx(xs, w, nmax, -0.9, 0.05, 36, use_mad=False, v3=True)
        sw = _seqsum(w).view(N, 8)
        d, ls = _make_qp(scales.view(N, 8), 63, sw)
        dmin, lm = _make_qp(mins.view(N, 8), 63, sw)
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    d, dmin = _fp16(d), _fp16(dmin)
    L = _requant(xs, (d[:, None] * ls).view(-1), (dmin[:, None] * lm).view(-1), L, 0, nmax, 0)
    L = L.view(N, 4, 2, 32).to(torch.int64)
    qs = _u8((L[:, :, 0] & 0xF) | (L[:, :, 1] & 0xF) << 4).reshape(N, 128)
    parts = [_half_bytes(d), _half_bytes(dmin), _pack_scales_k4(ls, lm)]
    if nmax == 31:
        parts.append(_pack_fields(L.view(N, 8, 32) >> 4, 1))
    return torch.cat([*parts, qs], dim=1)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Q6_K, 210 bytes per 256 weights: 16 sub-blocks of 16, codes -32..31, int8 sub-block scales
    times the fp16 d. Layout: low 4 code bits [128], high 2 code bits [64], scales [16], d. With an
    importance matrix ggml weighs the scale search by it directly (no sigma term)."""
    N = x.shape[0]
    xs = x.reshape(-1, 16)
    scales, L = _make_qx(xs, 32, None if qw is None else qw.reshape(-1, 16))
    scales = scales.view(N, 16)
    amax, max_scale = _abs_max_signed(scales)
    zero = amax < _EPS
    iscale = _div(-128.0, max_scale)
    d = _fp16(_div(1.0, iscale))
    ls = torch.round(iscale[:, None] * scales).clamp(max=127)
    L = _requant(xs, (d[:, None] * ls).view(-1), None, L, -32, 31, 32).view(N, 2, 4, 32).to(torch.int64)
    lo = L & 0xF
    ql = torch.cat([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], dim=2).reshape(N, 128)
    qh = _pack_fields((L >> 4).reshape(N * 2, 4, 32), 2).reshape(N, 64)
    out = torch.cat([_u8(ql), qh, _u8(ls), _half_bytes(d)], dim=1)
    return torch.where(zero[:, None], torch.zeros_like(out), out)


def _q8_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Q8_0, 34 bytes per 32 weights: fp16 d = max|x|/127, int8 codes; ggml ignores an importance matrix."""
    amax = x.abs().amax(1)
    d = _div(amax, 127.0)
    inv = torch.where(d != 0, _div(1.0, d), 0.0)
    v = x * inv[:, None]
    q = torch.round(v)
    tie = (v - v.trunc()).abs() == 0.5  # C roundf rounds halves away from zero
    q = torch.where(tie, v.trunc() + v.sign(), q)
    return torch.cat([_half_bytes(d), _u8(q)], dim=1)


def _q4_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Q4_0, 18 bytes per 32 weights: fp16 d = (signed max-magnitude weight)/-8, codes 0..15 for
    (q-8)*d, weights j and j+16 sharing a byte. Only the reference (no importance matrix) path."""
    _, mx = _abs_max_signed(x)
    d = _div(mx, -8.0)
    inv = torch.where(d != 0, _div(1.0, d), 0.0)
    q = (x * inv[:, None] + 8.5).trunc().clamp(max=15)  # C: MIN(15, (int8_t)(x*id + 8.5f))
    q = q.to(torch.int64).view(-1, 2, 16)
    return torch.cat([_half_bytes(d), _u8(q[:, 0] | q[:, 1] << 4)], dim=1)


_QUANTIZERS: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": lambda x, qw: _q45_k(x, qw, 15),
    "Q5_K": lambda x, qw: _q45_k(x, qw, 31),
    "Q6_K": _q6_k,
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
}
IMATRIX_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")  # Q8_0 ignores it, as in ggml


def _dq2_k(b: torch.Tensor) -> torch.Tensor:
    N = b.shape[0]
    sc = b[:, :16].to(torch.int64)
    d, dmin = _bytes_half(b[:, 80:82]), _bytes_half(b[:, 82:84])
    dl = (d[:, None] * (sc & 0xF)).view(N, 16, 1)
    ml = (dmin[:, None] * (sc >> 4)).view(N, 16, 1)
    q = _unpack_fields(b[:, 16:80].reshape(N * 2, 32), 4, 2).view(N, 16, 16).float()
    return (dl * q - ml).view(N, QK_K)


def _dq3_k(b: torch.Tensor) -> torch.Tensor:
    N = b.shape[0]
    d = _bytes_half(b[:, 108:110])
    dl = (d[:, None] * (_unpack_scales_q3(b[:, 96:108]) - 32)).view(N, 16, 1)
    low = _unpack_fields(b[:, 32:96].reshape(N * 2, 32), 4, 2).view(N, 16, 16)
    high = _unpack_fields(b[:, :32], 8, 1).view(N, 16, 16)
    return (dl * (low - 4 * (1 - high)).float()).view(N, QK_K)


def _dq45_k(b: torch.Tensor, five: bool) -> torch.Tensor:
    N = b.shape[0]
    d, dmin = _bytes_half(b[:, 0:2]), _bytes_half(b[:, 2:4])
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    dl = (d[:, None] * sc).view(N, 8, 1)
    ml = (dmin[:, None] * mn).view(N, 8, 1)
    qs = b[:, 48:] if five else b[:, 16:]
    q = _unpack_fields(qs.reshape(N * 4, 32), 2, 4).view(N, 8, 32)
    if five:
        q = q | _unpack_fields(b[:, 16:48], 8, 1).view(N, 8, 32) << 4
    return (dl * q.float() - ml).view(N, QK_K)


def _dq6_k(b: torch.Tensor) -> torch.Tensor:
    N = b.shape[0]
    d = _bytes_half(b[:, 208:210])
    dl = (d[:, None] * b[:, 192:208].view(torch.int8).float()).view(N, 16, 1)
    # per half: nibble, then byte half, then l; quarter k = 2*nibble + byte half
    lo = _unpack_fields(b[:, :128].reshape(N * 2, 64), 2, 4).view(N, 2, 4, 32)
    hi = _unpack_fields(b[:, 128:192].reshape(N * 2, 32), 4, 2).view(N, 2, 4, 32)
    q = (lo | hi << 4) - 32
    return (dl * q.reshape(N, 16, 16).float()).view(N, QK_K)


def _dq8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _bytes_half(b[:, :2])[:, None]


def _dq4_0(b: torch.Tensor) -> torch.Tensor:
    q = _unpack_fields(b[:, 2:], 2, 4).reshape(-1, 32) - 8
    return _bytes_half(b[:, :2])[:, None] * q.float()


_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q2_K": _dq2_k,
    "Q3_K": _dq3_k,
    "Q4_K": lambda b: _dq45_k(b, False),
    "Q5_K": lambda b: _dq45_k(b, True),
    "Q6_K": _dq6_k,
    "Q8_0": _dq8_0,
    "Q4_0": _dq4_0,
}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---------------------------------------------------------------- public API

def quantize(w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """The bytes llama-quantize writes for the 2-D weight ``w`` [rows, cols] as ``qtype``.

    llama-quantize reads its input GGUF's weights as float32, so pass them as that file holds them
    (``w.half()`` for a model-f16.gguf made from a bf16 checkpoint); any float dtype is accepted.

    ``imatrix`` [cols] is llama.cpp's importance of each input column (mean squared activation);
    with it the K-quants follow ``quantize_row_q*_K_impl``, without it ``quantize_row_q*_K_ref``
    (Q8_0 and the plain types F32/F16/BF16 ignore it, as ggml does; Q4_0 refuses it).
    Returns uint8 [rows, row_bytes(qtype, cols)]: the blocks of each row, as stored in GGUF.
    """
    t = ggml_type(qtype)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got shape {tuple(w.shape)} of {w.dtype}")
    rows, cols = w.shape
    _check_cols(t, cols)
    if qtype in _PLAIN:
        return w.to(_PLAIN[qtype]).contiguous().view(torch.uint8).view(rows, -1)
    x = w.detach().float()
    qw = None
    if imatrix is not None:
        if qtype not in IMATRIX_TYPES:
            raise ValueError(f"{qtype} has no importance-matrix quantizer here; "
                             f"use one of {', '.join(IMATRIX_TYPES)}")
        if imatrix.shape != (cols,):
            raise ValueError(f"the importance matrix has shape {tuple(imatrix.shape)}, expected ({cols},)")
        qw = imatrix.detach().float().to(w.device).reshape(-1, t.block_size)  # the same for every row
    step = max(1, _CHUNK * QK_K // cols)  # rows per pass
    fn = _QUANTIZERS[qtype]
    out = [fn(x[r:r + step].reshape(-1, t.block_size), None if qw is None else qw.repeat(min(step, rows - r), 1))
           for r in range(0, rows, step)]
    return torch.cat(out).reshape(rows, -1)


def dequantize(data: torch.Tensor, qtype: str) -> torch.Tensor:
    """Weights [rows, cols] in float32 from the bytes [rows, row_bytes] of :func:`quantize`."""
    t = ggml_type(qtype)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % t.type_size:
        raise ValueError(f"expected uint8 [rows, k*{t.type_size}] {qtype} blocks, "
                         f"got {tuple(data.shape)} of {data.dtype}")
    rows = data.shape[0]
    if qtype in _PLAIN:
        return data.contiguous().view(_PLAIN[qtype]).float()
    return _DEQUANTIZERS[qtype](data.reshape(-1, t.type_size)).reshape(rows, -1)


def fake_quantize(w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """What llama.cpp computes with when ``w`` is stored as ``qtype``: float32 [rows, cols]."""
    return dequantize(quantize(w, qtype, imatrix), qtype)


def weight_error(w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """dW of llama.cpp's ``qtype``: what it computes with, minus ``w`` (float32, like ``w``).

    llama-quantize reads a model-f16.gguf, so ``w`` is rounded to fp16 first, as the converter stores it;
    the error is measured against the checkpoint's own weight, as every other candidate's is.
    """
    return fake_quantize(w.half(), qtype, imatrix) - w.float()
