"""The plan: bitalloc's product contract (pure data, no torch).

A plan lists every tensor of a checkpoint that bitalloc considered, by its exact
checkpoint name, with the bit width and group size chosen for it (or ``locked`` with a
reason), the predicted error of every candidate, and enough provenance (model hashes,
calibration, solver status) to reproduce and audit it. Field-by-field documentation is in
``docs/plan-format.md``; ``plan.schema.json`` beside this module is the JSON Schema that
other tools can validate against (regenerate with ``python -m bitalloc.plan``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
from collections import Counter, defaultdict
from enum import Enum
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .budget import (BASIS_BITS, GGML_TYPES, GGUF_LAYOUT, STORAGE_LAYOUT, factor_bits, ggml_bits, nominal_bpp,
                     tensor_bits)
from .errors import BitallocError, OutputError, PlanError

PLAN_FORMAT = "bitalloc.plan"
PLAN_VERSION = 2  # bump only with a migration in Plan.load; readers refuse other versions
# v1 -> v2: storage priced as compressed-tensors writes it (zero point at code width, none when
# symmetric) instead of a 16-bit zero per group; ``layout`` records it; v1 plans are re-priced on load.
LOCKED_BITS = 16
SLAB_WIDTH = 128  # input columns per slab: the unit of --granularity slab and of error tables' slab rows
SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")
RANK_SLAB = 64  # singular directions per spectral slab (BitsMoE's kernels tile ranks by 64)
SPECTRAL_WIDTHS = (0, 1, 2, 3, 4, 6, 8, BASIS_BITS)  # BitsMoE slab widths: 0 drops the ranks, 16 keeps them in fp16


class _Strict(BaseModel):
    # A misspelled key in a plan file is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


# ggml types a llama.cpp plan may choose: (nominal code width, symmetric). bits, group and symmetric of a
# ggml candidate follow from its type, so constraints on bits (--min-bits, pins) read the same for both layouts.
GGML_CODES: dict[str, tuple[int, bool]] = {"Q2_K": (2, False), "Q3_K": (3, True), "Q4_K": (4, False),
                                           "Q5_K": (5, False), "Q6_K": (6, True), "Q8_0": (8, True)}


class Candidate(_Strict):
    """One quantization choice: integer codes of ``bits`` with a 16-bit scale and a zero point per group,
    or, with ``ggml`` set (plans for llama.cpp), that ggml type exactly as llama-quantize stores it."""

    bits: int = Field(ge=1, le=8)
    group_size: int = Field(gt=0)
    symmetric: bool = False
    ggml: Optional[str] = None  # a ggml type name (Q4_K ...): priced and predicted as that type

    @model_validator(mode="after")
    def _check_ggml(self) -> "Candidate":
        if self.ggml is not None:
            expected = ggml_candidate(self.ggml)
            if (self.bits, self.group_size, self.symmetric) != (expected.bits, expected.group_size, expected.symmetric):
                raise ValueError(f"{self.ggml} stores {expected.bits}-bit codes in blocks of {expected.group_size}; "
                                 f"got bits={self.bits} group_size={self.group_size} symmetric={self.symmetric}")
        return self

    @property
    def id(self) -> str:
        if self.ggml is not None:
            return self.ggml
        return f"b{self.bits}g{self.group_size}{'s' if self.symmetric else ''}"

    @property
    def bpp(self) -> float:
        if self.ggml is not None:
            return GGML_TYPES[self.ggml].bits_per_weight
        return nominal_bpp(self.bits, self.group_size, self.symmetric)

    def storage_bits(self, rows, cols):
        """Exact storage of [rows, cols] tensors with this choice, in bits (ints or integer numpy arrays)."""
        if self.ggml is not None:
            return ggml_bits(rows, cols, self.ggml)
        return tensor_bits(rows, cols, self.bits, self.group_size, self.symmetric)


def ggml_candidate(name: str) -> Candidate:
    """The candidate for the ggml type ``name`` (``Q4_K``; case-insensitive); unknown names raise ValueError."""
    key = name.strip().upper()
    if key not in GGML_CODES:
        raise ValueError(f"unknown ggml type {name!r}: use one of {', '.join(GGML_CODES)}")
    bits, symmetric = GGML_CODES[key]
    return Candidate.model_construct(bits=bits, group_size=GGML_TYPES[key].block_size, symmetric=symmetric, ggml=key)


DEFAULT_CANDIDATES: tuple[Candidate, ...] = tuple(Candidate(bits=b, group_size=128) for b in (2, 3, 4, 8))
GGML_CANDIDATES: tuple[Candidate, ...] = tuple(ggml_candidate(t) for t in GGML_CODES)  # --target llamacpp


class Role(str, Enum):
    """What a tensor does; drives locking, tie groups, heuristics and reports."""

    attn_q = "attn_q"
    attn_k = "attn_k"
    attn_v = "attn_v"
    attn_o = "attn_o"
    mlp_gate = "mlp_gate"
    mlp_up = "mlp_up"
    mlp_down = "mlp_down"
    expert_gate = "expert_gate"
    expert_up = "expert_up"
    expert_down = "expert_down"
    shared_gate = "shared_gate"
    shared_up = "shared_up"
    shared_down = "shared_down"
    router = "router"
    norm = "norm"
    bias = "bias"
    embedding = "embedding"
    lm_head = "lm_head"
    other = "other"


class FusedSource(_Strict):
    """Where a per-expert tensor lives when the checkpoint stores experts fused in 3-D."""

    key: str
    expert: int
    part: Literal["gate", "up", "down"]
    transposed: bool = False


class Segment(_Strict):
    """A run of input columns [start, stop) of one tensor quantized with one candidate (--granularity slab)."""

    start: int = Field(ge=0)
    stop: int = Field(gt=0)
    bits: int
    group_size: int
    symmetric: bool = False

    @property
    def candidate(self) -> Candidate:
        return Candidate(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


class Entry(_Strict):
    tensor: str  # exact checkpoint key (per-expert name for MoE, also for fused checkpoints)
    module: str
    shape: list[int]
    numel: int
    layer: Optional[int] = None
    role: Role
    expert: Optional[int] = None
    bits: int
    group_size: Optional[int] = None
    symmetric: bool = False
    ggml: Optional[str] = None  # plans for llama.cpp (layout gguf): the ggml type llama-quantize writes
    bpp: float  # this tensor's own bits per parameter, overhead included
    predicted_error: dict[str, float] = Field(default_factory=dict)  # candidate id -> predicted loss increase (nats)
    locked: bool = False
    reason: Optional[str] = None
    source: Optional[FusedSource] = None
    # With --granularity slab: per-column-run choices covering [0, in_features); bits/group_size
    # then give the widest segment (for tools that read one width per tensor).
    segments: Optional[list[Segment]] = None
    # Stored as spectral factors in the plan's ``decomposition`` section, which prices them (bits 0, no group).
    decomposed: bool = False

    @property
    def candidate(self) -> Optional[Candidate]:
        if self.locked or self.decomposed:
            return None
        return Candidate(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, ggml=self.ggml)

    @property
    def storage_bits(self) -> int:
        """Bits this entry stores itself (a decomposed entry's factors and basis are priced by the decomposition)."""
        if self.locked:
            return self.numel * LOCKED_BITS
        if self.decomposed:
            return 0
        rows, cols = _as_matrix(self.shape)
        if self.segments:
            return sum(tensor_bits(rows, g.stop - g.start, g.bits, g.group_size, g.symmetric) for g in self.segments)
        return self.candidate.storage_bits(rows, cols)

    def column_choices(self) -> list[tuple[int, int, Candidate]]:
        """(start, stop, candidate) runs over the input columns: one run unless segmented."""
        if self.segments:
            return [(g.start, g.stop, g.candidate) for g in self.segments]
        return [(0, self.shape[-1], self.candidate)]


class FactorSlab(_Strict):
    """Ranks [start, stop) of a block's expert factors: kept in the shared basis or not, and each expert's width."""

    start: int = Field(ge=0)
    stop: int = Field(gt=0)
    basis_kept: bool  # the shared basis stores these ranks (16 bit); required by any expert width > 0
    widths: list[int]  # per expert (the block's order): one of SPECTRAL_WIDTHS, 0 = dropped
    energy: list[float]  # per expert: predicted loss increase if these ranks are dropped (nats; report only)


class DecomposedBlock(_Strict):
    """One MoE layer and projection stored as a shared basis plus one factor per expert (BitsMoE).

    ``side`` "input" (gate, up): expert weight W_e [factor_cols, basis_dim] = F_e^T B with the shared basis
    B [rank, basis_dim] and the factor F_e [rank, factor_cols]; "output" (down): W_e [basis_dim, factor_cols]
    = B^T F_e. The basis holds the eigenvectors of sum_e routing_share[e] * (W_e^T W_e, resp. W_e W_e^T), so
    it is rebuilt exactly from the checkpoint and this block (docs/bitsmoe.md).
    """

    layer: int = Field(ge=0)
    projection: Literal["gate", "up", "down"]
    side: Literal["input", "output"]
    basis: str  # name of the shared basis tensor in a decomposed checkpoint
    experts: list[str]  # the decomposed entries' tensors, in expert order
    routing_share: list[float]  # per expert: share of the routed calibration tokens
    rank: int = Field(gt=0)
    basis_dim: int = Field(gt=0)
    factor_cols: int = Field(gt=0)
    slabs: list[FactorSlab]

    @property
    def rank_kept(self) -> int:
        return sum(s.stop - s.start for s in self.slabs if s.basis_kept)

    def expert_bits(self, expert: int, group_size: int, symmetric: bool) -> int:
        return sum(factor_bits(s.stop - s.start, self.factor_cols, s.widths[expert], group_size, symmetric)
                   for s in self.slabs)

    def basis_bits(self) -> int:
        return self.rank_kept * self.basis_dim * BASIS_BITS


class Decomposition(_Strict):
    """Spectral decomposition of MoE experts (``allocate --method bitsmoe``); factors quantized by RTN per row."""

    method: Literal["bitsmoe"] = "bitsmoe"
    rank_slab: int = Field(gt=0)  # ranks per slab (one width per slab and expert)
    group_size: int = Field(gt=0)  # factor rows are quantized in groups of this many columns
    symmetric: bool = False
    blocks: list[DecomposedBlock]

    @property
    def storage_bits(self) -> int:
        """Every block's kept basis ranks at 16 bit plus every expert's factor slabs at their widths."""
        return sum(b.basis_bits() + sum(b.expert_bits(e, self.group_size, self.symmetric) for e in range(len(b.experts)))
                   for b in self.blocks)


class TieGroup(_Strict):
    """Tensors that must share one choice because serving engines fuse them (qkv, gate_up)."""

    id: str
    kind: Literal["qkv", "gate_up", "experts"]  # experts: one GGUF tensor holds a layer's experts of one projection
    members: list[str]


class ModelInfo(_Strict):
    path: str
    arch: str
    config_sha256: str
    index_sha256: str  # sha256 of model.safetensors.index.json, or of the single file's header


class BudgetInfo(_Strict):
    target: str  # as the user wrote it
    unit: Literal["bpp", "bytes"]
    target_bits: int
    achieved_bpp: float  # over counted (unlocked) params, scales and zeros included
    achieved_bytes: int  # bytes of the counted tensors once quantized
    counted_params: int
    total_bytes: int  # whole listed model: counted tensors quantized + locked tensors at 16 bit
    # layout gguf: the predicted size of the GGUF file llama-quantize writes (metadata, tokenizer and
    # unquantized tensors included); a byte budget bounds this, not achieved_bytes
    file_bytes: Optional[int] = None


class SolverInfo(_Strict):
    name: str
    status: str
    objective: float  # sum of predicted errors of the chosen candidates (nats)
    bound: Optional[float] = None
    gap: Optional[float] = None  # relative optimality gap, 0 when proven optimal
    seconds: float
    objective_scale: Optional[float] = None  # integer scaling applied to errors for CP-SAT
    note: Optional[str] = None  # solver-specific remark (e.g. the closed form's model gap)
    granularity: Literal["tensor", "expert", "slab"] = "tensor"  # what one decision covered


class ConstraintsInfo(_Strict):
    """What the user constrained, as given (patterns resolved into entries' choices)."""

    pins: list[str] = Field(default_factory=list)
    min_bits: Optional[int] = None
    max_bits: Optional[int] = None
    role_bits: list[str] = Field(default_factory=list)
    bits_ranges: list[str] = Field(default_factory=list)
    time_budget: Optional[float] = None  # seconds of the secondary (kernel-time) resource


class CalibrationInfo(_Strict):
    file: str
    sha256: str
    tokens: int
    seqlen: int
    seed: int


class ScoresInfo(_Strict):
    predictor: str
    formula: str
    calibration_loss: Optional[float] = None
    rounding: Literal["rtn", "gptq"] = "rtn"  # whose weight error the predictions are (rounding-aware plans)


class Plan(_Strict):
    format: Literal["bitalloc.plan"] = PLAN_FORMAT
    version: Literal[2] = PLAN_VERSION
    layout: Literal["compressed-tensors", "gguf"] = STORAGE_LAYOUT  # the storage that budgets and bpp count
    tool: str
    created: str
    model: ModelInfo
    budget: BudgetInfo
    candidates: list[Candidate]
    tie_groups: list[TieGroup] = Field(default_factory=list)
    entries: list[Entry]
    solver: SolverInfo
    constraints: Optional[ConstraintsInfo] = None
    calibration: Optional[CalibrationInfo] = None
    scores: Optional[ScoresInfo] = None
    timings: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)  # e.g. how an older plan was migrated
    decomposition: Optional[Decomposition] = None  # BitsMoE factors of MoE experts (older plans: none)

    @model_validator(mode="after")
    def _check_consistency(self) -> "Plan":
        names = [e.tensor for e in self.entries]
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise ValueError(f"tensor {dup[0]!r} is listed more than once")
        cands = {c.id for c in self.candidates}
        ggml = {c.ggml is not None for c in self.candidates}
        if ggml != {self.layout == GGUF_LAYOUT}:
            raise ValueError(f"a {self.layout} plan's candidates must all be "
                             + ("ggml types" if self.layout == GGUF_LAYOUT else "bits and groups (no ggml type)"))
        by_name = {e.tensor: e for e in self.entries}
        for e in self.entries:
            if not e.shape or min(e.shape) < 1:
                raise ValueError(f"{e.tensor}: shape {e.shape} is not a list of positive dimensions")
            if e.numel != math.prod(e.shape):
                raise ValueError(f"{e.tensor}: numel {e.numel} does not match shape {e.shape}")
            if e.decomposed:
                if e.locked or e.bits != 0 or e.group_size is not None or e.segments:
                    raise ValueError(f"{e.tensor}: a decomposed entry is unlocked, with bits 0, no group size, no segments")
            elif e.locked:
                if e.bits != LOCKED_BITS or e.group_size is not None:
                    raise ValueError(f"{e.tensor}: locked entries keep {LOCKED_BITS} bits and no group size")
                if not e.reason:  # the summary and reports group locked tensors by it
                    raise ValueError(f"{e.tensor}: a locked entry says why in 'reason'")
            elif e.group_size is None or e.candidate.id not in cands:
                raise ValueError(f"{e.tensor}: bits={e.bits} group_size={e.group_size} is not one of the candidates {sorted(cands)}")
            elif e.segments:
                _check_segments(e, cands)
        for g in self.tie_groups:
            missing = [m for m in g.members if m not in by_name]
            if missing:
                raise ValueError(f"tie group {g.id} names unknown tensor {missing[0]!r}")
            choices = {str(by_name[m].column_choices()) if by_name[m].segments else (by_name[m].bits, by_name[m].group_size)
                       for m in g.members}
            if len(choices) > 1:
                raise ValueError(f"tie group {g.id} members disagree: {sorted(choices, key=str)}")
        _check_decomposition(self)
        counted = [e for e in self.entries if not e.locked]
        params = sum(e.numel for e in counted)
        bits = sum(e.storage_bits for e in counted) + (self.decomposition.storage_bits if self.decomposition else 0)
        if params != self.budget.counted_params:
            raise ValueError(f"budget.counted_params {self.budget.counted_params} != {params} (sum over unlocked entries)")
        if bits > self.budget.target_bits:
            raise ValueError(f"entries use {bits} bits, over the budget's {self.budget.target_bits}")
        if params and abs(bits / params - self.budget.achieved_bpp) > 1e-6:
            raise ValueError(f"budget.achieved_bpp {self.budget.achieved_bpp} != {bits / params:.6f} computed from entries")
        return self

    # ---- I/O -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees a half-written plan, and a failure leaves the old file."""
        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read and validate a plan; any problem raises :class:`PlanError` with a one-line reason."""
        p = Path(path)
        check_path(p, "plan file", PlanError)
        if not p.is_file():
            raise PlanError(f"plan file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{p} is not valid JSON: {exc}") from None
        except RecursionError:  # json recurses once per nesting level; a plan is a few levels deep
            raise PlanError(f"{p} is nested too deeply to be a plan; make it again with `allocate`") from None
        except OSError as exc:
            raise PlanError(f"cannot read {p}: {exc.strerror}") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{p} is not a bitalloc plan (missing format: {PLAN_FORMAT!r})")
        if data.get("version") == 1:
            data = _migrate_v1(data)
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{p} has plan version {data.get('version')!r}; this bitalloc reads versions 1 and "
                            f"{PLAN_VERSION}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "plan"
            raise PlanError(f"{p} is not a valid plan: {where}: {err['msg']}") from None

    # ---- views ---------------------------------------------------------------------------
    def entry_map(self) -> dict[str, Entry]:
        return {e.tensor: e for e in self.entries}

    def summary(self) -> str:
        """A compact text report: budget, solver, bits histogram per role and per layer."""
        counted = [e for e in self.entries if not e.locked and not e.decomposed]
        widths = sorted({e.bits for e in counted})
        b = self.budget
        lines = [
            f"model      {self.model.path} ({self.model.arch})",
            f"budget     target {b.target} -> achieved {b.achieved_bpp:.4f} bpp over {b.counted_params:,} params "
            f"({b.achieved_bytes / 1e6:.2f} MB quantized; "
            + (f"predicted GGUF file {b.file_bytes / 1e6:.3f} MB)" if b.file_bytes is not None
               else f"{b.total_bytes / 1e6:.2f} MB with locked tensors at 16 bit)"),
            f"solver     {self.solver.name}: {self.solver.status}, predicted loss increase "
            + (f"{self.solver.objective:.5f} nats" if any(e.predicted_error for e in counted) else "n/a (no error table)")
            + (f", gap {self.solver.gap:.2e}" if self.solver.gap is not None else "")
            + f", {self.solver.seconds:.2f} s",
        ]
        lines += [f"note       {n}" for n in self.notes]
        if self.timings:
            lines.append("time       " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in self.timings.items()))
        header = f"{'':<14}" + "".join(f"{w:>3}b" for w in widths) + "   mean bpp   predicted (nats)"
        lines += ["", "bits by role", header]
        lines += _histogram_rows(counted, lambda e: e.role.value, widths)
        lines += ["", "bits by layer", header]
        lines += _histogram_rows(counted, lambda e: "-" if e.layer is None else str(e.layer), widths)
        locked = Counter(e.reason for e in self.entries if e.locked)
        if locked:
            lines += ["", "locked     " + ", ".join(f"{n} {r}" for r, n in sorted(locked.items()))]
        if self.decomposition:
            d = self.decomposition
            per_tensor = sorted({e.layer for e in self.entries if e.expert is not None and not e.decomposed})
            lines += ["", f"decomposed ({d.method}, {d.rank_slab} ranks per slab; mean factor bpp per expert); MoE "
                          f"layers per tensor: {', '.join(map(str, per_tensor)) or 'none'}"]
            for blk in d.blocks:
                per = [blk.expert_bits(e, d.group_size, d.symmetric) / (blk.rank * blk.factor_cols)
                       for e in range(len(blk.experts))]
                lines.append(f"L{blk.layer:<3}{blk.projection:<5} rank kept {blk.rank_kept:>5}/{blk.rank:<5} "
                             + " ".join(f"{x:5.2f}" for x in per))
        return "\n".join(lines)


def check_path(path: str | os.PathLike, what: str, error: type[BitallocError]) -> None:
    """Refuse, as ``error``, an input path the OS cannot even look up (a name over 255 bytes, a path over
    PATH_MAX, no permission on a parent): ``Path.is_file()`` raises on those instead of answering False.
    A path that does not exist passes; the caller says what is missing."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        hint = "use a shorter path" if exc.errno == errno.ENAMETOOLONG else "check the path and its permissions"
        raise error(f"cannot read {what} {str(path)[:80]}{'...' if len(str(path)) > 80 else ''}: {exc.strerror}; "
                    f"{hint}") from None
    except ValueError:  # an embedded NUL byte
        raise error(f"{what} path {str(path)[:80]!r} contains a NUL byte; fix the path") from None


