"""Decision units: what the solver chooses a width for, mapped to and from checkpoint tensors.

* ``tensor`` (default): one choice per tensor (q/k/v and gate/up tied, as serving engines fuse them);
* ``expert``: one choice per MoE expert (its gate, up and down share it); dense tensors as above;
* ``slab``: one choice per run of ``SLAB_WIDTH`` input columns of every tensor (BitsMoE-style
  segments); slab k of tied tensors is tied. Needs candidates whose groups fit in a slab.

The error table stores errors per slab, so every granularity is solved from one sensitivity pass.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .errors import ConstraintError, ScoresError
from .model.inventory import Inventory, Unit
from .plan import Candidate, Segment
from .scores import SLAB_WIDTH, ErrorTable

GRANULARITIES = ("tensor", "expert", "slab")


@dataclass
class DecisionUnits:
    names: list[str]
    shapes: list[tuple[int, int]]
    owner: list[int]  # index into inv.quantized
    cols: list[tuple[int, int]]  # input-column range of the tensor
    ties: list[list[str]]
    slab: list[int]  # slab index within the tensor (0 unless granularity is slab)
    per_slab: bool = False


def decision_units(inv: Inventory, granularity: str, candidates: list[Candidate]) -> DecisionUnits:
    if granularity not in GRANULARITIES:
        raise ConstraintError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    units = inv.quantized
    index = {u.tensor: i for i, u in enumerate(units)}
    if granularity != "slab":
        ties = [list(g.members) for g in inv.tie_groups]
        if granularity == "expert":
            ties = _expert_ties(units, ties)
        return DecisionUnits([u.tensor for u in units], [_matrix(u) for u in units], list(range(len(units))),
                             [(0, u.shape[-1]) for u in units], ties, [0] * len(units))
    bad = [c.id for c in candidates if SLAB_WIDTH % c.group_size]
    if bad:
        raise ConstraintError(f"--granularity slab needs group sizes that divide {SLAB_WIDTH}; {', '.join(bad)} do not")
    du = DecisionUnits([], [], [], [], [], [], per_slab=True)
    for i, u in enumerate(units):
        rows, cols = _matrix(u)
        for k in range(math.ceil(cols / SLAB_WIDTH)):
            start, stop = k * SLAB_WIDTH, min(cols, (k + 1) * SLAB_WIDTH)
            du.names.append(f"{u.tensor}@{k}")
            du.shapes.append((rows, stop - start))
            du.owner.append(i)
            du.cols.append((start, stop))
            du.slab.append(k)
    for g in inv.tie_groups:
        n = min(math.ceil(_matrix(units[index[m]])[1] / SLAB_WIDTH) for m in g.members)
        du.ties += [[f"{m}@{k}" for m in g.members] for k in range(n)]
    return du


def _expert_ties(units: list[Unit], ties: list[list[str]]) -> list[list[str]]:
    experts: dict[tuple, list[str]] = defaultdict(list)
    for u in units:
        if u.expert is not None:
            experts[(u.layer, u.expert)].append(u.tensor)
    in_expert = {t for members in experts.values() for t in members}
    return [t for t in ties if not set(t) & in_expert] + [sorted(m) for m in experts.values() if len(m) > 1]


def _matrix(u: Unit) -> tuple[int, int]:
    return math.prod(u.shape[:-1]), u.shape[-1]


def decision_errors(du: DecisionUnits, inv: Inventory, table: ErrorTable, candidates: list[Candidate],
                    allowed: np.ndarray) -> np.ndarray:
    """[N, C] predicted errors of the decision units; a unit fixed by a pin needs no table row."""
    units = inv.quantized
    cols = [table.column(c) for c in candidates]
    out = np.zeros((len(du.names), len(candidates)))
    for n, (i, k) in enumerate(zip(du.owner, du.slab)):
        tensor = units[i].tensor
        if table.has(tensor):
            out[n] = (table.slabs(tensor)[k] if du.per_slab else table.errors[table.row(tensor)])[cols]
        elif allowed[n].sum() > 1:
            raise ScoresError(f"score file has no errors for {tensor}")
    return out


def segments_of(du: DecisionUnits, owner: int, choices: np.ndarray, candidates: list[Candidate]) -> list[Segment]:
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
