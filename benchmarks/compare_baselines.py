"""ILP plans vs uniform, position-heuristic and random plans at equal budgets (held-out ppl, RTN).

    python benchmarks/compare_baselines.py ../shared/models/llama-dense-16m \
        --calib ../shared/data/python-calib.txt.xz --heldout ../shared/data/python-heldout.txt.xz

Writes every plan and ``results.json`` under ``--out/<model name>/`` and prints a markdown table.
The error table is cached there (``scores.safetensors``) and reused when present.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from datetime import datetime, timezone

import numpy as np
import torch

import bitalloc
from bitalloc.allocator import position_priority, promote_in_order, random_assignment, uniform
from bitalloc.api import CalibrationConfig, ModelContext, SolveConfig, build_plan
from bitalloc.budget import parse_budget
from bitalloc.errors import BudgetError
from cache import cached_scores, model_parser

RANDOM_SEEDS = (0, 1, 2)


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.25, 2.5, 2.75, 3.0, 3.25])
    ap.add_argument("--eval-budgets", type=float, nargs="+", default=[2.5, 2.75, 3.0, 3.25])
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()

    ctx = ModelContext.build(args.model, CalibrationConfig(), SolveConfig())
    inv = ctx.inv
    out, table, score_s = cached_scores(args.model, args.calib, args.out)
    table = table.using(ctx.solve.score)
    units = inv.quantized
    tiers = position_priority([u.layer for u in units], [u.role.value for u in units], inv.num_layers)

    def ppl(plan) -> float:
        return bitalloc.evaluate(args.model, args.heldout, plan=plan).perplexity

    rows = []
    for target in args.budgets:
        budget = parse_budget(f"{target}bpp")
        t = time.perf_counter()
        plan = bitalloc.allocate(args.model, budget=budget.text, scores=table)
        resolve_s = time.perf_counter() - t
        plan.save(out / f"plan-ilp-{target}.json")
        row = {"target": target, "ilp_bpp": plan.budget.achieved_bpp, "status": plan.solver.status,
               "gap": plan.solver.gap, "resolve_s": resolve_s, "predicted": plan.solver.objective}
        if target in args.eval_budgets:
            problem = ctx.with_table(ctx.problem(budget), table)
            group_tier = [min(tiers[i] for i in m) for m in problem.members]
            baselines = {"heuristic": promote_in_order(problem, group_tier, "position-heuristic")}
            richest = max((c.bits for c in problem.candidates if _fits(problem, c.bits)), default=None)
            if richest is not None:
                baselines["uniform"] = uniform(problem, richest)
            for s in RANDOM_SEEDS:
                baselines[f"random{s}"] = random_assignment(problem, s)
            row["ilp_ppl"] = ppl(plan)
            for name, a in baselines.items():
                bplan = build_plan(ctx, problem, a, table, budget)
                bplan.save(out / f"plan-{name}-{target}.json")
                row[f"{name}_ppl"] = ppl(bplan)
                row[f"{name}_bpp"] = bplan.budget.achieved_bpp
                row[f"{name}_predicted"] = a.objective
            if richest is not None:
                row["uniform_bits"] = richest
            row["random_ppl"] = float(np.mean([row[f"random{s}_ppl"] for s in RANDOM_SEEDS]))
            row["random_bpp"] = float(np.mean([row[f"random{s}_bpp"] for s in RANDOM_SEEDS]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    refs = {f"uniform{b}": bitalloc.evaluate(args.model, args.heldout, bits=b).perplexity for b in (2, 3, 4)}
    refs["unquantized"] = bitalloc.evaluate(args.model, args.heldout).perplexity
    result = {"model": str(ctx.ckpt.path), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads",
              "scores_seconds": score_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "references": refs, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))


def _fits(problem, bits: int) -> bool:
    try:
        uniform(problem, bits)
        return True
    except BudgetError:
        return False


def markdown(result: dict) -> str:
    lines = [f"model `{result['model']}`; references: " + ", ".join(f"{k} {v:.3f}" for k, v in result["references"].items()),
             "", "| target bpp | ILP bpp | status | re-solve s | ILP ppl | uniform ppl | heuristic ppl (bpp) | random ppl, mean of 3 (bpp) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        uni = f"{r['uniform_ppl']:.3f} ({r['uniform_bits']}-bit)" if "uniform_ppl" in r else "-"
        if "ilp_ppl" in r:
            lines.append(f"| {r['target']} | {r['ilp_bpp']:.4f} | {r['status']} | {r['resolve_s']:.2f} | "
                         f"**{r['ilp_ppl']:.3f}** | {uni} | {r['heuristic_ppl']:.3f} ({r['heuristic_bpp']:.3f}) | "
                         f"{r['random_ppl']:.3f} ({r['random_bpp']:.3f}) |")
        else:
            lines.append(f"| {r['target']} | {r['ilp_bpp']:.4f} | {r['status']} | {r['resolve_s']:.2f} | - | - | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
