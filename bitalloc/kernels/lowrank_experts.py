"""MoE experts stored as a shared basis per projection plus per-expert factors (BitsMoE), in plain torch.

Each projection of a layer's experts is one basis ``B [r, d]`` (fp16, the rows a checkpoint keeps) shared by
all experts, and one factor ``F_e [r, n]`` per expert whose rows are stored in slabs, each slab either fp16
or integer codes with a scale and a zero point per row and group of columns; a slab the expert does not
store is zero. Gate and up read the hidden state: ``W_e = F_e^T B``, so ``x W_e^T = (x B^T) F_e``; down
writes it: ``W_e = B^T F_e``, so ``a W_e^T = (a F_e^T) B``.

:class:`LowRankExperts` is transformers' fused experts computation (same ``forward`` signature) on that
form, in the order a fused kernel would use (docs/bitsmoe.md): ``x B^T`` of gate and up once per token for
all experts, then per expert the factor products, the down factors' outputs combined by the routing weights
in basis coordinates, and the down basis applied once per token. Factors are dequantized on each call, in
fp32 as the reference linear does (``reference.py``), so memory holds the codes, not a dense copy; every
product is accumulated in fp32 and the result returned in the input's dtype.

Self-contained, like the rest of this package: it imports nothing else from bitalloc.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .reference import dequantize_groups


class FactorSlab(nn.Module):
    """Rows ``start .. start + rows`` (coordinates in the stored basis) of one expert's factor.

    Either ``values`` (fp16 ``[rows, n]``) or unsigned ``codes`` (uint8 ``[rows, n]``) with ``scale`` (fp16) and
    ``zero`` (uint8), ``[rows, ceil(n / group_size)]``: ``(codes - zero) * scale`` group by group.
    """

    def __init__(self, start: int, values: Optional[torch.Tensor] = None, codes: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None, group_size: int = 0):
        super().__init__()
        if (values is None) == (codes is None):
            raise ValueError("a factor slab holds either fp16 values or codes with scales and zeros")
        self.start, self.group_size = start, group_size
        self.register_buffer("values", values)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        if codes is not None:
            groups = -(-codes.shape[1] // group_size) if group_size > 0 else 0
            if scale is None or zero is None or tuple(scale.shape) != (codes.shape[0], groups) \
                    or tuple(zero.shape) != tuple(scale.shape):
                raise ValueError(f"codes {tuple(codes.shape)} in groups of {group_size} need scale and zero "
                                 f"[{codes.shape[0]}, {groups}]")

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, n)``."""
        rows, cols = (self.values if self.values is not None else self.codes).shape
        return int(rows), int(cols)

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[rows, n]``."""
        if self.values is not None:
            return self.values.float()
        return dequantize_groups(self.codes, self.scale, self.zero, self.group_size)


class SharedBasisFactors(nn.Module):
    """One projection of every expert of a layer: the basis ``[r, d]`` and each expert's factor slabs."""

    def __init__(self, basis: torch.Tensor, slabs: list[list[FactorSlab]], cols: int):
        super().__init__()
        rank = basis.shape[0]
        for e, expert in enumerate(slabs):
            for s in expert:
                rows, n = s.shape
                if s.start < 0 or s.start + rows > rank or n != cols:
                    raise ValueError(f"expert {e}: a slab of {rows} x {n} at row {s.start} does not fit a rank-{rank} "
                                     f"basis with {cols}-column factors")
        self.register_buffer("basis", basis)
        self.slabs = nn.ModuleList(nn.ModuleList(expert) for expert in slabs)
        self.cols = cols

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def factor(self, expert: int) -> torch.Tensor:
        """fp32 ``F_e [r, n]``: the stored slabs in place, zero elsewhere."""
        f = self.basis.new_zeros(self.rank, self.cols, dtype=torch.float32)
        for s in self.slabs[expert]:
            f[s.start:s.start + s.shape[0]] = s.dequantize()
        return f


class LowRankExperts(nn.Module):
    """transformers' fused MoE experts computation (same ``forward`` signature) over shared bases and factors."""

    def __init__(self, gate: SharedBasisFactors, up: SharedBasisFactors, down: SharedBasisFactors,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        n = len(gate.slabs)
        if len(up.slabs) != n or len(down.slabs) != n:
            raise ValueError(f"gate, up and down hold {n}, {len(up.slabs)} and {len(down.slabs)} experts")
        dims = {gate.basis.shape[1], up.basis.shape[1], down.basis.shape[1]}
        if len(dims) != 1 or gate.cols != up.cols or down.cols != gate.cols:
            raise ValueError("gate and up must read the hidden size that down writes, and down must read their "
                             "output width")
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act_fn = act_fn
        self.num_experts = n

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        gate_coords = x @ self.gate_proj.basis.float().T  # [tokens, r]: shared by every expert
        up_coords = x @ self.up_proj.basis.float().T
        down_coords = x.new_zeros(x.shape[0], self.down_proj.rank)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            a = self.act_fn(gate_coords[token] @ self.gate_proj.factor(e)) * (up_coords[token] @ self.up_proj.factor(e))
            y = (a @ self.down_proj.factor(e).T) * top_k_weights[token, slot, None].float()
            down_coords.index_add_(0, token, y)
        return (down_coords @ self.down_proj.basis.float()).to(hidden_states.dtype)
