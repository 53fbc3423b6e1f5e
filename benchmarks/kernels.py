"""bitalloc.kernels on the GPU: correctness against the torch reference, and speed against peers.

    python benchmarks/kernels.py --warm bench --bits 4   # compile, no GPU work: run one process
                                                         # per part and width in parallel
    python benchmarks/kernels.py --check           # every kernel vs the fp32 torch reference
    python benchmarks/kernels.py --json OUT.json   # the comparison, one process

Needs only torch and triton (compressed-tensors is not imported). The comparison: torch bf16
``x @ W.T`` (cuBLAS), torch's tinygemm int4 (``_convert_weight_to_int4pack`` +
``_weight_int4pack_mm``, torchao's int4 weight-only path), GemLite when importable (skipped with a
note otherwise), ours at 2/3/4/8 bits through the dispatcher; group 128; 8 weight sets in
rotation so the working set exceeds the 60 MB L2. Three timings per case: CUDA-graph replay of
one call per weight set (kernel time; the targets use it), eager steady state (a Python loop of
calls, launch overhead included) and ``triton.testing.do_bench`` median (L2 flushed per call).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitalloc.kernels import dispatch, reference, triton_gemm, triton_gemv  # noqa: E402
from bitalloc.kernels.codes import Codes  # noqa: E402
from bitalloc.kernels.layout import KernelWeight, repack  # noqa: E402
from bitalloc.kernels.ops import quant_linear_impl  # noqa: E402

WIDTHS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
SHAPES = ((8192, 8192), (14336, 4096), (4096, 14336), (28672, 8192))  # (out, in)
BATCHES = (1, 16, 64, 256)
CROSSOVER_BATCHES = (1, 16, 64, 128, 256)
ROTATE = 8
GROUP = 128
CHECK_SHAPE = (200, 1100)  # ragged in N and in K (3 tiles, the last one partial); tiny shapes: CPU tests
DISPATCH_SHAPE = (1024, 1536)  # compiles to the same specializations as the benchmark's shapes
DISPATCH_BATCHES = (1, 16, 64, 200)
TARGETS_M1 = {4: 3.0, 3: 3.6, 2: 4.5, 8: 1.7}
TARGETS_M = {16: 2.4, 64: 1.6, 256: 0.9}  # 4-bit


def random_codes(out: int, inp: int, bits: int, group: int, dtype: torch.dtype,
                 seed: int = 0) -> Codes:
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = -(-inp // group)
    return Codes(torch.randint(0, 1 << bits, (out, inp), generator=g, device="cuda",
                               dtype=torch.uint8),
                 (torch.rand(out, groups, generator=g, device="cuda") * 0.02 + 1e-3).to(dtype),
                 torch.randint(0, 1 << bits, (out, groups), generator=g, device="cuda",
                               dtype=torch.uint8), bits, group)


def empty_weight(out: int, inp: int, bits: int, group: int, dtype: torch.dtype) -> KernelWeight:
    """A weight of the right shapes and strides with no content: enough to compile for it."""
    tiles = -(-inp // 512)
    return KernelWeight(torch.empty(out, tiles * bits * 16, dtype=torch.int32, device="cuda"),
                        torch.empty(out, tiles * 512 // group, 2, dtype=dtype, device="cuda"),
                        bits, group, inp, out)


# --- the variants: one list drives compiling (--warm), checking and timing ---------------------

def check_cases(bits: int) -> list[tuple[str, int, int, torch.dtype, triton.Config | None]]:
    """(kernel, group, M, dtype, config) checked for one width on ``CHECK_SHAPE``."""
    cases = []
    for dtype, groups in ((torch.bfloat16, GROUPS), (torch.float16, (128,))):
        for group in groups:
            cases += [("gemv", group, 1, dtype, triton_gemv.CONFIGS[0]),
                      ("gemv", group, 3, dtype, triton_gemv.CONFIGS[0]),
                      ("gemm", group, 40, dtype, triton_gemm.CONFIGS[0]),
                      ("dequant", group, 0, dtype, None)]
    if bits == 3:  # every configuration once
        cases += [("gemv", 64, 4, torch.bfloat16, c) for c in triton_gemv.CONFIGS[1:]]
        cases += [("gemm", 64, 100, torch.bfloat16, c) for c in triton_gemm.CONFIGS[1:]]
    return cases


def bench_cases(bits: int, shapes: tuple[tuple[int, int], ...]) -> list[tuple[str, int, int, int]]:
    """(kernel, M, out, in) timed for one width: the dispatcher's pick and the crossover."""
    cases = [(dispatch.path(m), m, out, inp) for out, inp in shapes for m in BATCHES]
    cases += [(dispatch.path(m), m, *DISPATCH_SHAPE) for m in DISPATCH_BATCHES]
    cases += [(k, m, out, inp) for out, inp in shapes[:1] for m in CROSSOVER_BATCHES
              for k in crossover_kernels(m)]
    return list(dict.fromkeys(cases))


