"""Every score family against measured truth: Spearman per family, and held-out ppl of each family's plans.

    python benchmarks/sensitivity_families.py ../shared/models/llama-dense-16m \
        --calib ../shared/data/python-calib.txt.xz --heldout ../shared/data/python-heldout.txt.xz

Ground truth (``bitalloc.sensitivity.truth``): calibration-loss increase when only that tensor is
RTN-quantized, measured on 8192 calibration tokens (16 windows of 512, seed 1, so not the windows
the error table was computed on). Cached in ``--out/<model>/truth.safetensors`` (about 1 s per
unit and width on 2 cores). For each score in the table: Spearman rank correlation with the 2-bit
and 3-bit truth over all decoder-layer tensors (for ``combined`` also over the tensors outside its
fitting sample), and held-out perplexity of its ILP plans at ``--budgets``. ``--repeat-truth``
also measures the 2-bit truth on other windows (seed 2) and reports the Spearman between the two
truths: the ceiling any predictor can reach against a truth this noisy. Writes ``families.json``
and prints markdown tables.
"""

from __future__ import annotations

import json
import time

from safetensors.numpy import load_file, save_file
from scipy.stats import spearmanr

import bitalloc
from bitalloc.model.calib import calibration_windows, tokenize
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import build_inventory
from bitalloc.plan import DEFAULT_CANDIDATES
from bitalloc.sensitivity.table import DEFAULT_SCORE
from bitalloc.sensitivity import combined
from bitalloc.sensitivity.truth import measure_truth
from cache import cached_scores, model_parser

TRUTH_TOKENS = 8192
TRUTH_SEED = 1
WIDTHS = (2, 3)


def truth_table(args, ckpt, inv, out, seed=TRUTH_SEED, widths=WIDTHS):
    path = out / ("truth.safetensors" if seed == TRUTH_SEED else f"truth-seed{seed}.safetensors")
    if path.exists():
        return load_file(str(path))["truth"], None
    cands = [c for c in DEFAULT_CANDIDATES if c.bits in widths]
    ids = calibration_windows(tokenize(args.model, args.calib), TRUTH_TOKENS, 512, seed)
    t0 = time.perf_counter()
    truth, _ = measure_truth(ckpt, inv, ids, cands)
    save_file({"truth": truth}, str(path))
    return truth, time.perf_counter() - t0


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--budgets", type=float, nargs="*", default=[2.5, 3.25])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--repeat-truth", action="store_true")
    args = ap.parse_args()
    ckpt = Checkpoint(args.model)
    inv = build_inventory(ckpt)
    out, table, score_s = cached_scores(args.model, args.calib, args.out)
    truth, truth_s = truth_table(args, ckpt, inv, out)
    units = inv.quantized
    rows = [table.row(u.tensor) for u in units]
    held_out = [k for k in range(len(units)) if k not in set(combined.sample_units(units, combined.SAMPLE_UNITS, 0))]
    result = {"model": ckpt.path.name, "units": len(rows), "truth_seconds": truth_s, "default": DEFAULT_SCORE,
              "timings": table.meta.get("timings"), "combined": table.meta.get("combined"), "scores": {}}
    if args.repeat_truth:
        again, _ = truth_table(args, ckpt, inv, out, seed=2, widths=(2,))
        result["truth_self_spearman_2bit"] = float(spearmanr(again[:, 0], truth[:, 0]).statistic)
        print("truth vs truth (other windows), 2-bit:", result["truth_self_spearman_2bit"], flush=True)
    for name in sorted(table.scores):
        errs = table.unit_errors(name)[rows]
        entry = {}
        for j, bits in enumerate(WIDTHS):
            pred = errs[:, table.column(next(c for c in table.candidates if c.bits == bits))]
            entry[f"spearman_{bits}bit"] = float(spearmanr(pred, truth[:, j]).statistic)
            if name == "combined":
                entry[f"spearman_{bits}bit_outside_sample"] = float(
                    spearmanr(pred[held_out], truth[held_out, j]).statistic)
        for b in args.budgets:
            plan = bitalloc.allocate(args.model, f"{b}bpp", scores=table, solve=bitalloc.SolveConfig(score=name))
            plan.save(out / f"plan-{name}-{b}.json")
            entry[f"ppl_{b}"] = bitalloc.evaluate(args.model, args.heldout, plan=plan).perplexity
        result["scores"][name] = entry
        print(name, json.dumps(entry), flush=True)
    best = {b: min(e[f"ppl_{b}"] for e in result["scores"].values()) for b in args.budgets}
    result["default_vs_best"] = {b: result["scores"][DEFAULT_SCORE][f"ppl_{b}"] / best[b] - 1 for b in args.budgets}
    (out / "families.json").write_text(json.dumps(result, indent=1))
    head = "| score | Spearman 2-bit | Spearman 3-bit | " + " | ".join(f"ppl {b}" for b in args.budgets) + " |"
    print(head + "\n|" + "---|" * (3 + len(args.budgets)))
    for name, e in result["scores"].items():
        print(f"| {name} | {e['spearman_2bit']:.3f} | {e['spearman_3bit']:.3f} | "
              + " | ".join(f"{e[f'ppl_{b}']:.3f}" for b in args.budgets) + " |")


if __name__ == "__main__":
    main()
