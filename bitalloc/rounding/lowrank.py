"""BitsMoE's decomposition of one MoE layer and projection: a shared basis and one factor per expert.

All experts of a layer read the same input space (gate, up) or write the same output space (down).
Each expert weight is seen as a "space matrix" X_e [d, n] whose columns live in that shared space:
X_e = W_e^T for side "input" (W_e [n, d]) and X_e = W_e for side "output" (W_e [d, n]). The shared
basis B [r, d] holds, as rows, the top-r eigenvectors of G = sum_e p_e X_e X_e^T (p_e: the expert's
share of routed tokens, so rarely used experts steer the basis less); r = min(d, E * n) spans every
expert. Each expert keeps its coordinates F_e [r, n] in that basis (rank-major: row k is rank k,
scaled by that rank's singular value for the expert), and X_e = B^T F_e.

The basis is a function of the checkpoint and the routing shares alone (both recorded in the plan),
so ``bitalloc eval`` rebuilds it bit for bit without calibration text. It is stored in 16 bit: it is
rounded to fp16 *before* the factors are solved against it, so with every factor row at 16 bit the
reconstruction differs from W only by the factors' own fp16 rounding.

Factor rows are quantized by RTN, groups of ``group_size`` entries along each row (one scale per row
and group, as BitsMoE's kernels tile them); width 0 drops a row, width 16 keeps it in fp16.
:func:`apply_block` gives the reconstructed weights (``eval --plan``), :func:`store_block` the same
rounding as codes (a checkpoint, ``rounding.decomposed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..budget import BASIS_BITS
from ..errors import PlanError
from .base import QuantizedWeight
from .rtn import rtn_dequantize, rtn_quantize

if TYPE_CHECKING:
    from ..plan import Decomposition, DecomposedBlock

SIDES = ("input", "output")


def space_matrix(w: torch.Tensor, side: str) -> torch.Tensor:
    """[d, n]: the expert weight with its shared-space dimension first."""
    if side not in SIDES:
        raise ValueError(f"side {side!r} is not one of {SIDES}")
    return w.T if side == "input" else w


def from_space(x: torch.Tensor, side: str) -> torch.Tensor:
    """Inverse of :func:`space_matrix`."""
    return space_matrix(x, side)


def block_rank(basis_dim: int, factor_cols: int, n_experts: int) -> int:
    """Directions the shared basis needs to span every expert of the block."""
    return min(basis_dim, factor_cols * n_experts)


def slab_bounds(rank: int, rank_slab: int) -> list[tuple[int, int]]:
    """[start, stop) of each slab of ``rank_slab`` consecutive ranks (the last one may be shorter)."""
    return [(s, min(rank, s + rank_slab)) for s in range(0, rank, rank_slab)]


def shared_basis(xs: Sequence[torch.Tensor], shares: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [r, d] rounded to fp16, eigenvalues [r] descending) of G = sum_e p_e X_e X_e^T.

    Computed in float64 on the CPU so that allocation and evaluation, on any device, get the same basis.
    """
    d, n = xs[0].shape
    gram = torch.zeros(d, d, dtype=torch.float64)
    for x, p in zip(xs, shares):
        x64 = x.detach().to("cpu", torch.float64)
        gram += float(p) * (x64 @ x64.T)
    evals, evecs = torch.linalg.eigh(gram)
    r = block_rank(d, n, len(xs))
    order = torch.argsort(evals, descending=True)[:r]
    basis = evecs[:, order].T.contiguous()  # [r, d]
    return basis.to(torch.float16).to(torch.float32), evals[order].clamp_min(0)


