"""BitsMoE's joint problem: every MoE layer decomposed or per tensor, and the dense tensors, under one budget.

Plain arrays in, plain arrays out. The groups of the default per-tensor problem (a :class:`~.problem.Problem`
over every tensor, the experts included) share one column space with the spectral widths and one more
column, "absent":

    [ per-tensor candidates (C) | spectral widths (W, 0 = dropped) | absent ]

* a dense group takes one of the candidates, as in the per-tensor problem;
* every MoE layer has a mode group: kept (the width-16 column) = decomposed, dropped (width 0) = per tensor;
* an expert tensor group takes one of the candidates when its layer is per tensor, "absent" otherwise;
* an expert slab (layer, projection, expert, ranks) takes one width (0 = dropped), priced by
  ``budget.factor_bits`` and costed by the table's surrogate in loss units, when its layer is decomposed,
  "absent" otherwise;
* a basis slab (layer, projection, ranks) is kept (16-bit rows of the shared basis) or dropped when its
  layer is decomposed, at no error of its own, "absent" otherwise; an expert slab may be stored only if
  its basis slab is kept (a link).

The mode is per layer, not per projection, because a checkpoint stores a layer's experts decomposed in
gate, up and down or in none (the loader replaces the experts module whole). Every per-tensor choice is a
feasible point (all layers per tensor), so the optimum never predicts a larger loss than the per-tensor
plan at the same budget; :meth:`JointLayout.embed` maps that plan in, as a hint for the solver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..budget import BASIS_BITS, factor_bits
from .linked import LinkedProblem
from .problem import Problem


@dataclass(frozen=True)
class SlabBlock:
    """One layer and projection: ``slab_rows[s]`` ranks per slab, factors of ``factor_cols`` columns."""

    name: str
    layer: int
    n_experts: int
    slab_rows: tuple[int, ...]
    factor_cols: int
    basis_dim: int


@dataclass(frozen=True)
class JointChoice:
    """A solution read back: per-tensor choices, which layers are decomposed, and the decomposed layers' slabs."""

    tensors: np.ndarray  # [G] candidate index of each per-tensor group, -1 where its layer is decomposed
    decomposed: dict[int, bool]  # MoE layer -> stored decomposed
    kept: list[np.ndarray]  # per block: [S] basis slab kept (all False where its layer is per tensor)
    widths: list[np.ndarray]  # per block: [E, S] factor widths (all 0 where its layer is per tensor)


@dataclass
class JointLayout:
    """Where each group of the joint problem came from, to read a solution back and to map one in."""

    n_candidates: int
    widths: tuple[int, ...]
    tensor_layer: np.ndarray  # [G] the MoE layer of each per-tensor group, -1 for dense groups
    mode_groups: dict[int, int]  # MoE layer -> its mode group
    basis_groups: list[np.ndarray]  # per block: [S] group index
    expert_groups: list[np.ndarray]  # per block: [E, S] group index

    @property
    def drop(self) -> int:
        return self.n_candidates + self.widths.index(0)

    @property
    def keep(self) -> int:
        return self.n_candidates + self.widths.index(BASIS_BITS)

    @property
    def absent(self) -> int:
        return self.n_candidates + len(self.widths)

    def decode(self, choice: np.ndarray) -> JointChoice:
        widths = np.append(np.asarray(self.widths), 0)  # "absent" stores nothing
        C = self.n_candidates
        tensors = choice[:len(self.tensor_layer)]
        return JointChoice(np.where(tensors == self.absent, -1, tensors),
                           {layer: bool(choice[g] == self.keep) for layer, g in self.mode_groups.items()},
                           [widths[choice[g] - C] > 0 for g in self.basis_groups],
                           [widths[choice[g] - C] for g in self.expert_groups])

    def embed(self, tensor_choice: np.ndarray) -> np.ndarray:
        """The joint choice that stores every layer per tensor, as ``tensor_choice`` (a per-tensor solution) says."""
        n = len(self.tensor_layer) + len(self.mode_groups) + sum(g.size for g in self.basis_groups + self.expert_groups)
        choice = np.full(n, self.absent, dtype=np.int64)
        choice[:len(self.tensor_layer)] = tensor_choice
        choice[list(self.mode_groups.values())] = self.drop
        return choice


