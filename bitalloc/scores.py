"""Error tables: the predicted cost of every (unit, candidate), saved once, re-solved for free.

The table is what flows from ``sensitivity/`` to ``allocator/``: plain numpy arrays plus
metadata, stored as one safetensors file (arrays as tensors, metadata as JSON in the
header). It records the model and calibration hashes, so a table computed for another
checkpoint, calibration file or candidate set is refused instead of silently reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ScoresError
from .plan import Candidate, atomic_write_bytes

SCORES_FORMAT = "bitalloc.scores"
SCORES_VERSION = 1


SLAB_WIDTH = 128  # input columns per slab: the unit of --granularity slab, and the default group size


@dataclass
class ErrorTable:
    """Per unit (row) and candidate (column): predicted loss increase in nats, also per column slab."""

    tensors: list[str]
    candidates: list[Candidate]
    local: np.ndarray  # [U, C] layer-local output error tr(dW H dW^T) / tokens (diagnostic)
    tokens: np.ndarray  # [U] calibration tokens that reached the unit (experts: routed tokens)
    slab_errors: np.ndarray  # [S, C] predicted error of each SLAB_WIDTH-column slab of every unit
    slab_offsets: np.ndarray  # [U + 1] unit u owns slab rows slab_offsets[u]:slab_offsets[u + 1]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        u, c = len(self.tensors), len(self.candidates)
        if self.local.shape != (u, c) or self.slab_offsets.shape != (u + 1,) or \
                self.slab_errors.shape != (int(self.slab_offsets[-1]) if u else 0, c):
            raise ScoresError("error table arrays have inconsistent shapes")
        self._row = {t: i for i, t in enumerate(self.tensors)}
        # per-unit errors: the sum of the unit's slabs
        self.errors = np.add.reduceat(self.slab_errors, self.slab_offsets[:-1], axis=0) if u else np.zeros((0, c))

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

        header = {"format": SCORES_FORMAT, "version": SCORES_VERSION, "tensors": self.tensors,
                  "candidates": [c.model_dump() for c in self.candidates], "meta": self.meta}
        header["slab_width"] = SLAB_WIDTH
        blob = save({"slab_errors": self.slab_errors.astype(np.float64), "slab_offsets": self.slab_offsets.astype(np.int64),
                     "local": self.local.astype(np.float64), "tokens": self.tokens.astype(np.int64)},
                    metadata={"bitalloc": json.dumps(header)})
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
        try:
            return cls(header["tensors"], [Candidate(**c) for c in header["candidates"]], arrays["local"],
                       arrays["tokens"], arrays["slab_errors"], arrays["slab_offsets"], header["meta"])
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

    def check_calibration(self, sha256: str) -> None:
        """Refuse a table computed from other calibration text than the file the user named."""
        recorded = (self.meta.get("calibration") or {}).get("sha256")
        if recorded != sha256:
            raise ScoresError("score file was computed from other calibration text; drop --calib to reuse it, "
                              "or drop --scores to recompute")