def _migrate_v1(data: dict) -> dict:
    """A version-1 plan as version 2: the same choices, re-priced with zero points at the code width.

    The choices stay valid (every tensor costs fewer bits than v1 counted, so the budget still holds);
    ``achieved_bpp``, ``achieved_bytes``, ``total_bytes`` and each entry's ``bpp`` are recomputed.
    """
    try:
        entries = [Entry.model_validate(e) for e in data["entries"]]
        budget = dict(data["budget"])
        old_bpp = budget.get("achieved_bpp")
        notes = list(data.get("notes", []))
        if any(not e.shape or min(e.shape) < 1 or e.numel != math.prod(e.shape) for e in entries):
            raise ValueError("shape")
        counted = [e for e in entries if not e.locked]
        params = sum(e.numel for e in counted)
        bits = sum(e.storage_bits for e in counted)  # TypeError or ZeroDivisionError on a bad group size
        locked = sum(e.storage_bits for e in entries if e.locked)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # pydantic's ValidationError is a ValueError
        return {**data, "version": PLAN_VERSION}  # not migratable: validation as version 2 names the bad field
    budget.update(achieved_bpp=bits / params if params else 0.0, achieved_bytes=(bits + 7) // 8,
                  total_bytes=(bits + locked + 7) // 8)
    note = (f"re-priced from plan version 1 (16-bit zero per group) to {STORAGE_LAYOUT} storage: "
            f"{old_bpp} -> {budget['achieved_bpp']:.6f} bpp; the choices are unchanged")
    return {**data, "version": PLAN_VERSION, "layout": STORAGE_LAYOUT, "budget": budget,
            "entries": [e.model_copy(update={"bpp": e.storage_bits / e.numel}).model_dump(mode="json")
                        if not e.locked else e.model_dump(mode="json") for e in entries],
            "notes": [*notes, note]}


def _check_decomposition(plan: Plan) -> None:
    """Decomposed entries are exactly the decomposition's experts; every block tiles its ranks consistently."""
    decomposed = {e.tensor for e in plan.entries if e.decomposed}
    d = plan.decomposition
    if d is None:
        if decomposed:
            raise ValueError(f"{sorted(decomposed)[0]} is marked decomposed, but the plan has no decomposition")
        return
    by_name = plan.entry_map()
    named: list[str] = [t for b in d.blocks for t in b.experts]
    if len(named) != len(set(named)) or set(named) != decomposed:
        raise ValueError("decomposition blocks must name each decomposed entry exactly once")
    for b in d.blocks:
        where = f"decomposition block layer {b.layer} {b.projection}"
        if len(b.routing_share) != len(b.experts):
            raise ValueError(f"{where}: one routing share per expert")
        for t in b.experts:
            out_f, in_f = by_name[t].shape[0], by_name[t].shape[-1]
            dims = (in_f, out_f) if b.side == "input" else (out_f, in_f)
            if (b.basis_dim, b.factor_cols) != dims or len(by_name[t].shape) != 2:
                raise ValueError(f"{where}: {t} {by_name[t].shape} does not match basis_dim {b.basis_dim}, "
                                 f"factor_cols {b.factor_cols}")
        if b.rank > min(b.basis_dim, b.factor_cols * len(b.experts)):
            raise ValueError(f"{where}: rank {b.rank} exceeds what the experts span")
        pos = 0
        for s in b.slabs:
            if s.start != pos or s.stop <= s.start:
                raise ValueError(f"{where}: slabs must tile the ranks in order (gap or overlap at {pos})")
            if len(s.widths) != len(b.experts) or len(s.energy) != len(b.experts):
                raise ValueError(f"{where}: slab {s.start}:{s.stop} needs one width and one energy per expert")
            bad = [w for w in s.widths if w not in SPECTRAL_WIDTHS]
            if bad:
                raise ValueError(f"{where}: width {bad[0]} is not one of {list(SPECTRAL_WIDTHS)}")
            if any(s.widths) and not s.basis_kept:
                raise ValueError(f"{where}: ranks {s.start}:{s.stop} are used by an expert but not kept in the basis")
            pos = s.stop
        if pos != b.rank:
            raise ValueError(f"{where}: slabs cover {pos} of {b.rank} ranks")


def _check_segments(e: Entry, cands: set[str]) -> None:
    pos = 0
    for g in e.segments:
        if g.start != pos or g.stop <= g.start:
            raise ValueError(f"{e.tensor}: segments must tile the input columns in order (gap or overlap at {pos})")
        if g.candidate.id not in cands:
            raise ValueError(f"{e.tensor}: segment bits={g.bits} group_size={g.group_size} is not one of the candidates")
        pos = g.stop
    if pos != e.shape[-1]:
        raise ValueError(f"{e.tensor}: segments cover {pos} of {e.shape[-1]} input columns")
    if e.bits != max(g.bits for g in e.segments):
        raise ValueError(f"{e.tensor}: bits must be the widest segment's when segments are given")


def _histogram_rows(entries: list[Entry], key, widths: list[int]) -> list[str]:
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[key(e)].append(e)
    rows = []
    for name in sorted(groups, key=lambda s: (s.isdigit() and int(s), s)):
        es = groups[name]
        counts = Counter(e.bits for e in es)
        bpp = sum(e.storage_bits for e in es) / sum(e.numel for e in es)
        pred = sum(e.predicted_error.get(e.candidate.id, 0.0) for e in es)
        rows.append(f"{name:<14}" + "".join(f"{counts.get(w, 0):>4}" for w in widths) + f"   {bpp:8.3f}   {pred:16.5f}")
    return rows


def _as_matrix(shape: list[int]) -> tuple[int, int]:
    """Quantization groups run along the last (input) dimension."""
    return math.prod(shape[:-1]), shape[-1]


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file beside the target and a rename; returns ``path``.

    A reader never sees a half-written file and a failure leaves the old one. A symlinked ``path`` is
    written through (its target is replaced, the link kept), so the file the output policy checked
    (:mod:`bitalloc.api.outputs`) is the file replaced. An existing target that is not a regular file is
    refused here too, at write time: a rename over ``/dev/null`` or a FIFO would replace it with a regular
    file. The replaced file keeps its permission bits; a new one gets the umask default (0666 & ~umask).
    """
    target = Path(os.path.realpath(path))
    try:
        old_mode: Optional[int] = os.stat(target).st_mode
    except FileNotFoundError:
        old_mode = None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    if old_mode is not None and not stat.S_ISREG(old_mode):
        raise OutputError(f"refusing to write {path}: it exists and is not a regular file")
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {target.parent} does not exist")
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        # os.open applies the umask to 0o666, as open() does for a new file (mkstemp would give 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if old_mode is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(old_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:  # an interrupt too: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        raise
    return Path(path)


def json_schema() -> dict:
    schema = Plan.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://bitalloc.dev/schema/plan-v{PLAN_VERSION}.json"
    return schema


if __name__ == "__main__":  # regenerate the shipped schema: python -m bitalloc.plan
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=1) + "\n")
    print(f"wrote {SCHEMA_PATH}")
