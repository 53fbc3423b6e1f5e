"""Held-out perplexity of each rounding method (RTN, GPTQ, GSQ, DiscQuant) at uniform widths and on plans.

    python benchmarks/rounding.py ../shared/models/llama-dense-16m \
        --calib ../shared/data/python-calib.txt.xz --heldout ../shared/data/python-heldout.txt.xz \
        --bits 2 3 --group 128 [--plans plan-2.5.json ...] [--methods rtn gptq gsq discquant] [--device auto] \
        [--set gsq_steps=200]

Every tensor the default inventory quantizes (decoder linears; embeddings, head, norms and
routers stay in full precision) gets the same candidate; each method quantizes the model through
``bitalloc.rounding.apply.quantize_layers`` on GPTQ-style random calibration windows, and the
result is scored with the evaluation protocol of docs/eval.md (first 32768 held-out tokens in
windows of 512, fp32, one decoder layer at a time), the method's dequantized weights in place of
RTN fake-quantization. With ``--methods rtn`` the numbers equal ``bitalloc eval --bits B``.
With ``--plans`` each plan's widths (per tensor, segments included) are quantized by every method the
same way. Prints a markdown table (perplexity; the mean per-token NLL difference to GPTQ on the same setting
with its paired standard error over the held-out windows; wall seconds and peak memory of quantization: GPU
memory on CUDA, the process's peak RSS so far on CPU) and writes it as JSON with -o, a row at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

from bitalloc.model.calib import CALIB_SEQLEN, EVAL_SEQLEN, EVAL_TOKENS, calibration_windows, eval_windows, tokenize
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import build_inventory
from bitalloc.model.layerwise import LayerwiseModel, unit_view, window_loss
from bitalloc.plan import Candidate, Plan
from bitalloc.progress import tracker
from bitalloc.rounding.apply import METHODS, quantize_layers
from bitalloc.rounding.base import Quantized
from bitalloc.rounding.config import RoundingConfig
from cache import model_parser

EVAL_BATCH = 8


def window_nlls(ckpt: Checkpoint, ids: torch.Tensor, weights: dict[str, Quantized], device: str) -> list[float]:
    """Each held-out window's summed next-token NLL under docs/eval.md's protocol, with the given quantized
    tensors substituted (decoder tensors only): their sum over the predicted tokens gives the perplexity, and
    per-window differences between two methods give a paired standard error."""
    lm = LayerwiseModel(ckpt, device)
    units = {u.tensor: u for u in build_inventory(ckpt).quantized}
    by_layer: dict[int, list[str]] = {}
    for name in weights:
        by_layer.setdefault(units[name].layer, []).append(name)
    ids = ids.to(lm.device)
    with torch.no_grad():
        norm_w, head_w = lm.head_weights()
        h = lm.embedding_weight()[ids]
        for i in range(lm.num_layers):
            layer = lm.load_layer(i)
            for name in by_layer.get(i, []):
                unit_view(layer, units[name]).copy_(weights[name].dequantize())
            lm.run_layer_batched(layer, h, h, EVAL_BATCH)
            lm.release_layer(i)
        return [window_loss(lm.head_logits(h[s], norm_w, head_w), ids[s]) for s in range(len(ids))]


def perplexity(ckpt: Checkpoint, ids: torch.Tensor, weights: dict[str, Quantized], device: str) -> float:
    """docs/eval.md's perplexity with the given quantized tensors substituted."""
    return math.exp(sum(window_nlls(ckpt, ids, weights, device)) / (ids.shape[0] * (ids.shape[1] - 1)))


def pair_with_gptq(rows: list[dict], n_pred: int) -> None:
    """Give each row of a setting that has a GPTQ row its paired difference to it (``vs_gptq``)."""
    gptq = {r["setting"]: r for r in rows if r["method"] == "gptq"}
    for r in rows:
        if r["method"] != "gptq" and r["setting"] in gptq:
            r["vs_gptq"] = paired(r["window_nll"], gptq[r["setting"]]["window_nll"], n_pred)


def paired(a: list[float], b: list[float], n_pred: int) -> tuple[float, float]:
    """Mean per-token NLL difference a - b over the windows and its standard error (windows as samples)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    per_window = n_pred / len(d)
    return float(d.mean()) / per_window, float(d.std(correction=1)) / math.sqrt(len(d)) / per_window


def parse_overrides(items: list[str]) -> dict:
    """``name=value`` pairs for RoundingConfig, values parsed as JSON (tuples as lists)."""
    fields = {f.name: f for f in dataclasses.fields(RoundingConfig)}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown setting {name!r}; one of {', '.join(fields)}")
        v = json.loads(value)
        out[name] = tuple(v) if isinstance(v, list) else v
    return out


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 3])
    ap.add_argument("--plans", type=Path, nargs="*", default=[], help="plans (allocate -o) to quantize as well")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--seqlen", type=int, default=CALIB_SEQLEN)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", nargs="*", default=[], help="RoundingConfig overrides, e.g. gsq_steps=200")
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--verbose", action="store_true", help="log each layer's GSQ gain and DiscQuant's rounding")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    config = RoundingConfig(**parse_overrides(args.set))
    ckpt = Checkpoint(args.model)
    calib = calibration_windows(tokenize(ckpt.path, args.calib), args.calib_tokens, args.seqlen, config.seed)
    heldout = eval_windows(tokenize(ckpt.path, args.heldout), EVAL_TOKENS, EVAL_SEQLEN)
    n_pred = heldout.shape[0] * (heldout.shape[1] - 1)
    units = build_inventory(ckpt).quantized
    settings = [(f"uniform {b}-bit g{args.group}",
                 {u.tensor: [(0, u.shape[-1], Candidate(bits=b, group_size=args.group))] for u in units})
                for b in args.bits]
    settings += [(f"{p.name} ({plan.budget.achieved_bpp:.3f} bpp)",
                  {e.tensor: e.column_choices() for e in plan.entries if not e.locked})
                 for p, plan in ((p, Plan.load(p)) for p in args.plans)]
    rows = []
    with tracker() as track:
        for label, choices in settings:
            for method in args.methods:
                cuda = torch.cuda.is_available() and args.device != "cpu"
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                weights = quantize_layers(ckpt, choices, method, calib, config, args.device, track)
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() if cuda else \
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                nll = window_nlls(ckpt, heldout, weights, args.device)
                rows.append({"setting": label, "method": method, "perplexity": round(math.exp(sum(nll) / n_pred), 4),
                             "quantize_s": round(seconds, 1), "peak_mib": round(peak / 2**20), "window_nll": nll})
                pair_with_gptq(rows, n_pred)
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "window_nll"}), flush=True)
                if args.output:
                    args.output.write_text(json.dumps({"config": dataclasses.asdict(config), "rows": rows}, indent=1))
    print(f"\nconfig: {config}\ncalibration: {calib.shape[0]} x {calib.shape[1]} tokens; device {args.device}\n")
    print("| setting | method | perplexity | NLL/token vs GPTQ (paired SE) | quantize wall s | peak MiB |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        vs = "{:+.4f} ({:.4f})".format(*r["vs_gptq"]) if "vs_gptq" in r else ""
        print(f"| {r['setting']} | {r['method']} | {r['perplexity']:.3f} | {vs} | {r['quantize_s']} | {r['peak_mib']} |")


if __name__ == "__main__":
    main()