def crossover_kernels(m: int) -> tuple[str, ...]:
    """The kernels timed side by side at batch ``m`` to place the dispatcher's crossovers."""
    return ("gemv", "gemm") if m <= dispatch.GEMV_MAX_M else ("gemm", "dequant")


def launch(kernel: str, x: torch.Tensor, kw: KernelWeight, out: torch.Tensor,
           config: triton.Config | None = None, warmup: bool = False) -> torch.Tensor:
    """One kernel through triton's own launch path (the dispatcher's bound launches are not used)."""
    consts = dispatch.constants(kw)
    if kernel in ("gemv", "gemm"):
        run = triton_gemv.gemv if kernel == "gemv" else triton_gemm.gemm
        run(x, kw, out, consts, config, warmup)
        return out
    if warmup:
        return triton_gemm.dequantize(kw, x.dtype, consts, warmup=True)
    return torch.matmul(x, triton_gemm.dequantize(kw, x.dtype, consts).t(), out=out)


def warm(widths: list[int], which: str, shapes: tuple[tuple[int, int], ...]) -> None:
    """Compile every variant the check (or the benchmark) launches, into triton's disk cache."""
    t0, n = time.perf_counter(), 0
    out, inp = CHECK_SHAPE
    for bits in widths if which == "check" else ():
        for kernel, group, m, dtype, config in check_cases(bits):
            kw = empty_weight(out, inp, bits, group, dtype)
            x_dtype = torch.float32 if kernel == "dequant" else dtype  # check() dequantizes to fp32
            x = torch.empty(max(m, 1), inp, dtype=x_dtype, device="cuda")
            launch(kernel, x, kw, torch.empty(max(m, 1), out, dtype=dtype, device="cuda"), config,
                   warmup=True)
            n += 1
    for bits in widths if which == "bench" else ():
        for kernel, m, out, inp in bench_cases(bits, shapes):
            kw = empty_weight(out, inp, bits, GROUP, torch.bfloat16)
            x = torch.empty(m, inp, dtype=torch.bfloat16, device="cuda")
            launch(kernel, x, kw, torch.empty(m, out, dtype=torch.bfloat16, device="cuda"),
                   warmup=True)
            n += 1
    print(f"warm {which} {widths}: {n} variants compiled in {time.perf_counter() - t0:.1f} s",
          flush=True)


