"""Per-layer checkpoints of the calibration pass, so that ``--resume`` continues an interrupted run.

The pass visits decoder layers top-down; after each one, what it has learned so far fits in a
few files: the score-family answers of the layer's units (small arrays), and dL/dh at the
layer's input (one [sequences, seqlen, hidden] fp32 tensor, overwritten each layer). Before the
layers come the loss at the top and the lm_head's statistics, saved once. A resumed run repeats
the forward pass (it recomputes the layer inputs instead of keeping them on disk), loads the
checkpoint, and goes on from the first layer not done; every later computation is the one the
uninterrupted run would have made, so the table is identical (timings aside).

Checkpoints live in ``<workdir>/bitalloc-resume-<key>`` (workdir: ``--workdir``, else $TMPDIR),
where the key hashes everything the table depends on (checkpoint config and index, token ids,
candidates, seed, rounding, statistics budget, process count and rank); another run never
picks up a foreign checkpoint. The directory is removed when the pass completes. Files are
safetensors plus JSON, each written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.numpy import load_file as load_arrays, save_file as save_arrays
from safetensors.torch import load_file as load_tensors, save_file as save_tensors

Row = tuple[int, dict[str, np.ndarray], dict[str, float], dict[str, np.ndarray]]  # tokens, errors, stats, vectors


def resume_key(parts: dict[str, Any], ids: torch.Tensor) -> str:
    """A short hash of the pass's inputs; ``parts`` must be JSON-serialisable."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    h.update(ids.cpu().numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


class Checkpoints:
    """Read and write one pass's checkpoints; a disabled instance (``root`` None) does nothing."""

    def __init__(self, root: Optional[str | os.PathLike], key: str):
        self.dir = None if root is None else Path(root) / f"bitalloc-resume-{key}"
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    # ---- the top: loss and head statistics --------------------------------------------------
    def save_top(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if self.enabled:
            self._tensors("top.safetensors", tensors, meta)

    def load_top(self) -> Optional[tuple[dict, dict[str, torch.Tensor]]]:
        path = None if self.dir is None else self.dir / "top.safetensors"
        if path is None or not path.exists():
            return None
        return json.loads((self.dir / "top.json").read_text()), load_tensors(str(path))

    # ---- layers -----------------------------------------------------------------------------
    def save_layer(self, layer: int, rows: dict[int, Row], grad: torch.Tensor) -> None:
        """The layer's unit answers, then dL/dh at its input; ``done`` is updated last."""
        if not self.enabled:
            return
        arrays, meta = {}, {}
        for r, (tokens, errors, stats, vectors) in rows.items():
            meta[str(r)] = {"tokens": int(tokens), "stats": {k: float(v) for k, v in stats.items()},
                            "errors": sorted(errors), "vectors": sorted(vectors)}
            arrays.update({f"{r}.e.{k}": np.ascontiguousarray(v) for k, v in errors.items()})
            arrays.update({f"{r}.v.{k}": np.ascontiguousarray(v) for k, v in vectors.items()})
        self._write(f"layer-{layer}.safetensors", lambda p: save_arrays(arrays, p))
        self._write(f"layer-{layer}.json", lambda p: Path(p).write_text(json.dumps(meta)))
        self._tensors("grad.safetensors", {"grad": grad.contiguous()}, {"layer": layer})

    def done(self) -> Optional[int]:
        """The lowest layer whose answers and dL/dh are saved (layers above it are done too), or None."""
        path = None if self.dir is None else self.dir / "grad.json"
        if path is None or not path.exists():
            return None
        return int(json.loads(path.read_text())["layer"])

    def load_layer(self, layer: int) -> dict[int, Row]:
        arrays = load_arrays(str(self.dir / f"layer-{layer}.safetensors"))
        meta = json.loads((self.dir / f"layer-{layer}.json").read_text())
        return {int(r): (m["tokens"], {k: arrays[f"{r}.e.{k}"] for k in m["errors"]}, m["stats"],
                         {k: arrays[f"{r}.v.{k}"] for k in m["vectors"]}) for r, m in meta.items()}

    def load_grad(self) -> torch.Tensor:
        return load_tensors(str(self.dir / "grad.safetensors"))["grad"]

    def finish(self) -> None:
        """The pass completed: its checkpoints are no longer needed."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- atomic files -----------------------------------------------------------------------
    def _tensors(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """``name`` (safetensors, CPU copies) and its JSON ``meta`` beside it; the JSON last, as the commit."""
        self._write(name, lambda p: save_tensors({k: v.detach().cpu() for k, v in tensors.items()}, p))
        self._write(name.replace(".safetensors", ".json"), lambda p: Path(p).write_text(json.dumps(meta)))

    def _write(self, name: str, write) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.dir)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, self.dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
