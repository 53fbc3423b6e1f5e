"""The compressed-tensors ``pack-quantized`` tensors of one linear, read and written exactly.

A quantized checkpoint stores, per module (asymmetric int, group strategy):

* ``weight_packed``: int32 ``[out, ceil(in * bits / 32)]``, codes packed densely along the input
  dimension, 32 codes in exactly ``bits`` words, codes straddling word boundaries (3-bit).
* ``weight_scale``: fp16/bf16 ``[out, ceil(in / group)]``.
* ``weight_zero_point``: int32 ``[ceil(out * bits / 32), ceil(in / group)]``: the zero points packed
  at the code width along the *output* dimension (``packed_dim=0``).
* ``weight_shape``: int ``[2]``, the unpacked ``(out, in)``.

Code convention. bitalloc codes are unsigned, ``q`` and ``zero`` in ``0 .. 2**bits - 1``, and
``w = (q - zero) * scale``. compressed-tensors quantizes to *signed* int8 ``q_s`` in
``-2**(bits-1) .. 2**(bits-1) - 1`` with a signed zero point ``z_s`` and dequantizes as
``(q_s - z_s) * scale``; ``pack_to_int32`` adds the offset ``2**(bits-1)`` before packing and
``unpack_from_int32`` subtracts it. So ``q = q_s + 2**(bits-1)`` and ``zero = z_s + 2**(bits-1)``:
the difference, hence the weight, is unchanged, and the bits in the packed words *are* the
unsigned codes. The packing itself is the library's own ``pack_to_int32`` / ``unpack_from_int32``.

This module imports compressed-tensors (which pulls in pydantic and transformers); the kernels,
the reference and the module do not, so a GPU box with only torch and triton runs them.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from .codes import Codes

def _to_signed(t: torch.Tensor, bits: int) -> torch.Tensor:
    return (t.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _to_unsigned(t: torch.Tensor, bits: int) -> torch.Tensor:
    return (t.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight_packed`` of unsigned codes [out, in] (any integer dtype holding 0..2**bits-1)."""
    return pack_to_int32(_to_signed(codes, bits), bits)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight_zero_point`` of unsigned zero points [out, groups]: packed along the output dimension."""
    return pack_to_int32(_to_signed(zeros, bits), bits, packed_dim=0)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Unsigned uint8 codes [out, in] of ``weight_packed``."""
    return _to_unsigned(unpack_from_int32(packed, bits, torch.Size(shape)), bits)


def unpack_zeros(packed: torch.Tensor, bits: int, rows: int, groups: int) -> torch.Tensor:
    """Unsigned uint8 zero points [rows, groups] of ``weight_zero_point``.

    packed_dim=0 is a transpose around the packed_dim=1 path. Transposing here into a fresh dense
    tensor sidesteps 0.20's 4-bit fast path, which views a transposed tensor as bytes and fails
    when rows * bits <= 32 (the [groups, 1] transpose keeps a non-unit stride on its last dim).
    """
    zp_t = torch.empty_like(packed.t(), memory_format=torch.contiguous_format)
    zp_t.copy_(packed.t())
    return _to_unsigned(unpack_from_int32(zp_t, bits, torch.Size((groups, rows))).t(), bits)


def pack(c: Codes) -> dict[str, torch.Tensor]:
    """The compressed-tensors ``pack-quantized`` tensors of one module (names without prefix)."""
    return {
        "weight_packed": pack_codes(c.codes, c.bits),
        "weight_scale": c.scales,
        "weight_zero_point": pack_zeros(c.zeros, c.bits),
        "weight_shape": torch.tensor(c.shape, dtype=torch.int64),
    }


def unpack(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> Codes:
    """Read one module's ``pack-quantized`` tensors back into unsigned codes, exactly."""
    out, inp = (int(v) for v in tensors["weight_shape"].tolist())
    scales = tensors["weight_scale"]
    return Codes(unpack_codes(tensors["weight_packed"], bits, (out, inp)), scales,
                 unpack_zeros(tensors["weight_zero_point"], bits, out, scales.shape[1]), bits, group_size)
