"""The oracle: unpack, dequantize in fp32, matmul, in plain torch (any device).

Every Triton kernel is tested against these functions, and ``QuantLinear`` runs them on CPU.
"""

from __future__ import annotations

import torch

from .layout import KernelWeight, unrepack
from .codes import Codes


def dequantize(c: Codes) -> torch.Tensor:
    """fp32 ``[out, in]`` weight ``(q - zero) * scale``, group by group."""
    inp = c.shape[1]
    zeros = c.zeros.float().repeat_interleave(c.group_size, dim=1)[:, :inp]
    scales = c.scales.float().repeat_interleave(c.group_size, dim=1)[:, :inp]
    return (c.codes.float() - zeros) * scales


def linear(x: torch.Tensor, c: Codes) -> torch.Tensor:
    """``x @ W.T`` with ``W`` dequantized in fp32, accumulated in fp32, returned in ``x.dtype``."""
    return (x.float() @ dequantize(c).t()).to(x.dtype)


def kernel_linear(x: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    """``linear`` on a weight held in the kernels' layout."""
    return linear(x, unrepack(kw))
