"""The settings of a call, as two frozen configs with every default in one place.

``CalibrationConfig`` says how the sensitivity pass reads the model and the calibration text (it
decides what the error table holds); ``SolveConfig`` says how a table becomes a plan. ``allocate``,
``frontier`` and ``compute_scores`` take the same configs, and the CLI builds its options from these
defaults, so a default is never written twice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..allocator import SOLVERS, Constraints
from ..allocator.ilp import DEFAULT_TIME_LIMIT_S
from ..allocator.units import GRANULARITIES
from ..errors import BitallocError, ConstraintError
from ..model.calib import CALIB_SEQLEN, CALIB_TOKENS
from ..plan import DEFAULT_CANDIDATES, SLAB_WIDTH, Candidate
from ..sensitivity.table import DEFAULT_SCORE


@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibration pass runs: ``tokens`` in windows of ``seqlen`` sampled with ``seed``.

    ``include_lm_head`` / ``include_embeddings`` unlock those tensors (locked at 16 bit by default);
    ``candidates`` are the (bits, group) choices the table prices.
    """

    tokens: int = CALIB_TOKENS
    seqlen: int = CALIB_SEQLEN
    seed: int = 0
    device: str = "auto"
    include_lm_head: bool = False
    include_embeddings: bool = False
    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES


@dataclass(frozen=True)
class SolveConfig:
    """How a table becomes a plan.

    ``solver``: auto | ilp | lagrangian | closed-form | greedy; ``score``: the predictor minimised;
    ``granularity``: tensor | expert | slab; ``constraints``: pins and bit bounds; ``time_table``
    (seconds per parameter of each candidate id) with ``time_budget`` adds a kernel-time constraint;
    ``time_limit_s`` bounds CP-SAT (the plan reports the gap if it is hit).
    """

    solver: str = "auto"
    score: str = DEFAULT_SCORE
    granularity: str = "tensor"
    constraints: Constraints = field(default_factory=Constraints)
    time_table: Optional[Mapping[str, float]] = None
    time_budget: Optional[float] = None
    time_limit_s: float = DEFAULT_TIME_LIMIT_S

    def __post_init__(self) -> None:
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


def parse_candidates(text: str) -> list[Candidate]:
    """``'2,3,4,8'``, ``'2g64,3g128,4g128'`` or ``'4g128s'``: bits, optionally a group size (default 128) and
    ``s`` for symmetric (no zero point stored)."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:g(\d+))?(s?)\s*", item)
        try:
            if not m:
                raise ValueError(item)
            out.append(Candidate(bits=int(m.group(1)), group_size=int(m.group(2) or SLAB_WIDTH), symmetric=bool(m.group(3))))
        except ValueError:
            raise BitallocError(f"cannot parse --candidates {text!r}: use e.g. '2,3,4,8', '2g64,3g128,4g128' or "
                                "'4g128s' (s: symmetric)") from None
    return out


def candidates_text(candidates: tuple[Candidate, ...]) -> str:
    """The inverse of :func:`parse_candidates`."""
    return ",".join(f"{c.bits}{'' if c.group_size == SLAB_WIDTH else f'g{c.group_size}'}{'s' if c.symmetric else ''}"
                    for c in candidates)