def joint_problem(tensors: Problem, tensor_layer: Sequence[Optional[int]], blocks: Sequence[SlabBlock],
                  costs: Sequence[np.ndarray], widths: Sequence[int], group_size: int, symmetric: bool,
                  decompose_all: bool = False) -> tuple[LinkedProblem, JointLayout]:
    """The linked problem (no budget yet) over ``tensors``' groups and every block's slabs.

    ``tensor_layer[g]`` is the MoE layer whose experts group g holds (None: a dense group); ``costs[b]`` is
    block b's [E, S, W] predicted error (loss units) of every expert slab at every width. ``decompose_all``
    stores every MoE layer decomposed (BitsMoE as published) instead of letting the solver choose.
    """
    C, W = len(tensors.candidates), len(widths)
    if 0 not in widths or BASIS_BITS not in widths:
        raise ValueError(f"spectral widths {list(widths)} must include 0 (dropped) and {BASIS_BITS} (kept)")
    layer_of = np.array([-1 if x is None else x for x in tensor_layer], dtype=np.int64)
    layers = sorted({b.layer for b in blocks})
    if sorted(set(layer_of[layer_of >= 0].tolist())) != layers:
        raise ValueError(f"MoE layers with expert tensors {sorted(set(layer_of[layer_of >= 0].tolist()))} are not the "
                         f"layers with spectral blocks {layers}")
    K = C + W + 1
    names = list(tensors.group_names)
    cost = [np.pad(tensors.cost, ((0, 0), (0, W + 1)))]
    bits = [np.pad(tensors.bits, ((0, 0), (0, W + 1)))]
    allowed = [np.pad(tensors.allowed, ((0, 0), (0, W + 1)))]
    allowed[0][layer_of >= 0, K - 1] = True
    layout = JointLayout(C, tuple(widths), layer_of, {}, [], [])
    drop, keep, absent = layout.drop, layout.keep, layout.absent

    def add(group_names: list[str], g_cost: np.ndarray, g_bits: np.ndarray, g_allowed: np.ndarray) -> np.ndarray:
        first = len(names)
        names.extend(group_names)
        cost.append(g_cost)
        bits.append(g_bits)
        allowed.append(g_allowed)
        return np.arange(first, len(names))

    mode_allowed = np.zeros((len(layers), K), bool)
    mode_allowed[:, keep] = True
    mode_allowed[:, drop] = not decompose_all
    modes = add([f"layers.{layer}.experts.decomposed" for layer in layers], np.zeros((len(layers), K)),
                np.zeros((len(layers), K), np.int64), mode_allowed)
    layout.mode_groups.update(zip(layers, modes.tolist()))
    equivalences = [(int(g), absent, layout.mode_groups[int(layer)], keep)
                    for g, layer in enumerate(layer_of) if layer >= 0]
    links: list[tuple[int, int, int]] = []
    for blk, blk_cost in zip(blocks, costs):
        S = len(blk.slab_rows)
        if blk_cost.shape != (blk.n_experts, S, W):
            raise ValueError(f"{blk.name}: cost shape {blk_cost.shape} != {(blk.n_experts, S, W)}")
        b_bits, b_allowed = np.zeros((S, K), np.int64), np.zeros((S, K), bool)
        b_allowed[:, [drop, keep, absent]] = True
        b_bits[:, keep] = [rows * blk.basis_dim * BASIS_BITS for rows in blk.slab_rows]
        basis = add([f"{blk.name}.basis@{s}" for s in range(S)], np.zeros((S, K)), b_bits, b_allowed)
        e_cost = np.zeros((blk.n_experts * S, K))
        e_cost[:, C:C + W] = blk_cost.reshape(-1, W)
        per_slab = np.array([[factor_bits(rows, blk.factor_cols, w, group_size, symmetric) for w in widths]
                             for rows in blk.slab_rows], dtype=np.int64)  # [S, W]
        e_bits = np.zeros((blk.n_experts * S, K), np.int64)
        e_bits[:, C:C + W] = np.tile(per_slab, (blk.n_experts, 1))
        e_allowed = np.zeros((blk.n_experts * S, K), bool)
        e_allowed[:, C:] = True
        experts = add([f"{blk.name}.expert{e}@{s}" for e in range(blk.n_experts) for s in range(S)], e_cost, e_bits,
                      e_allowed).reshape(blk.n_experts, S)
        layout.basis_groups.append(basis)
        layout.expert_groups.append(experts)
        links += [(int(experts[e, s]), int(basis[s]), keep) for e in range(blk.n_experts) for s in range(S)]
        mode = layout.mode_groups[blk.layer]
        equivalences += [(int(g), absent, mode, drop) for g in [*basis, *experts.ravel()]]
    problem = LinkedProblem(names, np.concatenate(cost), np.concatenate(bits), np.concatenate(allowed),
                            tensors.counted_params, links, equivalences=equivalences)
    return problem, layout
