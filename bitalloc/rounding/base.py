"""What every rounding method returns: integer codes with their per-group scales and zeros.

A plan decides each tensor's width, group size and symmetry; a rounding method (RTN, GPTQ, GSQ,
DiscQuant) decides the integer codes. Keeping codes, scales and zeros (not only dequantized floats)
is what lets the checkpoint writer store exactly what was evaluated, and lets tests check that a
written and re-loaded checkpoint dequantizes bit for bit to the in-memory weights.

Convention (the one compressed-tensors uses for asymmetric int schemes, shifted to unsigned):
codes q in [0, 2^bits - 1], w_hat = (q - zero) * scale, scale and zero one per group of
``group_size`` consecutive input columns, scale representable in fp16 (and > 0), zero an integer
(symmetric: zero = 2^(bits-1), the grid centre). Asymmetric zeros lie in [0, 2^bits - 1] whenever
the group holds values of both signs (always, in practice, at 32 or more columns per group); a
group of one sign has a grid that does not contain 0, and its zero falls outside that range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """One [out, in] weight as integer codes plus per-group (scale, zero).

    ``codes``: uint8 [out, in]; ``scale``: float32 [out, groups] holding fp16-representable values;
    ``zero``: float32 [out, groups] holding integers; ``groups = ceil(in / group_size)``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool = False

    def dequantize(self) -> torch.Tensor:
        """w_hat in float32, [out, in]."""
        idx = self.column_groups()
        return (self.codes.float() - self.zero[:, idx]) * self.scale[:, idx]

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column, [in]."""
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1


@dataclass
class SegmentedWeight:
    """A weight whose input columns are split into runs with different candidates (a plan's segments).

    ``parts``: (first column, QuantizedWeight of that run's columns), in column order.
    """

    parts: list[tuple[int, QuantizedWeight]]

    def dequantize(self) -> torch.Tensor:
        return torch.cat([q.dequantize() for _, q in self.parts], dim=1)


Quantized = QuantizedWeight | SegmentedWeight


def as_parts(q: Quantized) -> list[tuple[int, QuantizedWeight]]:
    """Every result as a list of column runs, so methods that refine codes treat both kinds alike."""
    return q.parts if isinstance(q, SegmentedWeight) else [(0, q)]


def from_parts(parts: list[tuple[int, QuantizedWeight]]) -> Quantized:
    return parts[0][1] if len(parts) == 1 else SegmentedWeight(parts)
