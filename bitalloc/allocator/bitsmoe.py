"""BitsMoE's joint problem: per-tensor groups and spectral slabs of MoE experts under one budget.

Plain arrays in, plain arrays out. Three kinds of groups share one column space, the per-tensor
candidates first (attention and other dense tensors, from a :class:`~.problem.Problem`), then the
spectral widths:

* a dense group takes one of the candidates, as in the per-tensor problem;
* an expert slab (layer, projection, expert, ranks) takes one width (0 = dropped), priced by
  ``budget.factor_bits`` and costed by the table's surrogate in loss units;
* a basis slab (layer, projection, ranks) is kept (16-bit rows of the shared basis) or dropped,
  at no error of its own; an expert slab may be stored only if its basis slab is kept (a link).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..budget import BASIS_BITS, factor_bits
from .linked import LinkedProblem
from .problem import Problem


@dataclass(frozen=True)
class SlabBlock:
    """One layer and projection: ``slab_rows[s]`` ranks per slab, factors of ``factor_cols`` columns."""

    name: str
    n_experts: int
    slab_rows: tuple[int, ...]
    factor_cols: int
    basis_dim: int
    expert_params: int  # parameters of the original expert tensors (what bpp counts)


@dataclass
class JointLayout:
    """Where each group of the joint problem came from, to read a solution back."""

    n_dense: int
    widths: tuple[int, ...]
    basis_groups: list[np.ndarray]  # per block: [S] group index
    expert_groups: list[np.ndarray]  # per block: [E, S] group index

    def decode(self, choice: np.ndarray, n_candidates: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """(dense choices, per block basis kept [S] bool, per block widths [E, S])."""
        widths = np.asarray(self.widths)
        kept = [widths[choice[g] - n_candidates] > 0 for g in self.basis_groups]
        chosen = [widths[choice[g] - n_candidates] for g in self.expert_groups]
        return choice[:self.n_dense], kept, chosen


def joint_problem(dense: Problem, blocks: Sequence[SlabBlock], costs: Sequence[np.ndarray], widths: Sequence[int],
                  group_size: int, symmetric: bool) -> tuple[LinkedProblem, JointLayout]:
    """The linked problem (no budget yet) over ``dense``'s groups and every block's slabs.

    ``costs[b]`` is block b's [E, S, W] predicted error (loss units) of every expert slab at every width.
    """
    C, W = len(dense.candidates), len(widths)
    if 0 not in widths or BASIS_BITS not in widths:
        raise ValueError(f"spectral widths {list(widths)} must include 0 (dropped) and {BASIS_BITS} (kept)")
    drop, keep = C + list(widths).index(0), C + list(widths).index(BASIS_BITS)
    names = list(dense.group_names)
    cost = [np.pad(dense.cost, ((0, 0), (0, W)))]
    bits = [np.pad(dense.bits, ((0, 0), (0, W)))]
    allowed = [np.pad(dense.allowed, ((0, 0), (0, W)))]
    links: list[tuple[int, int, int]] = []
    basis_groups, expert_groups = [], []
    for blk, blk_cost in zip(blocks, costs):
        S = len(blk.slab_rows)
        if blk_cost.shape != (blk.n_experts, S, W):
            raise ValueError(f"{blk.name}: cost shape {blk_cost.shape} != {(blk.n_experts, S, W)}")
        first = len(names)
        b_cost, b_bits, b_allowed = np.zeros((S, C + W)), np.zeros((S, C + W), np.int64), np.zeros((S, C + W), bool)
        b_allowed[:, [drop, keep]] = True
        b_bits[:, keep] = [rows * blk.basis_dim * BASIS_BITS for rows in blk.slab_rows]
        names += [f"{blk.name}.basis@{s}" for s in range(S)]
        basis_groups.append(np.arange(first, first + S))
        e_cost = np.zeros((blk.n_experts * S, C + W))
        e_cost[:, C:] = blk_cost.reshape(-1, W)
        per_slab = np.array([[factor_bits(rows, blk.factor_cols, w, group_size, symmetric) for w in widths]
                             for rows in blk.slab_rows], dtype=np.int64)  # [S, W]
        e_bits = np.zeros((blk.n_experts * S, C + W), np.int64)
        e_bits[:, C:] = np.tile(per_slab, (blk.n_experts, 1))
        e_allowed = np.zeros((blk.n_experts * S, C + W), bool)
        e_allowed[:, C:] = True
        start = first + S
        groups = np.arange(start, start + blk.n_experts * S).reshape(blk.n_experts, S)
        expert_groups.append(groups)
        names += [f"{blk.name}.expert{e}@{s}" for e in range(blk.n_experts) for s in range(S)]
        links += [(int(groups[e, s]), int(first + s), keep) for e in range(blk.n_experts) for s in range(S)]
        cost += [b_cost, e_cost]
        bits += [b_bits, e_bits]
        allowed += [b_allowed, e_allowed]
    params = dense.counted_params + sum(b.expert_params for b in blocks)
    problem = LinkedProblem(names, np.concatenate(cost), np.concatenate(bits), np.concatenate(allowed), params, links)
    return problem, JointLayout(dense.num_groups, tuple(widths), basis_groups, expert_groups)
