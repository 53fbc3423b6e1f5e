"""Error tables: the predicted cost of every (unit, candidate), saved once, re-solved for free.

The table is what flows from ``sensitivity/`` to ``allocator/``: plain numpy arrays plus
metadata, stored as one safetensors file (arrays as tensors, metadata as JSON in the
header). It records the model and calibration hashes, so a table computed for another
checkpoint, calibration file or candidate set is refused instead of silently reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ScoresError
from ..plan import SLAB_WIDTH, Candidate, atomic_write_bytes

SCORES_FORMAT = "bitalloc.scores"
SCORES_VERSION = 2
DEFAULT_SCORE = "gradient"  # the best measured predictor on the validation models (docs/sensitivity.md)


@dataclass
class ErrorTable:
    """Per unit (row) and candidate (column): the predicted error of every score, also per column slab.

    ``scores`` holds one [S, C] array per predictor (``fisher``, ``hessian``, ``combined``, ...; see
    docs/sensitivity.md); ``score`` names the one the allocator reads through :attr:`slab_errors`
    and :attr:`errors`, and :meth:`using` switches it without recomputing anything. ``stats`` are
    per-unit diagnostics ([U] arrays), ``vectors`` per-unit arrays of any length (ragged, with offsets).
    """

    tensors: list[str]
    candidates: list[Candidate]
    tokens: np.ndarray  # [U] calibration tokens that reached the unit (experts: routed tokens)
    scores: dict[str, np.ndarray]  # name -> [S, C] predicted error of each SLAB_WIDTH-column slab of every unit
    slab_offsets: np.ndarray  # [U + 1] unit u owns slab rows slab_offsets[u]:slab_offsets[u + 1]
    score: str
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (values, [U+1] offsets)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        u, c = len(self.tensors), len(self.candidates)
        n_slabs = int(self.slab_offsets[-1]) if u else 0
        if self.slab_offsets.shape != (u + 1,) or self.tokens.shape != (u,) or \
                any(a.shape != (n_slabs, c) for a in self.scores.values()) or \
                any(a.shape != (u,) for a in self.stats.values()):
            raise ScoresError("error table arrays have inconsistent shapes")
        if self.score not in self.scores:
            raise ScoresError(f"the error table has no score {self.score!r}; it has {', '.join(sorted(self.scores))}")
        self._row = {t: i for i, t in enumerate(self.tensors)}
        self.slab_errors = self.scores[self.score]
        # per-unit errors: the sum of the unit's slabs
        self.errors = np.add.reduceat(self.slab_errors, self.slab_offsets[:-1], axis=0) if u else np.zeros((0, c))

    @classmethod
    def empty(cls, candidates: list[Candidate]) -> "ErrorTable":
        return cls([], list(candidates), np.zeros(0, np.int64), {"none": np.zeros((0, len(candidates)))},
                   np.zeros(1, np.int64), "none")

    def using(self, score: str) -> "ErrorTable":
        """The same table with ``score`` as the error the allocator reads."""
        if score not in self.scores:
            hint = " (`bitalloc scores` computes every score, `combined` included)" if score == "combined" else ""
            raise ScoresError(f"score file has no score {score!r}; it has {', '.join(sorted(self.scores))}{hint}")
        return replace(self, score=score)

    def unit_errors(self, score: str) -> np.ndarray:
        """[U, C] per-unit errors of any score in the table."""
        return self.using(score).errors

    def slabs(self, tensor: str) -> np.ndarray:
        r = self._row[tensor]
        return self.slab_errors[self.slab_offsets[r]:self.slab_offsets[r + 1]]

    def row(self, tensor: str) -> int:
        return self._row[tensor]

    def has(self, tensor: str) -> bool:
        return tensor in self._row

    def column(self, cand: Candidate) -> int:
        for j, c in enumerate(self.candidates):
            if c == cand:
                return j
        raise ScoresError(f"candidate {cand.id} is not in the error table ({', '.join(c.id for c in self.candidates)})")

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save

        header = {"format": SCORES_FORMAT, "version": SCORES_VERSION, "tensors": self.tensors, "score": self.score,
                  "candidates": [c.model_dump() for c in self.candidates], "meta": self.meta,
                  "slab_width": SLAB_WIDTH}
        arrays = {"slab_offsets": self.slab_offsets.astype(np.int64), "tokens": self.tokens.astype(np.int64)}
        arrays.update({f"score.{k}": v.astype(np.float64) for k, v in self.scores.items()})
        arrays.update({f"stat.{k}": v.astype(np.float64) for k, v in self.stats.items()})
        for k, (values, offsets) in self.vectors.items():
            arrays[f"vector.{k}"], arrays[f"vector_offsets.{k}"] = values.astype(np.float64), offsets.astype(np.int64)
        blob = save(arrays, metadata={"bitalloc": json.dumps(header)})
        return atomic_write_bytes(Path(path), blob)

    @classmethod
    def load(cls, path: str | Path) -> "ErrorTable":
        from safetensors import SafetensorError
        from safetensors.numpy import load

        p = Path(path)
        if not p.is_file():
            raise ScoresError(f"score file not found: {p}")
        raw = p.read_bytes()
        try:
            arrays = load(raw)
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["bitalloc"])
        except (SafetensorError, KeyError, ValueError, TypeError):
            raise ScoresError(f"{p} is not a bitalloc score file (corrupt or wrong format)") from None
        if header.get("format") != SCORES_FORMAT or header.get("version") != SCORES_VERSION \
                or header.get("slab_width") != SLAB_WIDTH:
            raise ScoresError(f"{p} is not a bitalloc score file of version {SCORES_VERSION}; recompute it")

        def group(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        offsets = group("vector_offsets.")
        try:
            return cls(header["tensors"], [Candidate(**c) for c in header["candidates"]], arrays["tokens"],
                       group("score."), arrays["slab_offsets"], header["score"], group("stat."),
                       {k: (v, offsets[k]) for k, v in group("vector.").items()}, header["meta"])
        except KeyError:
            raise ScoresError(f"{p} is not a complete bitalloc score file; recompute it") from None

    def check_matches(self, config_sha256: str, index_sha256: str, candidates: list[Candidate],
                      tensors: list[str]) -> None:
        """Refuse a stale table: other model, other candidates, or units it does not cover."""
        if self.meta.get("config_sha256") != config_sha256 or self.meta.get("index_sha256") != index_sha256:
            raise ScoresError("score file was computed for a different checkpoint (config or weights hash differs); "
                              "recompute it with --calib")
        missing = [c.id for c in candidates if c not in self.candidates]
        if missing:
            raise ScoresError(f"score file has no errors for candidate(s) {', '.join(missing)}; recompute with --calib")
        absent = [t for t in tensors if t not in self._row]
        if absent:
            raise ScoresError(f"score file does not cover {absent[0]} (computed with other --include flags?); "
                              "recompute with --calib")

    def check_calibration(self, sha256: str, seqlen: int, seed: int) -> None:
        """Refuse a table computed from other calibration text, windows or seed than the user named."""
        cal = self.meta.get("calibration") or {}
        if cal.get("sha256") != sha256:
            raise ScoresError("score file was computed from other calibration text; drop --calib to reuse it, "
                              "or drop --scores to recompute")
        if (cal.get("seqlen"), cal.get("seed")) != (seqlen, seed):
            raise ScoresError(f"score file was computed with --seqlen {cal.get('seqlen')} --seed {cal.get('seed')}, "
                              f"not {seqlen} / {seed}; drop --calib to reuse it, or drop --scores to recompute")
