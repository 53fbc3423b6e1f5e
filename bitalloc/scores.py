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


@dataclass
class ErrorTable:
    """Per unit (row) and candidate (column): predicted loss increase in nats."""

    tensors: list[str]
    candidates: list[Candidate]
    errors: np.ndarray  # [U, C] predicted increase of the calibration loss (nats)
    local: np.ndarray  # [U, C] layer-local output error tr(dW H dW^T) / tokens (diagnostic)
    tokens: np.ndarray  # [U] calibration tokens that reached the unit (experts: routed tokens)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        u, c = len(self.tensors), len(self.candidates)
        for name in ("errors", "local"):
            if getattr(self, name).shape != (u, c):
                raise ScoresError(f"error table {name} has shape {getattr(self, name).shape}, expected {(u, c)}")
        self._row = {t: i for i, t in enumerate(self.tensors)}

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
        blob = save({"errors": self.errors.astype(np.float64), "local": self.local.astype(np.float64),
                     "tokens": self.tokens.astype(np.int64)}, metadata={"bitalloc": json.dumps(header)})
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
        if header.get("format") != SCORES_FORMAT or header.get("version") != SCORES_VERSION:
            raise ScoresError(f"{p} is not a bitalloc score file of version {SCORES_VERSION}")
        return cls(header["tensors"], [Candidate(**c) for c in header["candidates"]], arrays["errors"],
                   arrays["local"], arrays["tokens"], header["meta"])

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
