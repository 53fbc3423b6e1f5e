"""Decomposed MoE experts (a plan's BitsMoE ``decomposition``) in a quantized checkpoint: computed, named, read.

Per block (layer, projection) the checkpoint holds, in place of the experts' weights:

* ``block.basis`` (``...mlp.experts.gate_proj.shared_basis``): fp16 ``[rank_kept, d]``, the basis rows of
  the slabs the plan keeps, in order;
* per expert ``E`` and slab ``S`` that the expert stores (width > 0; dropped slabs are not stored), the module
  ``...mlp.experts.E.gate_proj.factor.S``: at 16 bit its ``weight``, fp16 ``[rows, n]``; at any other width
  compressed-tensors' ``pack-quantized`` tensors of its rows (``weight_packed``, ``weight_scale``,
  ``weight_zero_point``, ``weight_shape``; groups along the row, the plan's ``group_size`` and symmetry).

The codes are RTN of the factors exactly as ``bitalloc eval --plan`` reconstructs them
(:func:`.lowrank.store_block`), so a written checkpoint computes what the plan was evaluated with. The slab
layout comes from the plan, which the checkpoint carries (``bitalloc-plan.json``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch

from ..errors import CheckpointError, PlanError
from ..model.checkpoint import Checkpoint
from ..model.inventory import build_inventory
from ..model.layerwise import LayerwiseModel, unit_view
from ..budget import BASIS_BITS
from ..plan import Candidate, DecomposedBlock, Decomposition, Plan
from ..progress import SILENT, Tracker
from .base import QuantizedWeight
from .checkpoint import pack, unpack
from .lowrank import StoredBlock, store_block

PROJECTIONS = ("gate", "up", "down")


def check_writable(plan: Plan) -> None:
    """Refuse decompositions that a checkpoint cannot hold, before any work: the loader replaces a layer's experts
    module as a whole, so each decomposed layer needs its gate, up and down blocks, each over experts 0..E-1."""
    if plan.decomposition is None:
        return
    by_layer: dict[int, list[DecomposedBlock]] = defaultdict(list)
    for b in plan.decomposition.blocks:
        by_layer[b.layer].append(b)
    for layer, blocks in sorted(by_layer.items()):
        have = sorted(b.projection for b in blocks)
        if have != sorted(PROJECTIONS):
            raise PlanError(f"the plan decomposes the experts of layer {layer} in {', '.join(have)} only; a checkpoint "
                            "stores a layer's experts decomposed in gate, up and down or in none: re-plan with "
                            "allocate --method bitsmoe")
        owner = experts_module(blocks[0])
        for b in blocks:
            want = [f"{owner}.{e}.{b.projection}_proj.weight" for e in range(len(b.experts))]
            if b.experts != want or len(b.experts) != len(blocks[0].experts):
                raise PlanError(f"decomposition block layer {layer} {b.projection} lists experts {b.experts[:2]}...; "
                                f"a checkpoint needs {want[:2]}... (every expert of {owner}, in order)")


def experts_module(block: DecomposedBlock) -> str:
    """``model.layers.L.mlp.experts``: the module whose experts ``block`` decomposes."""
    return block.experts[0].rpartition(".experts.")[0] + ".experts"


def factor_module(block: DecomposedBlock, expert: int, slab: int) -> str:
    """``model.layers.L.mlp.experts.E.gate_proj.factor.S``: one stored slab of one expert's factor."""
    return f"{block.experts[expert].removesuffix('.weight')}.factor.{slab}"


def stored_names(decomposition: Decomposition) -> set[str]:
    """Every tensor a checkpoint holds for ``decomposition``'s blocks."""
    quantized = ("weight_packed", "weight_scale", "weight_shape") + (() if decomposition.symmetric
                                                                     else ("weight_zero_point",))
    names = set()
    for b in decomposition.blocks:
        names.add(b.basis)
        for e in range(len(b.experts)):
            for i, s in enumerate(b.slabs):
                if s.widths[e]:
                    local = ("weight",) if s.widths[e] == BASIS_BITS else quantized
                    names.update(f"{factor_module(b, e, i)}.{t}" for t in local)
    return names


def decompose_checkpoint(ckpt: Checkpoint, decomposition: Decomposition,
                         track: Tracker = SILENT) -> dict[str, StoredBlock]:
    """Basis name -> the stored form of every block, read one decoder layer at a time (as ``eval`` reads them)."""
    units = {u.tensor: u for u in build_inventory(ckpt).quantized}
    by_layer: dict[int, list[DecomposedBlock]] = defaultdict(list)
    for b in decomposition.blocks:
        by_layer[b.layer].append(b)
    lm = LayerwiseModel(ckpt, "cpu")
    out = {}
    task = track.task("decompose experts (rtn factors)", len(by_layer))
    with torch.no_grad():
        for i, blocks in sorted(by_layer.items()):
            layer = lm.load_layer(i)
            for b in blocks:
                out[b.basis] = store_block([unit_view(layer, units[t]) for t in b.experts], b, decomposition)
            lm.release_layer(i)
            task.advance()
    return out


def block_tensors(block: DecomposedBlock, stored: StoredBlock) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of everything the checkpoint holds for ``block``."""
    yield block.basis, stored.basis
    for e, slabs in enumerate(stored.factors):
        for i, rows in sorted(slabs.items()):
            module = factor_module(block, e, i)
            if isinstance(rows, QuantizedWeight):
                for local, t in pack(rows, module).items():
                    yield f"{module}.{local}", t
            else:
                yield f"{module}.weight", rows


def read_block(ckpt: Checkpoint, block: DecomposedBlock, decomposition: Decomposition) -> StoredBlock:
    """``block`` as the checkpoint stores it, every tensor's dtype and shape checked against the plan."""
    basis = _load(ckpt, block.basis, torch.float16, (block.rank_kept, block.basis_dim))
    factors = []
    for e in range(len(block.experts)):
        slabs = {}
        for i, s in enumerate(block.slabs):
            width, module, shape = s.widths[e], factor_module(block, e, i), (s.stop - s.start, block.factor_cols)
            if width == BASIS_BITS:
                slabs[i] = _load(ckpt, f"{module}.weight", torch.float16, shape)
            elif width:
                slabs[i] = _read_codes(ckpt, module, width, decomposition, shape)
        factors.append(slabs)
    return StoredBlock(basis, factors)


def _load(ckpt: Checkpoint, name: str, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    info = ckpt.tensors.get(name)
    if info is None:
        raise CheckpointError(f"{ckpt.path} lacks {name}, which its plan's decomposition stores; the checkpoint is "
                              "incomplete")
    t = ckpt.load(name)
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise CheckpointError(f"{name}: expected {dtype} {shape} as the plan's decomposition says, got {t.dtype} "
                              f"{tuple(t.shape)}; the checkpoint is corrupt")
    return t


def _read_codes(ckpt: Checkpoint, module: str, width: int, decomposition: Decomposition,
                shape: tuple[int, int]) -> QuantizedWeight:
    tensors = {local: ckpt.load(f"{module}.{local}") for local in
               ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape") if f"{module}.{local}" in ckpt.tensors}
    q = unpack(tensors, Candidate(bits=width, group_size=decomposition.group_size, symmetric=decomposition.symmetric),
               module)
    if tuple(q.codes.shape) != shape:
        raise CheckpointError(f"{module}: weight_shape is {tuple(q.codes.shape)}, the plan's slab is {shape}; the "
                              "checkpoint is corrupt")
    return q
