"""Rounding-aware plans: a table whose errors are GPTQ's (``allocate --rounding gptq``) against the RTN table,
both plans quantized with GPTQ, held-out perplexity side by side.

    python benchmarks/rounding_aware.py ../shared/models/llama-dense-16m \
        --calib ../shared/data/python-calib.txt.xz --heldout ../shared/data/python-heldout.txt.xz --budgets 2.5 3.0

The RTN table is the cached one of the other benchmarks (``--out``); the GPTQ table is computed here
with the same calibration windows and cached beside it. Every plan is quantized by
``rounding.apply.quantize_layers(method="gptq")`` with the default ``RoundingConfig`` and scored with
the protocol of docs/eval.md (``rounding.py``'s evaluator).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import bitalloc
from bitalloc.api import CalibrationConfig
from bitalloc.errors import ScoresError
from bitalloc.model.calib import EVAL_SEQLEN, EVAL_TOKENS, calibration_windows, eval_windows, tokenize
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.rounding.apply import quantize_layers
from bitalloc.rounding.config import RoundingConfig
from bitalloc.sensitivity.table import ErrorTable
from cache import cached_scores, model_parser
from rounding import perplexity


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    out, rtn_table, _ = cached_scores(args.model, args.calib, args.out)
    path = out / "scores-gptq.safetensors"
    try:
        gptq_table = ErrorTable.load(path)
    except ScoresError:
        t0 = time.perf_counter()
        gptq_table = bitalloc.compute_scores(args.model, args.calib, CalibrationConfig(rounding="gptq"))
        gptq_table.save(path)
        print(json.dumps({"gptq_table_s": round(time.perf_counter() - t0, 1)}), flush=True)
    ckpt = Checkpoint(args.model)
    cal = gptq_table.meta["calibration"]
    calib = calibration_windows(tokenize(ckpt.path, args.calib), cal["tokens"], cal["seqlen"], cal["seed"])
    heldout = eval_windows(tokenize(ckpt.path, args.heldout), EVAL_TOKENS, EVAL_SEQLEN)
    rows = []
    for budget in args.budgets:
        for name, table in (("rtn-made", rtn_table), ("gptq-made", gptq_table)):
            made_for = CalibrationConfig(rounding=table.meta.get("rounding", "rtn"))
            plan = bitalloc.allocate(args.model, f"{budget}bpp", scores=table, calibration=made_for)
            plan.save(out / f"plan-{name}-{budget}.json")
            choices = {e.tensor: e.column_choices() for e in plan.entries if not e.locked}
            weights = quantize_layers(ckpt, choices, "gptq", calib, RoundingConfig(), args.device)
            rows.append({"budget": budget, "plan": name, "achieved_bpp": round(plan.budget.achieved_bpp, 4),
                         "gptq_ppl": round(perplexity(ckpt, heldout, weights, args.device), 4),
                         "predicted": round(plan.solver.objective, 5)})
            print(json.dumps(rows[-1]), flush=True)
    (out / "rounding_aware.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
