"""Closed form vs ILP vs greedy on the same error table: predicted error and held-out perplexity.

    python benchmarks/compare_solvers.py ../shared/models/llama-dense-16m \
        --calib ../shared/data/python-calib.txt.xz --heldout ../shared/data/python-heldout.txt.xz

Uses (or creates) the error table cached by compare_baselines.py in ``--out/<model>/scores.safetensors``.
Prints a markdown table and writes ``solvers.json`` there.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitalloc
from cache import cached_scores, model_parser

SOLVERS = ("ilp", "closed-form", "greedy")


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.25, 2.5, 2.75, 3.25])
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    out, table, _ = cached_scores(args.model, args.calib, args.out)
    rows = []
    for target in args.budgets:
        row = {"target": target}
        seen: dict[tuple, float] = {}
        for solver in SOLVERS:
            plan = bitalloc.allocate(args.model, budget=f"{target}bpp", scores=table, solve=bitalloc.SolveConfig(solver=solver))
            key = tuple((e.bits, e.group_size) for e in plan.entries)
            if key not in seen:  # identical plans need no second evaluation
                seen[key] = bitalloc.evaluate(args.model, args.heldout, plan=plan).perplexity
            row[solver] = {"bpp": plan.budget.achieved_bpp, "predicted": plan.solver.objective,
                           "ppl": seen[key], "name": plan.solver.name, "status": plan.solver.status,
                           "seconds": plan.solver.seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "solvers.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{Path(args.model).name}\n")
    print("| target bpp | " + " | ".join(f"{s}: bpp / predicted / ppl" for s in SOLVERS) + " |")
    print("|---|" + "---|" * len(SOLVERS))
    for r in rows:
        cells = [f"{r[s]['bpp']:.4f} / {r[s]['predicted']:.4f} / {r[s]['ppl']:.3f}" for s in SOLVERS]
        print(f"| {r['target']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
