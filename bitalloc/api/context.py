"""One call's view of a checkpoint, built once: inventory, aliases, constraints resolved, decision units.

``allocate`` builds it once and ``frontier`` reuses it for every budget, so the checkpoint is opened
and hashed once, the inventory and decision units are built once, and the problem's structure (tie
groups, exact storage, allowed candidates) is built once; a budget or an error table only fills in
numbers. This is also where model objects meet the allocator's plain arrays: the allocator never
sees the model, the table or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..allocator import Problem, build_problem
from ..allocator.units import DecisionUnits, TensorSpec, decision_units
from ..budget import Budget, ggml_row_allowed
from ..errors import ConstraintError, ScoresError
from ..model.checkpoint import Checkpoint
from ..model.gguf import GgufLayout, gguf_layout
from ..model.inventory import Inventory, build_inventory
from ..plan import Candidate, Role, TieGroup
from ..sensitivity.table import ErrorTable
from .config import CalibrationConfig, SolveConfig


@dataclass
class ModelContext:
    """A checkpoint, its inventory (with pins' unlocking applied) and the decision units of one solve setting."""

    ckpt: Checkpoint
    inv: Inventory
    candidates: list[Candidate]
    solve: SolveConfig
    allowed: np.ndarray  # [T, C] per quantized tensor, in ``candidates``' order

    @classmethod
    def build(cls, model: str | Path | Checkpoint, calibration: CalibrationConfig, solve: SolveConfig) -> "ModelContext":
        """Open the checkpoint and resolve the constraints against its tensors (pins may unlock lm_head/embeddings)."""
        ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
        inv = _inventory(ckpt, calibration, solve)
        candidates = list(calibration.candidates)
        units = inv.quantized
        allowed = solve.constraints.allowed([u.tensor for u in units], [u.role.value for u in units], candidates,
                                            aliases(inv))
        if calibration.target == "llamacpp":
            if solve.granularity == "slab":
                raise ConstraintError("--granularity slab splits tensors into column runs, which GGUF cannot store; "
                                      "use --granularity tensor with --target llamacpp")
            allowed = allowed & _rows_fit(units, candidates)
        return cls(ckpt, inv, candidates, solve, allowed)

    @classmethod
    def from_inventory(cls, ckpt: Checkpoint, inv: Inventory, candidates: list[Candidate], solve: SolveConfig,
                       allowed: np.ndarray) -> "ModelContext":
        """A context over an inventory the caller prepared (the importer locks what a config excludes)."""
        return cls(ckpt, inv, list(candidates), solve, allowed)

    @cached_property
    def aliases(self) -> dict[str, list[str]]:
        return aliases(self.inv)

    @property
    def is_gguf(self) -> bool:
        """A plan for llama.cpp: ggml types, GGUF file bytes."""
        return any(c.ggml is not None for c in self.candidates)

    @cached_property
    def gguf(self) -> GgufLayout:
        """The GGUF file this plan's llama-quantize run writes (llama.cpp plans only)."""
        return gguf_layout(self.ckpt, self.inv)

    @cached_property
    def tie_groups(self) -> list[TieGroup]:
        """What must share one choice: q/k/v and gate/up, which serving engines fuse; for llama.cpp, which
        quantizes each of those on its own, a layer's experts of one projection (one GGUF tensor)."""
        if not self.is_gguf:
            return self.inv.tie_groups
        return [TieGroup(id=self.gguf_tensor_of(m[0]), kind="experts", members=sorted(m))
                for m in self.gguf.expert_groups()]

    def gguf_tensor_of(self, tensor: str) -> str:
        return next(t.name for t in self.gguf.tensors if tensor in t.units)

    @cached_property
    def units(self) -> DecisionUnits:
        specs = [TensorSpec(u.tensor, tuple(u.shape), None if u.expert is None else (u.layer, u.expert))
                 for u in self.inv.quantized]
        return decision_units(specs, [g.members for g in self.tie_groups], self.solve.granularity, self.candidates)

    @cached_property
    def structure(self) -> Problem:
        """The problem without a budget or errors: ties collapsed, storage priced, allowed candidates set."""
        du = self.units
        return build_problem(du.names, du.shapes, None, self.candidates, du.ties, None, self.allowed[du.owner],
                             self.solve.time_per_param(self.candidates), self.solve.time_budget)

    def problem(self, budget: Budget) -> Problem:
        """The solver's problem at ``budget`` (errors zero until :meth:`with_table`); an unreachable budget raises.

        For llama.cpp the budget counts the whole GGUF file (or llama.cpp's bits per weight over all its
        weights); the solver gets what is left for the tensors it chooses types for."""
        return self.structure.with_budget(self.gguf.planned_budget(budget) if self.is_gguf else budget)

    def with_table(self, problem: Problem, table: ErrorTable) -> Problem:
        """``problem`` with ``table``'s predicted errors."""
        return problem.with_errors(self.decision_errors(table, problem.candidates))

    @property
    def needs_errors(self) -> list[str]:
        """Tensors with a real choice: a tensor fixed by a pin needs no error table row."""
        return [u.tensor for u, row in zip(self.inv.quantized, self.allowed) if row.sum() > 1]

    def decision_errors(self, table: ErrorTable, candidates: list[Candidate]) -> np.ndarray:
        """[N, C] predicted errors of the decision units, columns in ``candidates``' order."""
        du = self.units
        units = self.inv.quantized
        cols = [table.column(c) for c in candidates]
        choice_count = self.allowed[du.owner].sum(1)
        out = np.zeros((len(du.names), len(candidates)))
        for n, (i, k) in enumerate(zip(du.owner, du.slab)):
            tensor = units[i].tensor
            if table.has(tensor):
                out[n] = (table.slabs(tensor)[k] if du.per_slab else table.errors[table.row(tensor)])[cols]
            elif choice_count[n] > 1:
                raise ScoresError(f"score file has no errors for {tensor}")
        return out


def _rows_fit(units: list, candidates: list[Candidate]) -> np.ndarray:
    """[T, C] whether each tensor's rows are whole blocks of each ggml candidate; a tensor no candidate fits
    is refused (llama-quantize would silently store it as another type, outside the plan and its price)."""
    fits = np.array([[ggml_row_allowed(c.ggml, u.shape[-1]) for c in candidates] for u in units], dtype=bool)
    for u, row in zip(units, fits):
        if not row.any():
            blocks = sorted({c.group_size for c in candidates})
            raise ConstraintError(f"{u.tensor} has rows of {u.shape[-1]} weights, which no candidate type stores "
                                  f"(blocks of {', '.join(map(str, blocks))}); add Q8_0 (blocks of 32) to "
                                  "--candidates or leave the tensor out (--no-include-embeddings / "
                                  "--no-include-lm-head for those)")
    return fits.reshape(len(units), len(candidates))


def aliases(inv: Inventory) -> dict[str, list[str]]:
    """With tied embeddings the one embedding tensor is also the output head, so pins on lm_head reach it."""
    if not inv.tied_embeddings:
        return {}
    return {u.tensor: ["lm_head.weight"] for u in inv.units if u.role == Role.embedding}


def _inventory(ckpt: Checkpoint, calibration: CalibrationConfig, solve: SolveConfig) -> Inventory:
    """The inventory, with lm_head / embedding unlocked when a pin names them.

    Pins never reach tensors that are not linear weights (norms, biases, routers): a pattern such
    as ``layers\\.0\\.`` pins the quantizable tensors of layer 0 and leaves its norms alone.
    """
    constraints = solve.constraints
    include_lm_head, include_embeddings = calibration.include_lm_head, calibration.include_embeddings
    inv = build_inventory(ckpt, include_lm_head, include_embeddings)
    names = aliases(inv)
    for u in inv.units:
        if u.locked and constraints.pin_for(u.tensor, names.get(u.tensor, ())) is not None:
            if u.role == Role.lm_head or (u.role == Role.embedding and inv.tied_embeddings):
                include_lm_head = True
            elif u.role == Role.embedding:
                include_embeddings = True
    if (include_lm_head, include_embeddings) != (calibration.include_lm_head, calibration.include_embeddings):
        inv = build_inventory(ckpt, include_lm_head, include_embeddings)
    constraints.check_all_pins_match([u.tensor for u in inv.quantized], aliases(inv))
    return inv
