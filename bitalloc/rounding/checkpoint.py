"""One quantized module in compressed-tensors' ``pack-quantized`` form, both ways, exactly.

The bit-level conversion (signed offset, the library's ``pack_to_int32`` / ``unpack_from_int32``) is
``bitalloc.kernels.packing``'s, shared with the kernels; this module adds what a checkpoint needs on
top: the symmetric case (no stored zero point) and validation of every tensor.

Code convention. bitalloc's codes are unsigned: ``q`` in ``0 .. 2**b - 1``, ``w = (q - zero) * scale``
(symmetric: ``zero = 2**(b-1)``). compressed-tensors quantizes to *signed* int8 ``q_s`` in
``-2**(b-1) .. 2**(b-1) - 1`` and dequantizes ``(q_s - z_s) * scale`` (symmetric: no zero point,
``q_s * scale``). Its ``pack_to_int32`` adds ``2**(b-1)`` before packing and ``unpack_from_int32``
subtracts it. So we hand it ``q_s = q - 2**(b-1)`` and ``z_s = zero - 2**(b-1)``: the difference,
hence every weight, is unchanged, the bits in the packed words are our unsigned codes, and a
symmetric scheme (``zero = 2**(b-1)``, ``z_s = 0``) needs no stored zero point, as the library expects.

Tensors of one module: ``weight_packed`` int32 ``[out, ceil(in * b / 32)]`` (codes packed densely
along the input, 32 codes in exactly ``b`` words); ``weight_scale`` fp16 ``[out, groups]``;
``weight_zero_point`` int32 ``[ceil(out * b / 32), groups]`` (zero points packed at the code width
along the *output* dimension, asymmetric only); ``weight_shape`` int64 ``[2]``.

What the format cannot hold: a zero point outside ``0 .. 2**b - 1`` (a group whose values all
share one sign, which RTN can give on tiny groups; compressed-tensors' own quantizer widens every
range to include 0 to avoid it) and a scale that is not an fp16 value. Both are refused by name.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError, OutputError
from ..plan import Candidate
from .base import QuantizedWeight

FORMAT = "pack-quantized"
SCALE_DTYPE = torch.float16
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")  # one module's tensors


def pack(q: QuantizedWeight, name: str) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one module (local names), after checking ``q`` fits the format."""
    from ..kernels.packing import pack_codes, pack_zeros

    _check_storable(q, name)
    out = {"weight_packed": pack_codes(q.codes, q.bits),
           "weight_scale": q.scale.to(SCALE_DTYPE).contiguous(),
           "weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64)}
    if not q.symmetric:
        out["weight_zero_point"] = pack_zeros(q.zero.to(torch.uint8), q.bits)
    return out


def _check_storable(q: QuantizedWeight, name: str) -> None:
    groups = -(-q.codes.shape[1] // q.group_size)
    if q.codes.dtype != torch.uint8 or tuple(q.scale.shape) != (q.codes.shape[0], groups) \
            or q.zero.shape != q.scale.shape:
        raise OutputError(f"{name}: codes must be uint8 [out, in] with scale and zero [out, {groups}]; got "
                          f"{q.codes.dtype} {tuple(q.codes.shape)}, {tuple(q.scale.shape)}, {tuple(q.zero.shape)}")
    if q.codes.numel() and int(q.codes.max()) > q.qmax:
        raise OutputError(f"{name}: a code exceeds {q.qmax}, the largest {q.bits}-bit code")
    if not torch.equal(q.scale.to(SCALE_DTYPE).float(), q.scale.float()) or not bool((q.scale > 0).all()):
        raise OutputError(f"{name}: scales must be positive fp16 values (the format stores them in fp16)")
    if q.symmetric:
        if not bool((q.zero == 1 << (q.bits - 1)).all()):
            raise OutputError(f"{name}: a symmetric scheme has zero {1 << (q.bits - 1)} in every group")
        return
    bad = (q.zero != q.zero.round()) | (q.zero < 0) | (q.zero > q.qmax)
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise OutputError(f"{name}: row {row} group {group} has zero point {float(q.zero[row, group])}, outside the "
                          f"integers 0..{q.qmax} that pack-quantized stores at {q.bits} bits (a group whose values "
                          "all share one sign); quantize it with a symmetric candidate or a larger group")


def unpack(tensors: dict[str, torch.Tensor], choice: Candidate, name: str) -> QuantizedWeight:
    """Read one module's tensors back into unsigned codes, validating every shape and dtype first."""
    from ..kernels.packing import unpack_codes, unpack_zeros

    bits, group = choice.bits, choice.group_size
    shape = tensors.get("weight_shape")
    if shape is None or shape.numel() != 2:
        raise CheckpointError(f"{name}: weight_shape must hold (out, in), got {None if shape is None else shape.tolist()}")
    rows, cols = (int(v) for v in shape.tolist())
    groups = -(-cols // group)
    want = {"weight_packed": ((rows, -(-cols * bits // 32)), torch.int32),
            "weight_scale": ((rows, groups), None)}
    if not choice.symmetric:
        want["weight_zero_point"] = ((-(-rows * bits // 32), groups), torch.int32)
    for local, (dims, dtype) in want.items():
        t = tensors.get(local)
        if t is None or tuple(t.shape) != dims or (t.dtype != dtype if dtype else not t.is_floating_point()):
            got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise CheckpointError(f"{name}.{local}: expected {dtype or 'float'} {dims} for a [{rows}, {cols}] weight at "
                                  f"{bits} bits in groups of {group}, got {got}; the checkpoint is corrupt")
    codes = unpack_codes(tensors["weight_packed"], bits, (rows, cols))
    if choice.symmetric:
        zero = torch.full((rows, groups), float(1 << (bits - 1)))
    else:
        zero = unpack_zeros(tensors["weight_zero_point"], bits, rows, groups).float()
    return QuantizedWeight(codes, tensors["weight_scale"].float(), zero.contiguous(), bits, group, choice.symmetric)
