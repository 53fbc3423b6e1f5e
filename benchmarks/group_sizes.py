"""Do smaller groups at 2 and 3 bits (g64, g32) earn a place in the default candidates?

    python benchmarks/group_sizes.py ../shared/models/llama-dense-16m \
        --calib ../shared/data/python-calib.txt.xz --heldout ../shared/data/python-heldout.txt.xz

One error table with the extended set {2, 3} x {g32, g64, g128} + {4, 8} x g128 (compressed-tensors
pricing: a 2-bit g32 group costs 2 + 18/32 = 2.5625 bpp); at every budget the plan from the default
candidates and the plan from the extended set are solved from it and evaluated (RTN, docs/eval.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import bitalloc
from bitalloc.api import CalibrationConfig
from bitalloc.api.config import parse_candidates
from bitalloc.errors import ScoresError
from bitalloc.plan import DEFAULT_CANDIDATES
from bitalloc.sensitivity.table import ErrorTable
from cache import model_parser

EXTENDED = tuple(parse_candidates("2g32,2g64,2,3g32,3g64,3,4,8"))


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.25, 2.5, 2.75, 3.0, 3.25])
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    out = Path(args.out) / Path(args.model).name
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scores-groups.safetensors"
    try:
        table = ErrorTable.load(path)
    except ScoresError:
        table = bitalloc.compute_scores(args.model, args.calib, CalibrationConfig(candidates=EXTENDED))
        table.save(path)
    rows = []
    for budget in args.budgets:
        row = {"budget": budget}
        for name, cands in (("default", DEFAULT_CANDIDATES), ("extended", EXTENDED)):
            plan = bitalloc.allocate(args.model, f"{budget}bpp", scores=table,
                                     calibration=CalibrationConfig(candidates=cands))
            used = sorted({e.candidate.id for e in plan.entries if not e.locked})
            row[name] = {"ppl": round(bitalloc.evaluate(args.model, args.heldout, plan=plan).perplexity, 4),
                         "bpp": round(plan.budget.achieved_bpp, 4), "predicted": round(plan.solver.objective, 5),
                         "used": used}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "group_sizes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
