"""What every benchmark script shares: its command line (model, calibration and held-out text), the per-model
output folder and the cached error table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import bitalloc
from bitalloc.errors import ScoresError
from bitalloc.sensitivity.table import ErrorTable


def cached_scores(model: str, calib: str, out_root: str) -> tuple[Path, ErrorTable, Optional[float]]:
    """(out_root/<model name>, the error table, seconds it took or None when read from the cache)."""
    out = Path(out_root) / Path(model).name
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scores.safetensors"
    if path.exists():
        try:
            return out, ErrorTable.load(path), None
        except ScoresError:  # written by an older version: recompute
            pass
    t0 = time.perf_counter()
    table = bitalloc.compute_scores(model, calib)
    table.save(path)
    return out, table, time.perf_counter() - t0


def model_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the arguments every model benchmark takes: MODEL, --calib TEXT and --heldout TEXT."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", required=True)
    return ap
