"""BitsMoE plans vs per-tensor plans vs uniform RTN at equal budgets, all through the CLI (held-out ppl).

`--method bitsmoe` decides per MoE layer whether a decomposition pays (`--decompose auto`, the default);
`--decompose all` (the method `bitsmoe-all` here) decomposes every layer, as BitsMoE is published.

    python benchmarks/bitsmoe.py ../shared/models/qwen3moe-20m \\
        --calib ../shared/data/python-calib.txt.xz --heldout ../shared/data/python-heldout.txt.xz

Every plan is made by `allocate` (`--method bitsmoe` or the default per-tensor method) and scored by the
same `bitalloc eval --plan`; both methods solve from one saved per-tensor error table (computed once,
`--save-scores`), and the BitsMoE runs add their spectral pass on the same calibration windows. Wall time
and peak RSS of each command come from `measure.py` (a fresh child per command). Writes plans, the
per-layer report of each BitsMoE plan (markdown rows and PNG) and ``results.json`` under
``--out/<model name>/``, and prints a markdown table: held-out perplexity (achieved bpp), the solver's
predicted loss increase against the measured one (ln ppl - ln ppl of the unquantized model, nats) and
which MoE layers each BitsMoE plan decomposes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from bitalloc.plan import Plan
from bitalloc.report.decomposition import decomposition_rows, layer_modes

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-c", "from bitalloc.cli import main; main()"]
METHODS = {"per-tensor": ["--method", "per-tensor"], "bitsmoe": ["--method", "bitsmoe"],
           "bitsmoe-all": ["--method", "bitsmoe", "--decompose", "all"]}


def measured(args: list[str]) -> tuple[int, dict, str]:
    """(exit code, {wall_s, peak_rss_mib}, combined output) of one CLI command run under measure.py."""
    proc = subprocess.run([sys.executable, str(HERE / "measure.py"), "--", *CLI, *args], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    stats = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return proc.returncode, stats, proc.stdout + proc.stderr


def perplexity(model: str, heldout: str, extra: list[str]) -> float:
    proc = subprocess.run([*CLI, "eval", model, "--text", heldout, "--json", "--quiet", *extra], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.0, 2.25, 2.5, 3.0])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--rank-slab", type=int, default=64)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["per-tensor", "bitsmoe"])
    ap.add_argument("--out", default="benchmarks/out/bitsmoe")
    args = ap.parse_args()
    out = Path(args.out) / Path(args.model).name
    out.mkdir(parents=True, exist_ok=True)
    scores = out / "scores.safetensors"  # one per-tensor error table, shared by every --rank-slab
    if args.rank_slab != 64:
        out = out / f"rank-slab-{args.rank_slab}"
        out.mkdir(exist_ok=True)
    calib = ["--calib", args.calib, "--calib-tokens", str(args.calib_tokens)]
    results: dict = {"model": args.model, "calib_tokens": args.calib_tokens, "rows": []}

    if not scores.exists():  # the per-tensor error table, once (the long pass)
        rc, stats, log = measured(["allocate", args.model, "--budget", "3.0bpp", *calib, "--save-scores", str(scores),
                                   "-o", str(out / "scores-plan.json"), "--quiet"])
        if rc:
            sys.exit(log)
        results["scores"] = stats
    results["unquantized"] = perplexity(args.model, args.heldout, [])  # what measured losses are counted from
    if "per-tensor" in args.methods:  # the baselines, once
        results["uniform"] = {f"{b}-bit": perplexity(args.model, args.heldout, ["--bits", str(b)]) for b in (2, 3)}
    for target in args.budgets:
        row: dict = {"target": target}
        for method in args.methods:
            path = out / f"plan-{method}-{target}.json"
            extra = [*calib, "--rank-slab", str(args.rank_slab)] if method != "per-tensor" else []
            rc, stats, log = measured(["allocate", args.model, "--budget", f"{target}bpp", "--scores", str(scores),
                                       *extra, *METHODS[method], "-o", str(path), "--quiet"])
            if rc == 2:  # a refused budget: infeasible for this method's candidates
                row[method] = {"infeasible": next(x for x in log.splitlines() if x.startswith("error:"))}
                continue
            if rc:
                sys.exit(log)
            plan = Plan.load(path)
            ppl = perplexity(args.model, args.heldout, ["--plan", str(path)])
            decomposed, per_tensor = layer_modes(plan)
            row[method] = {"bpp": plan.budget.achieved_bpp, "status": plan.solver.status, "gap": plan.solver.gap,
                           "predicted": plan.solver.objective, "timings": plan.timings, "allocate": stats,
                           "ppl": ppl, "measured": math.log(ppl / results["unquantized"]),
                           "decomposed_layers": decomposed, "per_tensor_layers": per_tensor}
            if plan.decomposition is not None:
                (out / f"report-{method}-{target}.md").write_text("\n".join(decomposition_rows(plan)) + "\n")
                subprocess.run([*CLI, "report", str(path), "--png", str(out / f"report-{method}-{target}.png")],
                               check=True, capture_output=True)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if "uniform" in results:
        print(f"\nunquantized {results['unquantized']:.3f}; uniform RTN " +
              ", ".join(f"{k} {v:.3f}" for k, v in results["uniform"].items()))
    print("| bpp | method | held-out ppl (achieved bpp) | predicted / measured loss (nats) | MoE layers decomposed "
          "| solve | allocate s / peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        for method in args.methods:
            m = r[method]
            if "infeasible" in m:
                print(f"| {r['target']} | {method} | infeasible | - | - | - | - |")
                continue
            layers = "-" if method == "per-tensor" else ",".join(map(str, m["decomposed_layers"])) or "none"
            solve = m["status"] + ("" if not m["gap"] else f", gap {m['gap']:.1e}")
            print(f"| {r['target']} | {method} | {m['ppl']:.3f} ({m['bpp']:.4f}) | {m['predicted']:.3f} / "
                  f"{m['measured']:.3f} | {layers} | {solve} | {m['allocate']['wall_s']:.0f} / "
                  f"{m['allocate']['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
