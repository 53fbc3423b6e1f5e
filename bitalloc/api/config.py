"""The settings of a call, as two frozen configs with every default in one place.

``CalibrationConfig`` says how the sensitivity pass reads the model and the calibration text (it
decides what the error table holds); ``SolveConfig`` says how a table becomes a plan. ``allocate``,
``frontier`` and ``compute_scores`` take the same configs, and the CLI builds its options from these
defaults, so a default is never written twice.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

from ..allocator import SOLVERS, Constraints
from ..allocator.constraints import MAX_BITS, MAX_GROUP_SIZE
from ..allocator.ilp import DEFAULT_TIME_LIMIT_S
from ..allocator.units import GRANULARITIES
from ..errors import BitallocError, CalibrationError, ConstraintError
from ..model.calib import CALIB_SEQLEN, CALIB_TOKENS
from ..plan import DEFAULT_CANDIDATES, GGML_CANDIDATES, GGML_CODES, RANK_SLAB, SLAB_WIDTH, Candidate, ggml_candidate
from ..sensitivity.table import DEFAULT_SCORE

if TYPE_CHECKING:
    from ..model.checkpoint import Checkpoint


METHODS = ("per-tensor", "bitsmoe")  # how MoE experts are allocated: whole tensors, or BitsMoE spectral slabs
DECOMPOSE = ("auto", "all")  # bitsmoe: each MoE layer decomposed where the solve finds it pays, or every one
ROUNDINGS = ("rtn", "gptq")  # the weight errors a table can predict (docs/sensitivity.md, rounding-aware plans)
# What the plan is for: a compressed-tensors checkpoint (bits + groups) or llama.cpp (ggml types, GGUF bytes;
# token embedding and output quantized by default, as llama-quantize does). Each target's default candidates:
TARGETS: dict[str, tuple[Candidate, ...]] = {"compressed-tensors": DEFAULT_CANDIDATES, "llamacpp": GGML_CANDIDATES}


@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibration pass runs: ``tokens`` in windows of ``seqlen`` sampled with ``seed``.

    ``target`` is what the plan is for (:data:`TARGETS`): ``llamacpp`` prices ggml types in GGUF bytes and
    predicts each type's error with llama.cpp's own quantizer. ``include_lm_head`` / ``include_embeddings``
    unlock those tensors (None: the target's default, locked for compressed-tensors, quantized for llama.cpp);
    ``candidates`` are the (bits, group) choices, or ggml types, the table prices (None: the target's).
    ``imatrix``: the errors are those of llama-quantize run with this pass's importance matrix
    (``--imatrix``; llamacpp only). ``rounding`` says whose weight error
    the table predicts: RTN's, or GPTQ's under each unit's H with the default ``RoundingConfig`` (a plan
    made for ``bitalloc quantize --method gptq``). ``workdir`` is where the run's work
    directory (memory-mapped activations, removed when the run ends however it ends) is made; None: $TMPDIR.
    It changes where files go, never what the table holds. ``resume`` keeps per-layer checkpoints of
    the pass in ``workdir`` (``sensitivity/resume.py``), so that running the same command again after
    an interruption continues after the last completed layer, with an identical table.
    """

    tokens: int = CALIB_TOKENS
    seqlen: int = CALIB_SEQLEN
    seed: int = 0
    device: str = "auto"
    include_lm_head: Optional[bool] = None
    include_embeddings: Optional[bool] = None
    candidates: Optional[tuple[Candidate, ...]] = None
    workdir: Optional[str] = None
    rounding: str = "rtn"  # whose weight error the table predicts: rtn, or gptq (rounding-aware plans)
    target: str = "compressed-tensors"
    imatrix: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise BitallocError(f"unknown --target {self.target!r}; choose one of {', '.join(TARGETS)}")
        llamacpp = self.target == "llamacpp"
        # None means "the target's default"; resolved once here so every reader sees plain values
        for name, value in (("include_lm_head", llamacpp), ("include_embeddings", llamacpp),
                            ("candidates", TARGETS[self.target])):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if any((c.ggml is not None) != llamacpp for c in self.candidates):
            raise BitallocError(f"--candidates {candidates_text(self.candidates)!r} do not suit --target {self.target}: "
                                + (f"give ggml types ({','.join(GGML_CODES)})" if llamacpp
                                   else "ggml types need --target llamacpp"))
        if self.imatrix and not llamacpp:
            raise BitallocError("an importance matrix (--imatrix) is for llama.cpp: add --target llamacpp")
        if llamacpp and self.rounding != "rtn":
            raise BitallocError(f"--rounding {self.rounding} does not apply to --target llamacpp: llama-quantize "
                                "rounds with its own quantizers, whose errors the table predicts")
        # Refused here, before any file is opened: each of these used to be silently replaced or crash hours in.
        check_count(self.seqlen, "--seqlen", "calibration window length in tokens")
        check_count(self.tokens, "--calib-tokens", "number of calibration tokens")
        if self.tokens < self.seqlen:
            raise CalibrationError(f"--calib-tokens {self.tokens} is less than one window of --seqlen {self.seqlen}; "
                                   "raise --calib-tokens or lower --seqlen")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConstraintError(f"--seed {self.seed!r} must be an integer in [0, 2^63)")
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise BitallocError(f"unknown device {self.device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if self.rounding not in ROUNDINGS:
            raise BitallocError(f"unknown --rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if not self.candidates:
            raise BitallocError("no candidates: give at least one, e.g. --candidates 2,3,4,8")
        for c in self.candidates:
            if c.ggml is None:
                check_candidate(c.bits, c.group_size)
        if len(set(self.candidates)) < len(self.candidates):
            raise BitallocError(f"--candidates {candidates_text(self.candidates)!r} lists a candidate twice; "
                                "list each once")


@dataclass(frozen=True)
class SolveConfig:
    """How a table becomes a plan.

    ``solver``: auto | ilp | lagrangian | closed-form | greedy; ``score``: the predictor minimised;
    ``granularity``: tensor | expert | slab; ``constraints``: pins and bit bounds; ``time_table``
    (seconds per parameter of each candidate id) with ``time_budget`` adds a kernel-time constraint;
    ``time_limit_s`` bounds CP-SAT (the plan reports the gap if it is hit). ``method`` "bitsmoe" stores MoE
    experts as a shared basis plus factors whose slabs of ``rank_slab`` ranks get widths (docs/bitsmoe.md), in
    the MoE layers where that pays (``decompose`` "auto") or in every one ("all", BitsMoE as published).
    """

    solver: str = "auto"
    score: str = DEFAULT_SCORE
    granularity: str = "tensor"
    constraints: Constraints = field(default_factory=Constraints)
    time_table: Optional[Mapping[str, float]] = None
    time_budget: Optional[float] = None
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    method: str = "per-tensor"
    rank_slab: int = RANK_SLAB
    decompose: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConstraintError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.decompose not in DECOMPOSE:
            raise ConstraintError(f"unknown --decompose {self.decompose!r}; choose one of {', '.join(DECOMPOSE)}")
        if isinstance(self.rank_slab, bool) or not isinstance(self.rank_slab, int) or self.rank_slab < 1:
            raise ConstraintError(f"rank slab {self.rank_slab!r} must be a positive number of ranks")
        if self.solver not in SOLVERS:
            raise ConstraintError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.granularity not in GRANULARITIES:
            raise ConstraintError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget >= 0):
            raise ConstraintError(f"--time-budget {self.time_budget} must be a finite number of seconds >= 0")

    def time_per_param(self, candidates: list[Candidate]) -> Optional[list[float]]:
        """Seconds per parameter of each candidate, when a time budget is set."""
        if self.time_budget is None:
            return None
        if not self.time_table:
            raise ConstraintError("a time budget needs a time table: seconds per parameter for each candidate id")
        missing = [c.id for c in candidates if c.id not in self.time_table]
        if missing:
            raise ConstraintError(f"the time table has no entry for candidate(s) {', '.join(missing)}")
        return [float(self.time_table[c.id]) for c in candidates]


MAX_COUNT = 2**31  # tokens or a window length beyond this is a typo, and overflows int32 indexing
MAX_POSITION_FACTOR = 4  # windows up to 4x the trained positions are warned about, longer ones refused
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_count(value: int, option: str, what: str) -> None:
    """A positive integer option (tokens, window length), bounded; 0 or negative used to be silently replaced."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_COUNT:
        raise CalibrationError(f"{option} {value!r} must be a positive integer (the {what}), at most {MAX_COUNT}")


def check_seqlen(ckpt: "Checkpoint", seqlen: int) -> None:
    """Warn about windows longer than the model's positions and refuse those far past them.

    Past ``max_position_embeddings`` the numbers measure a model extrapolating its position encoding
    (said in a warning: the fixed evaluation protocol's 512 exceeds some small models); past
    :data:`MAX_POSITION_FACTOR` times it they measure nothing useful, and attention time grows with the
    square of the window (65536 on a 1024-position model ran for minutes). Checked here, not by the
    checkpoint: the message names the option that sets the window, which the model layer does not know.
    """
    limit = ckpt.config.get("max_position_embeddings")
    if limit is None or seqlen <= limit:
        return
    if seqlen > MAX_POSITION_FACTOR * limit:
        raise CalibrationError(f"--seqlen {seqlen} is far beyond the model's max_position_embeddings {limit}; "
                               f"use --seqlen {limit} or less")
    warnings.warn(f"--seqlen {seqlen} exceeds the model's max_position_embeddings {limit}: the model "
                  "extrapolates its positions in every window", stacklevel=2)


def check_candidate(bits: int, group_size: int, symmetric: bool = False) -> Candidate:
    """One (bits, group) choice, in range: 1 <= bits <= 8 and 1 <= group <= 2^20."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise BitallocError(f"{bits!r} bits is out of range: use 1 to {MAX_BITS} bits")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise BitallocError(f"group size {group_size!r} is out of range: use 1 to {MAX_GROUP_SIZE} columns "
                            f"(default {SLAB_WIDTH})")
    return Candidate(bits=bits, group_size=group_size, symmetric=symmetric)


_CANDIDATE_SYNTAX = (f"use e.g. '2,3,4,8', '2g64,3g128,4g128' or '4g128s' (s: symmetric), or ggml types "
                     f"'{','.join(GGML_CODES)}' with --target llamacpp")
_GGML_NAME = re.compile(r"\s*[qQ]\d_[kK0]\s*")


def parse_candidates(text: str) -> list[Candidate]:
    """``'2,3,4,8'``, ``'2g64,3g128,4g128'`` or ``'4g128s'``: bits, optionally a group size (default 128) and
    ``s`` for symmetric (no zero point stored); or ggml type names (``'Q2_K,Q4_K,Q8_0'``)."""
    out = []
    for item in text.split(","):
        if _GGML_NAME.fullmatch(item):
            try:
                out.append(ggml_candidate(item))
            except ValueError as exc:
                raise BitallocError(f"--candidates: {exc}") from None
            continue
        m = re.fullmatch(r"\s*(\d+)(?:g(\d+))?(s?)\s*", item)
        try:
            if not m:
                raise ValueError(item)
            bits, group = int(m.group(1)), int(m.group(2) or SLAB_WIDTH)  # ValueError past 4300 digits
        except ValueError:
            raise BitallocError(f"cannot parse --candidates {text[:60]!r}: {_CANDIDATE_SYNTAX}") from None
        try:
            out.append(check_candidate(bits, group, bool(m.group(3))))
        except BitallocError as exc:
            raise BitallocError(f"--candidates {item.strip()[:40]!r}: {exc}; {_CANDIDATE_SYNTAX}") from None
    return out


def candidates_text(candidates: tuple[Candidate, ...]) -> str:
    """The inverse of :func:`parse_candidates`."""
    return ",".join(c.ggml or f"{c.bits}{'' if c.group_size == SLAB_WIDTH else f'g{c.group_size}'}{'s' if c.symmetric else ''}"
                    for c in candidates)
