"""How well does the error table predict measured damage? Spearman against per-tensor ground truth.

    python benchmarks/sensitivity_truth.py ../shared/models/llama-dense-16m --calib ../shared/data/python-calib.txt.xz

Ground truth (``bitalloc.sensitivity.truth``): calibration-loss increase when only that tensor is
RTN-quantized, measured on 8192 calibration tokens (16 windows of 512, seed 1, so not the windows the
table was fitted on). Cached in ``--out/<model>/truth.safetensors``. Compares, at 2 and 3 bits, the
table's predicted error (Fisher diagonal, loss units) and its layer-local error tr(dW H dW^T) (what the
GPTQ/BAQ proxy ranks by) with the truth, and writes ``truth.json``.
"""

from __future__ import annotations

import argparse
import json
import time

from safetensors.numpy import load_file, save_file
from scipy.stats import spearmanr

from bitalloc.data import calibration_windows, tokenize
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import build_inventory
from bitalloc.plan import DEFAULT_CANDIDATES
from bitalloc.sensitivity.truth import measure_truth
from cache import cached_scores

TRUTH_TOKENS = 8192
TRUTH_SEED = 1
WIDTHS = (2, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    ckpt = Checkpoint(args.model)
    inv = build_inventory(ckpt)
    out, table, _ = cached_scores(args.model, args.calib, args.out)
    cands = [c for c in DEFAULT_CANDIDATES if c.bits in WIDTHS]
    truth_path = out / "truth.safetensors"
    seconds = None
    if truth_path.exists():
        truth = load_file(str(truth_path))["truth"]
    else:
        ids = calibration_windows(tokenize(args.model, args.calib), TRUTH_TOKENS, 512, TRUTH_SEED)
        t0 = time.perf_counter()
        truth, _ = measure_truth(ckpt, inv, ids, cands)
        seconds = time.perf_counter() - t0
        save_file({"truth": truth}, str(truth_path))
    rows = [table.row(u.tensor) for u in inv.quantized]
    result = {"model": ckpt.path.name, "units": len(rows), "truth_seconds": seconds}
    for j, c in enumerate(cands):
        col = table.column(c)
        for name, pred in (("fisher", table.errors[rows, col]), ("local_hessian", table.local[rows, col])):
            result[f"spearman_{name}_{c.bits}bit"] = float(spearmanr(pred, truth[:, j]).statistic)
        result[f"sum_truth_{c.bits}bit"] = float(truth[:, j].sum())
        result[f"sum_fisher_{c.bits}bit"] = float(table.errors[rows, col].sum())
    (out / "truth.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
