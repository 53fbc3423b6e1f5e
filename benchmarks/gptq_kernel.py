"""GPTQ's block loop on the fused Triton kernel against the torch loop: equal results, how much faster.

    python benchmarks/gptq_kernel.py              # ~2 minutes on an H200: a covering sample of cases
    python benchmarks/gptq_kernel.py --full       # every combination (several times longer)
    python benchmarks/gptq_kernel.py --shapes 3072x2048 --no-sweep

Each case quantizes one weight with ``gptq_with_losses_on("torch", ...)`` and ``("triton", ...)``
on the same (w, H) and prints one JSON line: the fraction of equal codes, whether scales, zeros
and losses are equal, the largest |difference| of the dequantized weights, the largest column-
loss difference relative to the largest loss, and the median wall time of each path (whole call:
Cholesky, kernel or loop, GEMM updates; ``torch.cuda.synchronize`` around each; the kernel path
after a compiling call, 3 runs; the launch-bound torch loop, which varies little, 3 runs for a
shape's first case and once otherwise, unless ``--torch-reps``). The kernel is
written to be bit-exact (see ``bitalloc/kernels/triton_gptq.py``), so anything but
``"exact": true`` is a finding. Data: ``random`` (Gaussian weights and inputs) and
``realistic`` (Student-t weights with outlier rows, inputs with heavy-tailed channel scales, a
shared low-rank component and dead channels; 4096 tokens at most, fewer than the widest layer's
inputs).
Then a sweep of the kernel's (rows per program, warps) on two shapes, and a summary line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitalloc.kernels import triton_gptq  # noqa: E402
from bitalloc.rounding.base import QuantizedWeight  # noqa: E402
from bitalloc.rounding.gptq import block_path, gptq_with_losses_on  # noqa: E402

SHAPES = ((3072, 2048), (16384, 2048), (2048, 8192), (4096, 4096))  # (out, in)
GROUPS = (128, 64)
WIDTHS = (2, 3, 4, 8)
SWEEP = ((4, 2), (4, 4), (8, 2), (8, 4), (16, 4), (16, 8), (32, 8))  # (rows per program, warps)
SWEEP_SHAPES = ((3072, 2048), (16384, 2048))
TIMED_REPS = 3

Result = tuple[QuantizedWeight, torch.Tensor]


def layer(out: int, inp: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, H) on the GPU; see the module docstring for the two kinds."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda")

    if kind == "random":
        x = randn(2 * inp, inp)
        return randn(out, inp) * 0.02, x.T @ x
    tokens = min(2 * inp, 4096)
    chi2 = randn(3, out, inp).pow(2).mean(0)
    w = randn(out, inp) / chi2.sqrt() * 0.02
    w[torch.randperm(out, generator=g, device="cuda")[: out // 100]] *= 8  # outlier rows
    channel = torch.exp(1.2 * randn(inp))  # log-normal channel scales: a few huge inputs
    x = randn(tokens, inp) * channel + randn(tokens, 32) @ randn(32, inp) * 0.5
    x[:, torch.randperm(inp, generator=g, device="cuda")[:4]] = 0  # dead inputs
    return w, x.T @ x


def timed(fn: Callable[[], Result], reps: int) -> tuple[Result, float]:
    """(last result, median seconds of ``reps`` calls), synchronized around each call."""
    times, result = [], None
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def compare(ref: Result, got: Result) -> dict[str, object]:
    (q_ref, loss_ref), (q, loss) = ref, got
    same = {"codes": torch.equal(q.codes, q_ref.codes), "scale": torch.equal(q.scale, q_ref.scale),
            "zero": torch.equal(q.zero, q_ref.zero), "loss": torch.equal(loss, loss_ref)}
    return {
        "exact": all(same.values()),
        "codes_equal": float((q.codes == q_ref.codes).float().mean()),
        "scale_zero_equal": same["scale"] and same["zero"],
        "losses_equal": same["loss"],
        "max_dq_diff": float((q.dequantize() - q_ref.dequantize()).abs().max()),
        "loss_rel_diff": float((loss - loss_ref).abs().max() / loss_ref.abs().max().clamp_min(1e-30)),
    }


def cases(full: bool) -> list[tuple[int, int, str, bool, bool]]:
    """(bits, group, kind, symmetric, act_order) per shape: every combination with ``full``, else
    each (bits, symmetric, act_order) once, with groups and data kinds alternating so that every
    (symmetric, act_order) meets both groups and both kinds."""
    combos = list(itertools.product(WIDTHS, (False, True), (False, True)))
    if full:
        return [(b, g, k, s, a) for (b, s, a), g, k in itertools.product(combos, GROUPS, ("random", "realistic"))]
    return [(b, GROUPS[(i // 4 + s + a) % 2], ("random", "realistic")[(i // 4 + a) % 2], s, a)
            for i, (b, s, a) in enumerate(combos)]


def run_case(shape: tuple[int, int], bits: int, group: int, kind: str, symmetric: bool, act_order: bool,
             torch_reps: int, seed: int) -> dict[str, object]:
    w, h = layer(*shape, kind, seed)
    args = (w, h, bits, group, symmetric, act_order)
    ref, t_torch = timed(lambda: gptq_with_losses_on("torch", *args), torch_reps)
    gptq_with_losses_on("triton", *args)  # compiles
    got, t_triton = timed(lambda: gptq_with_losses_on("triton", *args), TIMED_REPS)
    return {"shape": list(shape), "bits": bits, "group": group, "symmetric": symmetric, "act_order": act_order,
            "kind": kind, "dispatch": block_path(w.device, group, act_order), **compare(ref, got),
            "torch_s": round(t_torch, 4), "torch_reps": torch_reps,
            "triton_s": round(t_triton, 5), "speedup": round(t_torch / t_triton, 2)}


def sweep(shapes: tuple[tuple[int, int], ...]) -> list[dict[str, object]]:
    """Median time of the kernel path per (rows per program, warps): 4 bits, group 128, realistic data."""
    rows = []
    default = triton_gptq.DEFAULT
    try:
        for shape in shapes:
            w, h = layer(*shape, "realistic", 7)
            for block_rows, warps in SWEEP:
                triton_gptq.DEFAULT = triton_gptq.Config(block_rows, warps)
                gptq_with_losses_on("triton", w, h, 4, 128)  # compiles
                _, t = timed(lambda w=w, h=h: gptq_with_losses_on("triton", w, h, 4, 128), TIMED_REPS)
                row = {"sweep": True, "shape": list(shape), "block_rows": block_rows, "num_warps": warps,
                       "triton_s": round(t, 5), "default": triton_gptq.DEFAULT == default}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        triton_gptq.DEFAULT = default
    return rows


def summarize(rows: list[dict[str, object]], sweep_rows: list[dict[str, object]], wall: float) -> dict[str, object]:
    speedups = [float(r["torch_s"]) / float(r["triton_s"]) for r in rows]
    best = {}
    for r in sweep_rows:
        key = "x".join(map(str, r["shape"]))
        if key not in best or r["triton_s"] < best[key]["triton_s"]:
            best[key] = r
    return {
        "summary": True, "cases": len(rows), "exact": sum(bool(r["exact"]) for r in rows),
        "min_codes_equal": min(float(r["codes_equal"]) for r in rows),
        "max_dq_diff": max(float(r["max_dq_diff"]) for r in rows),
        "max_loss_rel_diff": max(float(r["loss_rel_diff"]) for r in rows),
        "speedup_min": round(min(speedups), 2), "speedup_median": round(statistics.median(speedups), 2),
        "speedup_geomean": round(statistics.geometric_mean(speedups), 2),
        "torch_s_total": round(sum(float(r["torch_s"]) for r in rows), 2),
        "triton_s_total": round(sum(float(r["triton_s"]) for r in rows), 3),
        "not_exact": [{k: r[k] for k in ("shape", "bits", "group", "symmetric", "act_order", "kind", "codes_equal")}
                      for r in rows if not r["exact"]],
        "best_config": {k: [v["block_rows"], v["num_warps"]] for k, v in best.items()},
        "default_config": [triton_gptq.DEFAULT.block_rows, triton_gptq.DEFAULT.num_warps],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="every (bits, group, kind, symmetric, act_order)")
    p.add_argument("--shapes", nargs="*", metavar="OUTxIN", help="only these weight shapes")
    p.add_argument("--no-sweep", action="store_true", help="skip the (rows per program, warps) sweep")
    p.add_argument("--torch-reps", type=int, default=1, metavar="N",
                   help="time the torch loop N times per case (default: 3 for a shape's first case, else once)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/gptq_kernel.py needs a CUDA GPU")
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes) if args.shapes else SHAPES
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__, "default_config": vars(triton_gptq.DEFAULT),
                      "torch_divides_by_reciprocal": triton_gptq.torch_divides_by_reciprocal(torch.device("cuda"))}),
          flush=True)
    start = time.perf_counter()
    rows = []
    for shape in shapes:
        for i, (bits, group, kind, symmetric, act_order) in enumerate(cases(args.full)):
            reps = max(args.torch_reps, TIMED_REPS if i == 0 else 1)  # the first also absorbs warm-up
            row = run_case(shape, bits, group, kind, symmetric, act_order, reps, seed=len(rows))
            print(json.dumps(row), flush=True)
            rows.append(row)
    sweep_rows = [] if args.no_sweep else sweep(tuple(s for s in SWEEP_SHAPES if s in shapes) or shapes[:1])
    summary = summarize(rows, sweep_rows, time.perf_counter() - start)
    print(json.dumps(summary), flush=True)
    sys.exit(0 if summary["exact"] == summary["cases"] else 1)


if __name__ == "__main__":
    main()
