"""The kernels' own weight layout ("tiled planes"), made from codes at load time, and back.

Why not run on compressed-tensors' dense packing: there, code ``k`` of a row sits at bit ``k*bits``,
so 3-bit codes straddle words and a kernel needs a different shift and mask for each of 32
positions; and the codes of one word are 8 (or 16) consecutive inputs, so each product needs its
own activation. In this layout the GEMV decodes a code with one AND/OR (a LOP3) and one FADD:

* ``K`` is padded to a multiple of ``TILE = 512`` inputs. A tile is ``COLS = 16`` word columns
  times ``SLICES = 32`` slices; input ``k = tile*512 + j*16 + c`` is slice ``j``, column ``c``.
  A slice is 16 consecutive inputs, so the activations a slice needs are one contiguous 16-vector,
  and a slice never straddles a group (16 divides 32, 64 and 128).
* Each column holds its 32 codes in exactly ``bits`` int32 words ("planes"), stored as
  ``[out, tile, plane, column]``: a program reads, for each plane, 16 adjacent words per row.
  For 2/4/8 bits, plane ``v`` holds slices ``v*cpw .. v*cpw + cpw - 1`` (``cpw = 32 / bits``
  codes per word) at bit ``i*bits``.
* 3 bits (32 codes in 3 words, no waste): planes 0..2 hold slices 0..23 as *nibbles* (code in
  bits 0..2 of nibble ``i``), and the spare bit 3 of nibble ``i`` in plane 0/1/2 holds bit 0/1/2
  of the code of slice ``24 + i``. Three shift-and-masks and an OR per three words rebuild a
  fourth nibble word for slices 24..31 (virtual plane 3); then 3-bit decodes exactly like 4-bit.
* Scale and zero of a group sit side by side (``scale_zero [out, groups, 2]``, the scale's
  dtype; zeros are integers <= 255, exact in fp16 and bf16): one sector feeds both loads.

Inside a word, a code at bit ``s`` becomes an exact float with one AND/OR and one FADD: OR-ing
the biased exponent ``150 - s`` over it reads as ``2**(23 - s) + code``. Codes above bit 23 are
read from ``word >> 16``, one shift per word.

Load cost: ``repack`` is a handful of integer tensor ops over the codes (linear in the number of
weights, on whatever device holds them), once per layer at load; it adds at most 511 padded
inputs per row and no other bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codes import Codes

COLS = 16
SLICES = 32
TILE = COLS * SLICES


@dataclass(frozen=True)
class PlaneFormat:
    """How a width is laid out in planes; the kernels receive these as compile-time constants."""

    bits: int
    vwords: int  # planes the kernel decodes (3-bit: 3 stored + 1 rebuilt)
    codes_per_word: int
    spacing: int  # bits between consecutive codes of a word
    code_bits: int  # bits of each code (mask width)


def plane_format(bits: int) -> PlaneFormat:
    """The plane format of a width: 2/4/8 pack ``32/bits`` codes per word; 3 bits as nibbles."""
    if bits == 3:
        return PlaneFormat(3, 4, 8, 4, 3)
    return PlaneFormat(bits, bits, 32 // bits, bits, bits)


@dataclass(frozen=True)
class KernelWeight:
    """One linear in the kernels' layout. ``qweight`` int32 ``[out, tiles * bits * COLS]``."""

    qweight: torch.Tensor
    scale_zero: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def tiles(self) -> int:
        return self.qweight.shape[1] // (self.bits * COLS)


def _wrap_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _tiles(inp: int) -> int:
    return -(-inp // TILE)


def repack(c: Codes) -> KernelWeight:
    """Codes -> kernel layout (exact; ``unrepack`` inverts it)."""
    out, inp = c.shape
    tiles = _tiles(inp)
    pf = plane_format(c.bits)
    q = torch.nn.functional.pad(c.codes, (0, tiles * TILE - inp)).to(torch.int64)
    q = q.view(out, tiles, pf.vwords, pf.codes_per_word, COLS)  # slice j = v * cpw + i
    if c.bits == 3:
        spare = torch.stack([(q[:, :, 3] >> v) & 1 for v in range(3)], dim=2)
        q = q[:, :, :3] | (spare << 3)
    shifts = (torch.arange(pf.codes_per_word, device=q.device) * pf.spacing).view(1, 1, 1, -1, 1)
    words = (q << shifts).sum(dim=3)  # disjoint bit fields: the sum is an OR
    groups_padded = tiles * TILE // c.group_size
    sz = torch.zeros(out, groups_padded, 2, dtype=c.scales.dtype, device=c.scales.device)
    sz[:, : c.scales.shape[1], 0] = c.scales
    sz[:, : c.scales.shape[1], 1] = c.zeros.to(c.scales.dtype)
    return KernelWeight(_wrap_int32(words).reshape(out, -1).contiguous(), sz, c.bits, c.group_size,
                        inp, out)


def unrepack(kw: KernelWeight) -> Codes:
    """Kernel layout -> codes, exactly."""
    pf = plane_format(kw.bits)
    out, tiles = kw.out_features, kw.tiles
    words = kw.qweight.to(torch.int64).view(out, tiles, kw.bits, 1, COLS) & 0xFFFFFFFF
    shifts = (torch.arange(pf.codes_per_word, device=words.device) * pf.spacing).view(1, 1, 1, -1, 1)
    fields = (words >> shifts) & ((1 << pf.spacing) - 1)  # [out, tiles, planes, cpw, COLS]
    if kw.bits == 3:
        last = sum(((fields[:, :, v] >> 3) & 1) << v for v in range(3)).unsqueeze(2)
        fields = torch.cat([fields & 7, last], dim=2)
    codes = fields.reshape(out, tiles * TILE)[:, : kw.in_features].to(torch.uint8)
    groups = -(-kw.in_features // kw.group_size)
    sz = kw.scale_zero[:, :groups]
    return Codes(codes.contiguous(), sz[..., 0].contiguous(), sz[..., 1].to(torch.uint8).contiguous(),
                 kw.bits, kw.group_size)
