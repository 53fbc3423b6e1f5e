"""One process vs torchrun with N processes: the same `bitalloc scores` table, and the wall time of each.

    python benchmarks/distributed.py ../shared/models/llama-dense-16m --calib ../shared/data/python-calib.txt.xz \
        --nproc 2 --tokens 8192 [--device cpu]

Runs the CLI exactly as a user would (``bitalloc scores`` and ``torchrun --nproc-per-node N -m bitalloc.cli
scores``), then prints one JSON line: wall seconds of each, the per-phase timings each table records, the peak
RSS of each run's processes (largest single process), and the largest relative difference per score
(``sensitivity.table.max_relative_difference``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bitalloc.sensitivity.table import ErrorTable, max_relative_difference


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the largest child process so far)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp, "one.safetensors"), Path(tmp, "many.safetensors")
        common = ["scores", args.model, "--calib", args.calib, "--calib-tokens", str(args.tokens),
                  "--device", args.device, "-q"]
        wall_one, rss_one = timed([sys.executable, "-m", "bitalloc.cli", *common, "-o", str(one)])
        wall_many, rss_many = timed([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                     str(args.nproc), "-m", "bitalloc.cli", *common, "-o", str(many)])
        a, b = ErrorTable.load(one), ErrorTable.load(many)
        diff = max_relative_difference(a, b)
        print(json.dumps({"model": Path(args.model).name, "tokens": args.tokens, "nproc": args.nproc,
                          "wall_s_one": round(wall_one, 1), f"wall_s_{args.nproc}": round(wall_many, 1),
                          "phases_one": {k: round(v, 1) for k, v in a.meta["timings"].items()},
                          f"phases_{args.nproc}": {k: round(v, 1) for k, v in b.meta["timings"].items()},
                          "peak_rss_mib_one": round(rss_one), "peak_rss_mib_max_so_far": round(rss_many),
                          "max_rel_diff": diff, "tokens_equal": bool(np.array_equal(a.tokens, b.tokens))}))


if __name__ == "__main__":
    main()
