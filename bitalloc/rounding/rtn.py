"""Round-to-nearest (RTN) group quantization, the baseline every plan is evaluated with.

Asymmetric: per group of ``group_size`` consecutive input columns, scale = (max - min) /
(2^bits - 1) and zero = round(-min / scale), both stored as fp16 (the storage that the
budget prices); codes q = clamp(round(w / scale) + zero, 0, 2^bits - 1); w_hat = (q - zero)
* scale. Symmetric: scale = max|w| / (2^(bits-1) - 1/2), zero fixed at the grid centre.

Degenerate groups. A scale computed from a group's range can underflow fp16 (it used to become
0 and the group NaN); scales are floored at fp16's smallest positive value, which leaves every
scale that fp16 could hold unchanged. A group whose values are all equal (c) has no range at all:
it gets scale |c| and the code next to its zero (zero = 1 with q = 0 for c < 0, zero = 0 with
q = 1 for c > 0; symmetric: q = zero +- 1), so it is reproduced exactly whenever c is
fp16-representable; c = 0 gives q = zero. Groups with a range are never affected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import QuantizedWeight

if TYPE_CHECKING:
    from ..plan import Candidate

Runs = list[tuple[int, int, "Candidate"]]  # (first column, end column, candidate) over a tensor's inputs
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): the floor that keeps a scale non-zero in storage


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedWeight:
    """Codes, scales and zeros of a [out, in] weight; ``.dequantize()`` equals :func:`rtn_dequantize`."""
    g = group_view(w.float(), group_size)
    scale, zero = rtn_params(g, bits, symmetric)
    cols = w.shape[1]
    codes = rtn_codes(g, scale, zero, bits).flatten(1)[:, :cols]
    return QuantizedWeight(codes.to(torch.uint8), scale[..., 0], zero[..., 0], bits, group_size, symmetric)


def rtn_dequantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """Fake-quantize a [out, in] weight: returns the dequantized weight in w's dtype."""
    g = group_view(w.float(), group_size)
    scale, zero = rtn_params(g, bits, symmetric)
    return rtn_round(g, scale, zero, bits).flatten(1)[:, :w.shape[1]].to(w.dtype)


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, groups, group_size] view; the last group of a row is padded with its own last value,
    which keeps its range."""
    out_f, in_f = x.shape
    pad = (-in_f) % group_size
    if pad:
        x = torch.cat([x, x[:, -1:].expand(out_f, pad)], dim=1)
    return x.view(out_f, -1, group_size)


def rtn_params(g: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable (scale, zero) of each group along the last axis (kept as size-1 dims)."""
    qmax = 2**bits - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    if symmetric:
        scale = g.abs().amax(-1, keepdim=True) / (qmax / 2)
        zero = torch.full_like(scale, (qmax + 1) / 2)
    else:
        scale = (hi - lo) / qmax
        zero = None
    scale = scale.half().float().clamp_min(FP16_TINY)
    const = hi == lo
    scale = torch.where(const & (lo != 0), lo.abs().half().float(), scale)
    if zero is None:
        zero = torch.where(const, (lo < 0).float(), torch.round(-lo / scale).half().float())
    return scale, zero


def rtn_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as floats) of the nearest grid point of (scale, zero) for every entry of ``x``."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def rtn_round(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid point of (scale, zero) for every entry of ``x`` (dequantized, fp32)."""
    return (rtn_codes(x, scale, zero, bits) - zero) * scale


def rtn_error(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """dW = RTN(w) - w in fp32."""
    return rtn_dequantize(w.float(), bits, group_size, symmetric) - w.float()


def fake_quantize(w: torch.Tensor, runs: Runs) -> torch.Tensor:
    """RTN over each run of input columns; runs start on group boundaries, so groups never straddle."""
    return torch.cat([rtn_dequantize(w[:, a:b], c.bits, c.group_size, c.symmetric) for a, b, c in runs], dim=1)