# --- --check -----------------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")  # an element was not written (outputs start as NaN)
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def check() -> bool:
    failures, count = [], 0
    out, inp = CHECK_SHAPE
    for bits in WIDTHS:
        for kernel, group, m, dtype, config in check_cases(bits):
            c = random_codes(out, inp, bits, group, dtype, seed=count)
            kw = repack(c)
            count += 1
            if kernel == "dequant":
                w = triton_gemm.dequantize(kw, torch.float32, dispatch.constants(kw))
                if not torch.equal(w, reference.dequantize(c)):
                    failures.append(f"dequant bits={bits} g={group} {dtype} {out}x{inp}: not exact")
                continue
            x = torch.randn(m, inp, device="cuda").to(dtype)
            y = torch.full((m, out), float("nan"), dtype=dtype, device="cuda")
            try:
                launch(kernel, x, kw, y, config)
            except triton.runtime.errors.OutOfResources as e:  # the autotuner skips these too
                print(f"note: {kernel} {config} M={m}: {e}")
                continue
            err = rel_err(y, reference.linear(x, c))
            tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
            if not err < tol:
                failures.append(f"{kernel} bits={bits} g={group} M={m} {dtype} {out}x{inp} "
                                f"{config}: rel err {err:.2e}")
    # the dispatcher (autotuned), a 3-D input and a CUDA-graph capture of the module path
    n_out, n_in = DISPATCH_SHAPE
    for bits in WIDTHS:
        c = random_codes(n_out, n_in, bits, GROUP, torch.bfloat16, seed=bits)
        kw = repack(c)

        def module_path(x: torch.Tensor, kw: KernelWeight = kw, bits: int = bits) -> torch.Tensor:
            return quant_linear_impl(x, kw.qweight, kw.scale_zero, bits, GROUP, n_in)

        for m in DISPATCH_BATCHES:
            x = torch.randn(m, n_in, device="cuda").to(torch.bfloat16)
            count += 1
            try:
                err = rel_err(module_path(x.view(1, m, n_in)).view(m, n_out), reference.linear(x, c))
            except Exception as e:  # a failure to report, with the others, not a reason to stop
                failures.append(f"dispatch bits={bits} M={m} ({dispatch.path(m)}): {e!r}"[:300])
                continue
            if not err < 1e-2:
                failures.append(f"dispatch bits={bits} M={m} ({dispatch.path(m)}): rel err {err:.2e}")
            count += 1
            failures += fast_path_failures(module_path, x, kw, bits, m)
        x = torch.randn(1, n_in, device="cuda").to(torch.bfloat16)
        module_path(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = module_path(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        count += 1
        if not torch.equal(captured, module_path(x)):
            failures.append(f"CUDA graph replay bits={bits}: differs from eager")
    torch.cuda.synchronize()
    for f in failures:
        print("FAIL", f)
    print(f"check: {count - len(failures)} of {count} cases pass", flush=True)
    return not failures


def triton_launch(x: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    """``x @ W.T`` by the dispatcher's kernel for this batch, through triton's own launch path."""
    out = torch.empty(x.shape[0], kw.out_features, dtype=x.dtype, device=x.device)
    return launch(dispatch.path(x.shape[0]), x, kw, out)


def fast_path_failures(module_path: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       kw: KernelWeight, bits: int, m: int) -> list[str]:
    """A repeated call (the bound launch of ``launch.py``) equals triton's own launch path bit for
    bit, and a misaligned view of the same signature (refused by the bound launch, so triton's
    path, which compiles an unaligned variant) agrees with it."""
    if dispatch.path(m) == "dequant":
        return []
    fast = module_path(x)
    slow = triton_launch(x, kw)
    failures = [] if torch.equal(fast, slow) else [f"bound launch bits={bits} M={m}: differs from triton's"]
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    shifted = flat[1:].view_as(x)
    shifted.copy_(x)
    err = rel_err(module_path(shifted), slow)  # another compiled variant: equal up to fp order
    if not err < 1e-3:
        failures.append(f"misaligned input bits={bits} M={m}: rel err {err:.2e} vs the aligned call")
    return failures


# --- --json ------------------------------------------------------------------------------------

def time_graph(fns: list[Callable[[], object]], reps: int = 20) -> float:
    """Microseconds per call, replaying one CUDA graph that calls each function once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(fns))


def time_eager(fns: list[Callable[[], object]], reps: int = 20) -> float:
    for f in fns:
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        for f in fns:
            f()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(fns))


def time_do_bench(fns: list[Callable[[], object]]) -> float:
    turn = iter(range(10**9))
    return triton.testing.do_bench(lambda: fns[next(turn) % len(fns)](), warmup=10, rep=50,
                                   return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def tinygemm_weights(out: int, inp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """tinygemm's packed int4 weights with random codes, scales and zeros (timing only)."""
    sets = []
    for _ in range(ROTATE):
        q = torch.randint(0, 256, (out, inp // 2), dtype=torch.uint8, device="cuda")
        sz = (torch.rand(inp // GROUP, out, 2, device="cuda") * 0.02).to(torch.bfloat16)
        sets.append((torch._convert_weight_to_int4pack(q, 8), sz))
    return sets


def verify(row: dict, x: torch.Tensor, kw: KernelWeight, codes: Codes) -> None:
    """The timed configuration, on the timed shape: the module path (a bound launch by now) against
    the fp32 reference, and bit for bit against triton's own launch of the same kernel."""
    if not row:
        return
    y = quant_linear_impl(x, kw.qweight, kw.scale_zero, kw.bits, GROUP, kw.in_features)
    row["rel_err"] = rel_err(y, reference.linear(x, codes))
    if dispatch.path(x.shape[0]) != "dequant":
        row["bound_equals_triton"] = bool(torch.equal(y, triton_launch(x, kw)))
    ok = row["rel_err"] < 1e-2 and row.get("bound_equals_triton", True)
    print(f"verify {row['out']}x{row['in']} M={row['M']} {kw.bits}b: rel err {row['rel_err']:.1e}, "
          f"bound == triton: {row.get('bound_equals_triton')} {'ok' if ok else 'FAIL'}", flush=True)


def gemlite_layers(codes: dict[int, list[Codes]]) -> dict[int, list[torch.nn.Module]]:
    """GemLite 0.6 linears (its default Triton path, bf16 in and out) holding the same codes as ours,
    at the widths it supports (8, 4, 2); its zero points follow HQQ's ``(q - zero) * scale``."""
    from gemlite import DType, GemLiteLinear

    layers = {}
    for bits in (8, 4, 2):
        layers[bits] = []
        for c in codes[bits]:
            out, inp = c.codes.shape
            g = GemLiteLinear(bits, group_size=GROUP, in_features=inp, out_features=out,
                              input_dtype=DType.BF16, output_dtype=DType.BF16)
            g.pack(c.codes, c.scales, c.zeros.to(c.scales.dtype), bias=None)
            layers[bits].append(g)
    return layers


def bench(path: str, shapes: tuple[tuple[int, int], ...], gemlite_config: str | None = None) -> None:
    torch.manual_seed(0)
    bw = copy_bandwidth()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "copy_bandwidth_TBps": bw / 1e12, "group": GROUP, "rotated_weight_sets": ROTATE,
            "gemv_max_m": dispatch.GEMV_MAX_M, "gemm_max_m": dispatch.GEMM_MAX_M}
    try:
        import gemlite

        meta["gemlite"] = getattr(gemlite, "__version__", "importable")
        if gemlite_config and Path(gemlite_config).exists():  # its autotune results from an earlier run
            gemlite.load_config(gemlite_config)
            meta["gemlite_config"] = gemlite_config
    except ImportError:
        meta["gemlite"] = "not installed: skipped"
    print(json.dumps(meta), flush=True)
    rows = []

    def record(shape, m, method, bits, fns, nbytes):
        row = {"out": shape[0], "in": shape[1], "M": m, "method": method, "bits": bits}
        try:
            t0 = time.perf_counter()
            fns[0]()  # first call: compile from cache + autotune (cold for this shape)
            torch.cuda.synchronize()
            row.update(first_call_s=time.perf_counter() - t0, graph_us=time_graph(fns),
                       eager_us=time_eager(fns), do_bench_us=time_do_bench(fns), bytes=nbytes)
            if method.startswith("ours"):  # the configuration the autotuner settled on
                kind = method[5:] or dispatch.path(m)
                tuner = {"gemv": triton_gemv._autotuned, "gemm": triton_gemm._autotuned}.get(kind)
                if tuner is not None and tuner.best_config is not None:
                    row["config"] = str(tuner.best_config)
        except Exception as e:  # reported in the row and the table, the run goes on
            row["error"] = repr(e)[:300]
            print(json.dumps(row), flush=True)
            return {}
        row["bw_share"] = nbytes / (row["graph_us"] * 1e-6) / bw
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    for out, inp in shapes:
        dense = [torch.randn(out, inp, device="cuda").to(torch.bfloat16) * 0.02
                 for _ in range(ROTATE)]
        try:
            tiny = tinygemm_weights(out, inp)
        except RuntimeError as e:  # said in the output and the JSON, not hidden
            tiny = []
            meta.setdefault("tinygemm", f"skipped: {e}")
            print(f"tinygemm skipped: {e}", flush=True)
        codes = {bits: [random_codes(out, inp, bits, GROUP, torch.bfloat16, seed=i)
                        for i in range(ROTATE)] for bits in WIDTHS}
        ours = {bits: [repack(c) for c in cs] for bits, cs in codes.items()}
        lite = gemlite_layers(codes) if "skipped" not in meta["gemlite"] else {}
        first = {bits: cs[0] for bits, cs in codes.items()}  # what each timed kernel is checked against
        del codes
        for m in BATCHES:
            x = torch.randn(m, inp, device="cuda").to(torch.bfloat16)
            act = 2 * m * (inp + out)
            record((out, inp), m, "torch_bf16", 16,
                   [lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in dense],
                   2 * out * inp + act)
            if tiny:
                record((out, inp), m, "tinygemm_int4", 4,
                       [lambda w=w, s=s, x=x: torch._weight_int4pack_mm(x, w, GROUP, s)
                        for w, s in tiny],
                       out * inp // 2 + 4 * out * inp // GROUP + act)
            for bits, layers in lite.items():
                record((out, inp), m, "gemlite", bits, [lambda g=g, x=x: g(x) for g in layers],
                       out * inp * bits // 8 + 4 * out * inp // GROUP + act)
            for bits, kws in ours.items():
                nbytes = kws[0].qweight.numel() * 4 + kws[0].scale_zero.numel() * 2 + act
                row = record((out, inp), m, "ours", bits,
                             [lambda kw=kw, x=x, b=bits, k=inp: quant_linear_impl(
                                 x, kw.qweight, kw.scale_zero, b, GROUP, k) for kw in kws], nbytes)
                verify(row, x, kws[0], first[bits])
        for m in CROSSOVER_BATCHES if (out, inp) == shapes[0] else ():
            x = torch.randn(m, inp, device="cuda").to(torch.bfloat16)
            y = torch.empty(m, out, dtype=torch.bfloat16, device="cuda")
            for bits, kws in ours.items():
                nbytes = kws[0].qweight.numel() * 4 + kws[0].scale_zero.numel() * 2
                for kernel in crossover_kernels(m):
                    record((out, inp), m, f"ours_{kernel}", bits,
                           [lambda kw=kw, k=kernel, x=x, y=y: launch(k, x, kw, y) for kw in kws],
                           nbytes)
        del dense, tiny, ours, lite
        torch.cuda.empty_cache()
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if gemlite_config and "skipped" not in meta["gemlite"]:
        import gemlite

        gemlite.cache_config(gemlite_config)
    summarize(rows, shapes)


def summarize(rows: list[dict], shapes: tuple[tuple[int, int], ...]) -> None:
    """The table: CUDA-graph us, speedup vs torch bf16 and vs tinygemm, bandwidth share."""
    by = {(r["out"], r["in"], r["M"], r["method"], r["bits"]): r for r in rows}
    print("\nshape       M  | bf16 us | tinygemm x | ours us (x bf16, x tinygemm, x gemlite same width, "
          "bw share, eager us / gemlite eager us)")
    for out, inp in shapes:
        for m in BATCHES:
            base = by[(out, inp, m, "torch_bf16", 16)].get("graph_us", float("nan"))
            tg = by.get((out, inp, m, "tinygemm_int4", 4), {}).get("graph_us", float("nan"))
            cells = []
            for bits in WIDTHS:
                r = by.get((out, inp, m, "ours", bits), {"error": "missing"})
                if "error" in r:
                    cells.append(f"{bits}b error")
                    continue
                target = TARGETS_M1.get(bits) if m == 1 else (TARGETS_M.get(m) if bits == 4 else None)
                mark = "" if target is None else (" ok" if base / r["graph_us"] >= target else " MISS")
                gl = by.get((out, inp, m, "gemlite", bits), {})
                cells.append(f"{bits}b {r['graph_us']:.1f} ({base / r['graph_us']:.2f}x{mark}, "
                             f"{tg / r['graph_us']:.2f}x, "
                             f"{gl.get('graph_us', float('nan')) / r['graph_us']:.2f}x, "
                             f"{r['bw_share']:.0%}, {r['eager_us']:.1f} / "
                             f"{gl.get('eager_us', float('nan')):.1f})")
            print(f"{out}x{inp} {m:4d} | {base:7.1f} | {base / tg:5.2f}x | " + " | ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm", choices=("check", "bench"), help="compile the variants of one part")
    p.add_argument("--bits", type=int, nargs="*", default=list(WIDTHS), help="widths to --warm")
    p.add_argument("--check", action="store_true", help="every kernel vs the torch reference")
    p.add_argument("--json", metavar="OUT", help="run the comparison, write the rows here")
    p.add_argument("--shapes", nargs="*", metavar="OUTxIN", help="only these weight shapes")
    p.add_argument("--gemlite-config", metavar="JSON", help="GemLite's autotune cache: read if present, "
                   "written after the run (its autotuning takes minutes per run otherwise)")
    args = p.parse_args()
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes) if args.shapes else SHAPES
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/kernels.py needs a CUDA GPU")
    if args.warm:
        warm(args.bits, args.warm, shapes)
    ok = check() if args.check else True
    if args.json:
        bench(args.json, shapes, args.gemlite_config)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
