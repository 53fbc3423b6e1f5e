"""A bitalloc checkpoint loaded by plain transformers vs by bitalloc: the same held-out perplexity?

    python benchmarks/transformers_load.py ../shared/models/llama-dense-16m --calib ../shared/data/python-calib.txt.xz \
        --heldout ../shared/data/python-heldout.txt.xz --budget 3.0 [--method gptq] [--candidates 2s,3s,4s,8s] \
        [--role-bits expert_gate=3:3 ...]

Allocates a plan (symmetric candidates by default: compressed-tensors 0.20.1 cannot load asymmetric
pack-quantized checkpoints through transformers, see tests/test_quantized_checkpoint.py), quantizes it, then
measures the evaluation protocol's perplexity (first 32768 held-out tokens, windows of 512, fp32) twice:
``bitalloc.evaluate_quantized`` (QuantLinear) and ``AutoModelForCausalLM.from_pretrained`` (compressed-tensors
decompresses the weights). MoE experts must share one width per projection for transformers (it decompresses
every expert with one config group), hence ``--role-bits`` for MoE models. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import bitalloc
from bitalloc.api import CalibrationConfig, Constraints, SolveConfig, evaluate_quantized
from bitalloc.api.config import parse_candidates
from bitalloc.api.quantization import _total_loss
from bitalloc.model.calib import EVAL_SEQLEN, EVAL_TOKENS, eval_windows, tokenize
from bitalloc.progress import SILENT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--budget", default="3.0")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--candidates", default="2s,3s,4s,8s")
    ap.add_argument("--role-bits", nargs="*", default=[])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--work", type=Path, help="keep the quantized checkpoint here (reused when present)")
    args = ap.parse_args()
    cal = CalibrationConfig(tokens=args.calib_tokens, device="cpu", candidates=tuple(parse_candidates(args.candidates)))
    solve = SolveConfig(constraints=Constraints(role_bits=tuple(args.role_bits)))
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.work or Path(tmp)) / "q"
        if not out.is_dir():
            plan = bitalloc.allocate(args.model, args.budget, args.calib, calibration=cal, solve=solve)
            bitalloc.quantize(args.model, plan, args.method, args.calib, out=out, calibration=cal)
        plan = bitalloc.Plan.load(out / "bitalloc-plan.json")
        t0 = time.perf_counter()
        ours = evaluate_quantized(out, args.heldout, device="cpu")
        t_ours = time.perf_counter() - t0
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
        ids = eval_windows(tokenize(out, args.heldout), EVAL_TOKENS, EVAL_SEQLEN)
        with torch.no_grad():
            hf(input_ids=ids[:1, :8])  # compressed-tensors decompresses the weights on the model's first call
        hf_ppl = math.exp(_total_loss(hf, ids, SILENT) / (ids.shape[0] * (ids.shape[1] - 1)))
        t_hf = time.perf_counter() - t0
    print(json.dumps({"model": Path(args.model).name, "budget": args.budget, "achieved_bpp": plan.budget.achieved_bpp,
                      "method": args.method, "candidates": args.candidates, "role_bits": args.role_bits,
                      "ppl_bitalloc": round(ours.perplexity, 5), "ppl_transformers": round(hf_ppl, 5),
                      "rel_diff": abs(hf_ppl / ours.perplexity - 1), "eval_s_bitalloc": round(t_ours, 1),
                      "eval_s_transformers": round(t_hf, 1)}))


if __name__ == "__main__":
    main()
