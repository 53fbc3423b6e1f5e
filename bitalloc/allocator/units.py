"""Decision units: what the solver chooses a width for, mapped to and from checkpoint tensors.

* ``tensor`` (default): one choice per tensor (q/k/v and gate/up tied, as serving engines fuse them);
* ``expert``: one choice per MoE expert (its gate, up and down share it); dense tensors as above;
* ``slab``: one choice per run of ``SLAB_WIDTH`` input columns of every tensor (BitsMoE-style
  segments); slab k of tied tensors is tied. Needs candidates whose groups fit in a slab.

Plain data in, plain data out: the caller describes each tensor as a :class:`TensorSpec`, so the
allocator never sees the model. The error table stores errors per slab, so every granularity is
solved from one sensitivity pass.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import ConstraintError
from ..plan import SLAB_WIDTH, Candidate, Segment

GRANULARITIES = ("tensor", "expert", "slab")


@dataclass(frozen=True)
class TensorSpec:
    """One quantizable tensor: its checkpoint name, shape, and the MoE expert it belongs to (if any)."""

    name: str
    shape: tuple[int, ...]
    expert: Optional[tuple[int, int]] = None  # (layer, expert) for MoE experts

    @property
    def matrix(self) -> tuple[int, int]:
        """(rows, cols): quantization groups run along the last (input) dimension."""
        return math.prod(self.shape[:-1]), self.shape[-1]


@dataclass
class DecisionUnits:
    names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # index into the tensors
    cols: list[tuple[int, int]] = field(default_factory=list)  # input-column range of the tensor
    ties: list[list[str]] = field(default_factory=list)
    slab: list[int] = field(default_factory=list)  # slab index within the tensor (0 unless granularity is slab)
    per_slab: bool = False


def decision_units(tensors: Sequence[TensorSpec], ties: Sequence[Sequence[str]], granularity: str,
                   candidates: Sequence[Candidate]) -> DecisionUnits:
    """The units the solver decides for ``tensors`` at ``granularity``, with their tie groups."""
    if granularity not in GRANULARITIES:
        raise ConstraintError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    ties = [list(t) for t in ties]
    if granularity != "slab":
        if granularity == "expert":
            ties = _expert_ties(tensors, ties)
        return DecisionUnits([t.name for t in tensors], [t.matrix for t in tensors], list(range(len(tensors))),
                             [(0, t.shape[-1]) for t in tensors], ties, [0] * len(tensors))
    bad = [c.id for c in candidates if SLAB_WIDTH % c.group_size]
    if bad:
        raise ConstraintError(f"--granularity slab needs group sizes that divide {SLAB_WIDTH}; {', '.join(bad)} do not")
    du = DecisionUnits(per_slab=True)
    for i, t in enumerate(tensors):
        rows, cols = t.matrix
        for k in range(math.ceil(cols / SLAB_WIDTH)):
            start, stop = k * SLAB_WIDTH, min(cols, (k + 1) * SLAB_WIDTH)
            du.names.append(f"{t.name}@{k}")
            du.shapes.append((rows, stop - start))
            du.owner.append(i)
            du.cols.append((start, stop))
            du.slab.append(k)
    width = {t.name: t.matrix[1] for t in tensors}
    for members in ties:
        n = min(math.ceil(width[m] / SLAB_WIDTH) for m in members)
        du.ties += [[f"{m}@{k}" for m in members] for k in range(n)]
    return du


def _expert_ties(tensors: Sequence[TensorSpec], ties: list[list[str]]) -> list[list[str]]:
    experts: dict[tuple, list[str]] = defaultdict(list)
    for t in tensors:
        if t.expert is not None:
            experts[t.expert].append(t.name)
    in_expert = {n for members in experts.values() for n in members}
    return [t for t in ties if not set(t) & in_expert] + [sorted(m) for m in experts.values() if len(m) > 1]


def segments_of(du: DecisionUnits, owner: int, choices: np.ndarray, candidates: Sequence[Candidate]) -> list[Segment]:
    """Consecutive slabs of one tensor with the same candidate, merged into segments."""
    out: list[Segment] = []
    for n in np.flatnonzero(np.asarray(du.owner) == owner):
        c = candidates[choices[n]]
        start, stop = du.cols[n]
        if out and (out[-1].bits, out[-1].group_size, out[-1].symmetric) == (c.bits, c.group_size, c.symmetric):
            out[-1] = out[-1].model_copy(update={"stop": stop})
        else:
            out.append(Segment(start=start, stop=stop, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric))
    return out