def factors(basis: torch.Tensor, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """F_e [r, n] with X_e = B^T F_e (least squares against the fp16 basis; exact where B is square)."""
    pinv_t = torch.linalg.pinv(basis.double()).T  # [r, d]
    return [(pinv_t @ x.detach().to("cpu", torch.float64)).float() for x in xs]


def quantize_rows(f: torch.Tensor, width: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Factor rows at ``width``: 0 dropped, 16 fp16, else RTN with groups along each row."""
    if width == 0:
        return torch.zeros_like(f)
    if width == BASIS_BITS:
        return f.half().float()
    return rtn_dequantize(f, width, group_size, symmetric)


def quantize_factor(f: torch.Tensor, slabs: Sequence[tuple[int, int, int]], group_size: int,
                    symmetric: bool) -> torch.Tensor:
    """The factor with rows [start, stop) of every slab at its width (slabs tile the rows)."""
    return torch.cat([quantize_rows(f[a:b], w, group_size, symmetric) for a, b, w in slabs])


def reconstruct(basis: torch.Tensor, f_hat: torch.Tensor, side: str) -> torch.Tensor:
    """The expert weight from the (dequantized) factor and the fp16 basis; dropped rows are zero in f_hat."""
    return from_space(basis.T @ f_hat, side)


def decompose_block(weights: Sequence[torch.Tensor], block: "DecomposedBlock") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the fp16-valued basis B [rank, d], each expert's factor F_e [rank, n]) of the plan's ``block``: the basis
    rebuilt from ``weights`` and the block's routing shares, as at allocation. fp32 CPU tensors."""
    xs = [space_matrix(w.detach().float().cpu(), block.side) for w in weights]
    basis, _ = shared_basis(xs, block.routing_share)
    if basis.shape[0] != block.rank:
        raise PlanError(f"the plan's block layer {block.layer} {block.projection} has rank {block.rank}, the "
                        f"checkpoint's experts give {basis.shape[0]}: the plan was made for other weights")
    return basis, factors(basis, xs)


def expert_slabs(block: "DecomposedBlock", expert: int) -> list[tuple[int, int, int]]:
    """(start, stop, width) of every slab of ``expert``'s factor."""
    return [(s.start, s.stop, s.widths[expert]) for s in block.slabs]


def apply_block(weights: Sequence[torch.Tensor], block: "DecomposedBlock", decomposition: "Decomposition") -> list[torch.Tensor]:
    """Each expert's weight as the plan stores it: every factor slab at its width (RTN), times the fp16 basis.
    Returns fp32 CPU tensors."""
    basis, fs = decompose_block(weights, block)
    return [reconstruct(basis, quantize_factor(f, expert_slabs(block, e), decomposition.group_size,
                                               decomposition.symmetric), block.side) for e, f in enumerate(fs)]


FactorRows = QuantizedWeight | torch.Tensor  # RTN codes of a slab's rows, or the rows in fp16 (width 16)


@dataclass
class StoredBlock:
    """What a checkpoint holds of one decomposed block: the basis rows it keeps and each expert's stored slabs."""

    basis: torch.Tensor  # fp16 [rank_kept, d]: the rows of the kept slabs, in order
    factors: list[dict[int, FactorRows]]  # per expert: slab index -> its rows (dropped slabs absent)


def store_block(weights: Sequence[torch.Tensor], block: "DecomposedBlock", decomposition: "Decomposition") -> StoredBlock:
    """The stored form of :func:`apply_block`'s reconstruction: the same basis and factors, each stored slab's rows
    as RTN codes (``.dequantize()`` is exactly :func:`quantize_rows`) or fp16."""
    basis, fs = decompose_block(weights, block)
    kept = torch.tensor([k for s in block.slabs if s.basis_kept for k in range(s.start, s.stop)], dtype=torch.long)
    stored = []
    for e, f in enumerate(fs):
        stored.append({i: _store_rows(f[a:b], w, decomposition.group_size, decomposition.symmetric)
                       for i, (a, b, w) in enumerate(expert_slabs(block, e)) if w})
    return StoredBlock(basis[kept].half(), stored)


def _store_rows(f: torch.Tensor, width: int, group_size: int, symmetric: bool) -> FactorRows:
    return f.half() if width == BASIS_BITS else rtn_quantize(f, width, group_size, symmetric)


def kept_offsets(block: "DecomposedBlock") -> list[Optional[int]]:
    """Each slab's first row in the stored (kept) basis; None for a slab the basis drops."""
    out, pos = [], 0
    for s in block.slabs:
        out.append(pos if s.basis_kept else None)
        pos += (s.stop - s.start) if s.basis_kept else 0
    return out
