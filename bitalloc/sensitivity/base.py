"""What every score family sees of one unit, and the conventions they share.

The calibration pass (``collect.py``) materialises one decoder layer at a time; while a layer
is in memory it builds a :class:`UnitContext` for each of its units and hands it to every
family. A family returns, per name it defines, the predicted error of each SLAB_WIDTH-column
slab of the unit for each candidate ([S, C] numpy), plus optional per-unit diagnostics.
All errors are "larger = worse"; families that predict a loss increase are in nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..plan import Candidate
from .table import SLAB_WIDTH


@dataclass
class UnitContext:
    """Statistics of one unit gathered on the calibration set (fp32 tensors on the pass device).

    ``h`` is the input second moment sum_t x_t x_t^T over the ``tokens`` inputs that reached
    the unit (routed tokens for an expert); an embedding has no input matrix and carries
    ``row_weights`` instead (how often each row was looked up). The gradient statistics are
    over ``n_seq`` calibration sequences of ``n_pred`` predicted tokens each.
    """

    w: torch.Tensor  # [out, in]
    candidates: list[Candidate]
    dws: list[torch.Tensor]  # RTN error of each candidate, like w
    h: Optional[torch.Tensor]  # [in, in]
    row_weights: Optional[torch.Tensor]  # [out], embeddings only
    tokens: int
    n_seq: int
    n_pred: int
    fisher: torch.Tensor  # mean_s g_s^2, like w
    grad_mean: torch.Tensor  # mean_s g_s, like w
    dots: torch.Tensor  # [n_seq, C, S]: g_s . dW_c restricted to each slab
    sketch: torch.Tensor  # [n_seq, sketch_dim]: random projection of each g_s
    lim: float  # layer input modification of the unit's decoder layer
    zd: float  # share of the layer's weights with |z| > ZD_THRESHOLD

    @property
    def n_slabs(self) -> int:
        return -(-self.w.shape[1] // SLAB_WIDTH)


@dataclass
class FamilyOutput:
    """A family's answer for one unit.

    errors: name -> [S, C] predicted error per slab and candidate (what the allocator can use);
    stats: name -> one number per unit (diagnostics, e.g. an effective rank);
    vectors: name -> a 1-D array per unit of any length (e.g. energy per rank slab).
    """

    errors: dict[str, np.ndarray]
    stats: dict[str, float] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


def slab_sums_torch(per_col: torch.Tensor) -> torch.Tensor:
    """[..., in] -> [..., S]: sums over SLAB_WIDTH-column slabs of the last axis."""
    n = -(-per_col.shape[-1] // SLAB_WIDTH)
    padded = torch.nn.functional.pad(per_col, (0, n * SLAB_WIDTH - per_col.shape[-1]))
    return padded.view(*per_col.shape[:-1], n, SLAB_WIDTH).sum(-1)


def slab_sums(per_col: torch.Tensor) -> np.ndarray:
    """[in] per-column values -> [S] sums over SLAB_WIDTH-column slabs (float64 numpy)."""
    return slab_sums_torch(per_col.double()).cpu().numpy()


def per_candidate(ctx: UnitContext, column_fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """[S, C]: ``column_fn(dW_c)`` gives per-column errors; summed per slab for each candidate."""
    return np.stack([slab_sums(column_fn(dw)) for dw in ctx.dws], axis=1)


def scaled_noise(ctx: UnitContext, score: float) -> np.ndarray:
    """[S, C] = score * (per-slab squared RTN error) / ||W||^2.

    How a family that yields one number per unit (an importance or an energy) becomes an error
    per candidate: the score times the candidate's relative quantization noise, so wider
    candidates cost less and the unit total is ``score * ||dW_c||^2 / ||W||^2``.
    """
    norm = float(ctx.w.double().pow(2).sum()) or 1.0
    return per_candidate(ctx, lambda dw: dw.pow(2).sum(0)) * (score / norm)


def singular_energies(m: torch.Tensor, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Squared singular values of ``m``, descending, from the eigenvalues of its smaller Gram matrix (in ``dtype``)."""
    m = m.to(dtype)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return np.clip(torch.linalg.eigvalsh(gram).flip(0).cpu().numpy(), 0, None)


def spectrum_stats(sq: np.ndarray, prefix: str, k: int) -> dict[str, float]:
    """Effective rank and top-k energy share of a spectrum of squared singular values.

    Effective rank is exp(entropy) of the normalised energies (Roy & Vetterli 2007): 1 for a
    rank-1 matrix, n for n equal singular values.
    """
    sq = np.sort(np.clip(np.asarray(sq, dtype=np.float64), 0, None))[::-1]
    total = sq.sum()
    if total <= 0:
        return {f"{prefix}_eff_rank": 0.0, f"{prefix}_top_energy": 0.0}
    p = sq[sq > 0] / total
    return {f"{prefix}_eff_rank": float(np.exp(-(p * np.log(p)).sum())),
            f"{prefix}_top_energy": float(sq[:k].sum() / total)}
