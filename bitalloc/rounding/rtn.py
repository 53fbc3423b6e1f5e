"""Round-to-nearest (RTN) group quantization, the baseline every plan is evaluated with.

Asymmetric: per group of ``group_size`` consecutive input columns, scale = (max - min) /
(2^bits - 1) and zero = round(-min / scale), both stored as fp16 (the storage that the
budget prices); codes q = clamp(round(w / scale) + zero, 0, 2^bits - 1); w_hat = (q - zero)
* scale. Symmetric: scale = max|w| / (2^(bits-1) - 1/2), zero fixed at the grid centre.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..plan import Candidate

Runs = list[tuple[int, int, "Candidate"]]  # (first column, end column, candidate) over a tensor's inputs


def rtn_dequantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """Fake-quantize a [out, in] weight: returns the dequantized weight in w's dtype."""
    out_f, in_f = w.shape
    pad = (-in_f) % group_size
    x = w.float()
    if pad:  # the last group of a row is shorter; padding with its own values keeps its range
        x = torch.cat([x, x[:, -1:].expand(out_f, pad)], dim=1)
    g = x.view(out_f, -1, group_size)
    scale, zero = rtn_params(g, bits, symmetric)
    return rtn_round(g, scale, zero, bits).view(out_f, -1)[:, :in_f].to(w.dtype)


def rtn_params(g: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable (scale, zero) of each group along the last axis (kept as size-1 dims)."""
    qmax = 2**bits - 1
    if symmetric:
        scale = (g.abs().amax(-1, keepdim=True) / (qmax / 2)).clamp_min(1e-8).half().float()
        return scale, torch.full_like(scale, (qmax + 1) / 2)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-8).half().float()
    return scale, torch.round(-lo / scale).half().float()


def rtn_round(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid point of (scale, zero) for every entry of ``x`` (dequantized, fp32)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def rtn_error(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """dW = RTN(w) - w in fp32."""
    return rtn_dequantize(w.float(), bits, group_size, symmetric) - w.float()


def fake_quantize(w: torch.Tensor, runs: Runs) -> torch.Tensor:
    """RTN over each run of input columns; runs start on group boundaries, so groups never straddle."""
    return torch.cat([rtn_dequantize(w[:, a:b], c.bits, c.group_size, c.symmetric) for a, b, c in runs], dim=1)
