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
from ..plan import SLAB_WIDTH, Candidate, Plan, atomic_write_bytes, check_path

IN_SUM2 = "in_sum2"  # table vector: per input column, the sum of squared inputs (llama.cpp's importance matrix)

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
        check_path(p, "score file", ScoresError)
        if not p.is_file():
            raise ScoresError(f"score file not found: {p}")
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise ScoresError(f"cannot read {p}: {exc.strerror}") from None
        try:
            arrays = load(raw)
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["bitalloc"])
        except (SafetensorError, KeyError, ValueError, TypeError, RecursionError):
            raise ScoresError(f"{p} is not a bitalloc score file (corrupt or wrong format)") from None
        if not isinstance(header, dict) or header.get("format") != SCORES_FORMAT \
                or header.get("version") != SCORES_VERSION or header.get("slab_width") != SLAB_WIDTH:
            raise ScoresError(f"{p} is not a bitalloc score file of version {SCORES_VERSION}; recompute it")

        def group(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        offsets = group("vector_offsets.")
        try:
            _check_header(header)
            candidates = [Candidate(**c) for c in header["candidates"]]
            _check_arrays(arrays, len(header["tensors"]), len(candidates))
            return cls(header["tensors"], candidates, arrays["tokens"],
                       group("score."), arrays["slab_offsets"], header["score"], group("stat."),
                       {k: (v, offsets[k]) for k, v in group("vector.").items()}, header["meta"])
        except KeyError:
            raise ScoresError(f"{p} is not a complete bitalloc score file; recompute it") from None
        except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise ScoresError(f"{p} is not a valid score file ({_first_error(exc)}); recompute it with `bitalloc "
                              "scores`") from None

    def check_plan(self, plan: Plan) -> None:
        """Refuse a table of another checkpoint than ``plan``'s (its predicted errors would be meaningless)."""
        self.check_matches(plan.model.config_sha256, plan.model.index_sha256, [], [])

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


# the metadata the allocator reads back (allocate, plans' provenance): a tampered type must not crash it there
_META_TYPES: dict[str, type] = {"config_sha256": str, "index_sha256": str, "calibration": dict, "calib_sequences": int,
                                "combined": dict, "formulas": dict, "rounding": str, "timings": dict}


class _Invalid(ScoresError, ValueError):
    """A field of a score file that fails validation (a ValueError too, so :meth:`ErrorTable.load` words it)."""


def max_relative_difference(a: ErrorTable, b: ErrorTable) -> dict[str, float]:
    """Per score shared by both tables: the largest |a - b| relative to the largest |a| of the same candidate.

    How two passes over the same model and candidates are compared (GPU vs CPU, one process vs several,
    code before vs after): relative to the candidate's scale, so that units with near-zero error do not
    turn rounding noise into huge ratios.
    """
    out = {}
    for name in sorted(set(a.scores) & set(b.scores)):
        x, y = a.scores[name], b.scores[name]
        out[name] = float((np.abs(x - y) / np.maximum(np.abs(x).max(axis=0, keepdims=True), 1e-300)).max())
    return out


def _check_header(header: dict) -> None:
    """The header's fields have the types the table is built from (a tampered file must not crash later)."""
    tensors, candidates, meta = header.get("tensors"), header.get("candidates"), header.get("meta")
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise _Invalid("'tensors' is not a list of names")
    if len(set(tensors)) != len(tensors):
        raise _Invalid("a tensor is listed twice")
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, dict) for c in candidates):
        raise _Invalid("'candidates' is not a non-empty list of objects")
    if not isinstance(meta, dict):
        raise _Invalid(f"'meta' is {type(meta).__name__}, not an object")
    for key, kind in _META_TYPES.items():
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise _Invalid(f"'meta.{key}' is {type(meta[key]).__name__}, not {kind.__name__}")
    if not isinstance(header.get("score"), str):
        raise _Invalid("'score' is not a name")


def _check_arrays(arrays: dict[str, np.ndarray], n_units: int, n_cands: int) -> None:
    """Offsets that index the slab rows, and errors that are finite with non-negative unit totals.

    A negative unit error rewards a width (a -36 nats "plan"), NaN poisons the solver, and offsets that
    run backwards or past the rows make each unit's error a sum over other units' slabs. Single slabs
    may be negative: the gradient score splits its first-order term across slabs and clips only the
    unit's total at 0 (sensitivity/gradient.py), so the totals are checked, to rounding.
    """
    offsets, tokens = arrays.get("slab_offsets"), arrays.get("tokens")
    if offsets is None or tokens is None:
        raise KeyError("slab_offsets")
    if offsets.dtype.kind not in "iu" or offsets.shape != (n_units + 1,):
        raise _Invalid(f"slab_offsets has shape {list(offsets.shape)} ({offsets.dtype}), expected [{n_units + 1}] "
                       "integers")
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
        raise _Invalid("slab_offsets do not start at 0 and increase")
    if tokens.shape != (n_units,):
        raise _Invalid(f"tokens has shape {list(tokens.shape)}, expected [{n_units}]")
    for name, a in arrays.items():
        if not name.startswith("score."):
            continue
        if a.shape != (int(offsets[-1]), n_cands):
            raise _Invalid(f"{name} has shape {list(a.shape)}, expected [{int(offsets[-1])}, {n_cands}]")
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise _Invalid(f"{name} holds non-finite errors")
        if n_units and (np.add.reduceat(a, offsets[:-1], axis=0)
                        < -1e-9 * np.add.reduceat(np.abs(a), offsets[:-1], axis=0)).any():
            raise _Invalid(f"{name} gives a unit a negative error")


def _first_error(exc: Exception) -> str:
    """The first line of a validation message, short enough for one ``error:`` line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        return f"candidates: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
