"""Device-side decoding of the tiled-plane layout (``layout.py``), shared by every kernel."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_plane(ptrs, mask, v: tl.constexpr, BITS: tl.constexpr, COLS: tl.constexpr):
    """int32 words of decoding plane ``v`` at ``ptrs`` (pointers to plane 0 of a tile's columns).

    3-bit plane 3 does not exist in memory: bit 3 of each nibble of planes 0/1/2 is bit 0/1/2 of
    its code, gathered into a nibble word with three shifts and one three-way OR.
    """
    if BITS == 3 and v == 3:
        a = tl.load(ptrs, mask=mask, other=0)
        b = tl.load(ptrs + COLS, mask=mask, other=0)
        c = tl.load(ptrs + 2 * COLS, mask=mask, other=0)
        return ((a >> 3) & 0x11111111) | ((b >> 2) & 0x22222222) | ((c >> 1) & 0x44444444)
    else:
        return tl.load(ptrs + v * COLS, mask=mask, other=0)


MAGIC = 150 << 23  # the biased fp32 exponent of 2**23, in place (bits 23..30)


@triton.jit
def code_minus_zero(w, w_hi, zero, magic, shift: tl.constexpr, CODE_BITS: tl.constexpr):
    """``code - zero`` as an exact fp32, for the code at bit ``shift`` of ``w``: one LOP3, one FADD.

    No integer-to-float conversion (a quarter-rate instruction): OR-ing the biased exponent
    ``150 - s`` above a field at bit ``s`` makes the word read as the float
    ``2**(23 - s) * (1 + code * 2**s / 2**23) = 2**(23 - s) + code``, and subtracting
    ``2**(23 - s) + zero`` (exact; once per group and row) leaves ``code - zero``. Fields that
    reach past bit 22 are taken from ``w_hi = w >> 16`` (one shift per word). ``magic`` is
    ``MAGIC`` passed as a runtime argument: a register operand lets the compiler fuse the AND
    with the OR into one three-input LOP3 (with two immediates it emits two).
    """
    if shift + CODE_BITS <= 23:
        bits = (w & (((1 << CODE_BITS) - 1) << shift)) | (magic - (shift << 23))
        return bits.to(tl.float32, bitcast=True) - (zero + (1 << (23 - shift)))
    else:
        bits = (w_hi & (((1 << CODE_BITS) - 1) << (shift - 16))) | (magic + ((16 - shift) << 23))
        return bits.to(tl.float32, bitcast=True) - (zero + (1 << (39 - shift)))
