"""The oracle: unpack, dequantize in fp32, matmul, in plain torch (any device).

Every Triton kernel is tested against these functions, and ``QuantLinear`` runs them on CPU.
"""

from __future__ import annotations

import torch

from .layout import KernelWeight, unrepack
from .codes import Codes


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """fp32 ``(q - zero) * scale`` of ``[rows, n]`` codes with one scale and zero per row and group of columns
    (any width: BitsMoE's factor slabs use 1 and 6 bits too, which ``Codes`` does not hold)."""
    n = codes.shape[1]
    zeros = zeros.float().repeat_interleave(group_size, dim=1)[:, :n]
    scales = scales.float().repeat_interleave(group_size, dim=1)[:, :n]
    return (codes.float() - zeros) * scales


def dequantize(c: Codes) -> torch.Tensor:
    """fp32 ``[out, in]`` weight ``(q - zero) * scale``, group by group."""
    return dequantize_groups(c.codes, c.scales, c.zeros, c.group_size)


def linear(x: torch.Tensor, c: Codes) -> torch.Tensor:
    """``x @ W.T`` with ``W`` dequantized in fp32, accumulated in fp32, returned in ``x.dtype``."""
    return (x.float() @ dequantize(c).t()).to(x.dtype)


def kernel_linear(x: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    """``linear`` on a weight held in the kernels' layout."""
    return linear(x, unrepack(kw))
