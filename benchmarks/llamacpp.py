"""bitalloc against llama.cpp's own presets, at equal GGUF file size, measured with llama.cpp itself.

    python benchmarks/llamacpp.py ../shared/models/llama-densek-26m \
        --calib ../shared/data/python-calib.txt.xz --heldout ../shared/data/python-heldout.txt.xz \
        [--llama-cpp DIR] [--work benchmarks/out/llamacpp] [--calib-tokens 16384] [--threads 2] [-o results.json]

1. llama.cpp: the ``llama-cpp-python`` sdist from PyPI vendors the full tree; unless DIR (default
   ``$BITALLOC_LLAMACPP_DIR``, else ``benchmarks/out/llama.cpp``) already holds a build, the sdist is
   downloaded (``pip download``), unpacked into DIR and ``llama-quantize``, ``llama-perplexity`` and
   ``llama-imatrix`` are built with cmake (``-DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON``).
2. ``convert_hf_to_gguf.py --outtype f16`` makes model-f16.gguf. Its ``sentencepiece`` import must resolve
   (``pip install sentencepiece``). The converter refuses BPE tokenizers whose pre-tokenizer hash it does not
   list; the reference models' own byte-level BPE tokenizer (GPT-2 regex) is such a one, so an unlisted hash is
   mapped to llama.cpp's ``gpt-2`` pre-tokenizer (the same regex), for every file alike.
3. The presets Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, plain and with ``llama-imatrix``'s importance matrix
   (same calibration text, chunks of 512, as many tokens as bitalloc's pass).
4. bitalloc: one calibration pass per variant (``bitalloc scores --target llamacpp``, the second with
   ``--imatrix``), then for every preset ``allocate --budget <preset file bytes>B``, ``export --to llamacpp``
   and the printed llama-quantize command (with bitalloc's imatrix in the imatrix variant). Each file must be
   within 0.5% of the preset's size and never above it; each tensor's type must be the plan's.
5. ``llama-perplexity -c 512`` on the held-out text, the same chunks for every file; per-chunk mean NLLs
   come from ``--ppl-output-type 1`` (cumulative means), so differences are paired per chunk: the table gives
   the mean NLL difference (bitalloc - preset) and its standard error over chunks.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
CONTEXT = 512
SIZE_TOLERANCE = 0.005
# an unlisted BPE pre-tokenizer hash becomes llama.cpp's gpt-2 pre-tokenizer (see the module docstring)
_CONVERT_SHIM = """
import sys
sys.path.insert(0, sys.argv.pop(1))
from conversion.base import TextModel
listed = TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return listed(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
TextModel.get_vocab_base_pre = pre
import convert_hf_to_gguf
sys.argv[0] = "convert_hf_to_gguf.py"
convert_hf_to_gguf.main()
"""


def run(cmd: list[str], log: Path, env: dict | None = None) -> str:
    """Run ``cmd``, appending its command line and output to ``log``; a failure stops the benchmark."""
    with log.open("a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with log.open("a") as f:
        f.write(p.stdout + p.stderr + "\n")
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout + p.stderr


def llama_cpp(cache: Path, log: Path) -> tuple[Path, Path]:
    """(bin dir, vendored llama.cpp tree): built from the llama-cpp-python sdist unless already there."""
    trees = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not trees:
        cache.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
             "-d", str(cache)], log)
        sdist = sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
        trees = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    tree = trees[-1]
    bindir = tree / "build" / "bin"
    if not all((bindir / t).is_file() for t in TOOLS):
        run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DGGML_NATIVE=ON"], log)
        run(["nice", "-n", "19", "cmake", "--build", str(tree / "build"), "-j2", "--target", *TOOLS], log)
    return bindir, tree


def plain_text(src: Path, dst: Path) -> Path:
    """llama.cpp's tools read plain text: decompress .xz once."""
    if not dst.is_file():
        opener = lzma.open if src.suffix == ".xz" else open
        with opener(src, "rt", encoding="utf-8") as f:
            dst.write_text(f.read(), encoding="utf-8")
    return dst


def bitalloc(*args: str, log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return run([sys.executable, "-c", "from bitalloc.cli import main; main()", *args], log, env)


def per_chunk_nll(output: str) -> np.ndarray:
    """Mean NLL of every chunk from ``--ppl-output-type 1`` lines (offset, ppl, cumulative mean NLL, se):
    chunks score equal token counts, so chunk k's mean is k*m_k - (k-1)*m_(k-1)."""
    cum = [float(m.group(1)) for m in re.finditer(r"^\s*\d+\s+[\d.]+\s+([\d.]+)\s+[\d.naif-]+\s*$", output, re.M)]
    if not cum:
        raise SystemExit("no per-chunk lines in llama-perplexity's output")
    k = np.arange(1, len(cum) + 1)
    total = k * np.array(cum)
    return np.diff(np.concatenate([[0.0], total]))


def perplexity(bindir: Path, gguf: Path, text: Path, chunks: int, threads: int, log: Path) -> np.ndarray:
    out = run([str(bindir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(CONTEXT),
               "--chunks", str(chunks), "-t", str(threads), "--ppl-output-type", "1"], log)
    return per_chunk_nll(out)


def gguf_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def check_types(plan_path: Path, gguf: Path) -> int:
    """Tensors whose type in ``gguf`` differs from the plan's (0 expected)."""
    from bitalloc.model.gguf_names import gguf_name, tensor_name_map
    from bitalloc.plan import Plan

    plan = Plan.load(plan_path)
    names = tensor_name_map(plan.model.arch, 1 + max(e.layer for e in plan.entries if e.layer is not None))
    got = gguf_types(gguf)
    return sum(got[gguf_name(names, e.tensor)] != e.ggml for e in plan.entries if not e.locked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--llama-cpp", type=Path,
                    default=Path(os.environ.get("BITALLOC_LLAMACPP_DIR") or ROOT / "benchmarks" / "out" / "llama.cpp"))
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "llamacpp")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--chunks", type=int, default=64, help="held-out chunks of 512 (the same for every file)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    t0 = time.time()
    bindir, tree = llama_cpp(args.llama_cpp, log)
    calib_txt = plain_text(args.calib, work / "calib.txt")
    heldout = plain_text(args.heldout, work / "heldout.txt")
    f16 = work / "model-f16.gguf"
    if not f16.is_file():
        run([sys.executable, "-c", _CONVERT_SHIM, str(tree), str(args.model), "--outtype", "f16", "--outfile",
             str(f16)], log)
    chunks = args.calib_tokens // CONTEXT
    li_imatrix = work / "llama-imatrix.gguf"
    if not li_imatrix.is_file():
        run([str(bindir / "llama-imatrix"), "-m", str(f16), "-f", str(calib_txt), "-c", str(CONTEXT), "--chunks",
             str(chunks), "-t", str(args.threads), "-o", str(li_imatrix)], log)
    ba_imatrix = work / "bitalloc-imatrix.gguf"
    scores = {"plain": work / "scores.safetensors", "imatrix": work / "scores-imatrix.safetensors"}
    for variant, path in scores.items():
        if not path.is_file():
            extra = ["--imatrix", str(ba_imatrix)] if variant == "imatrix" else []
            bitalloc("scores", str(args.model), "--target", "llamacpp", "--calib", str(args.calib), "--calib-tokens",
                     str(args.calib_tokens), "--seqlen", str(CONTEXT), "--device", "cpu", "-q", "-o", str(path),
                     *extra, log=log)
    rows = []
    base = perplexity(bindir, f16, heldout, args.chunks, args.threads, log)
    rows.append({"variant": "-", "preset": "F16", "file": "f16", "bytes": f16.stat().st_size,
                 "ppl": math.exp(base.mean())})
    for variant in ("plain", "imatrix"):
        for preset in PRESETS:
            tag = preset + ("-imatrix" if variant == "imatrix" else "")
            ref = work / f"preset-{tag}.gguf"
            im = ["--imatrix", str(li_imatrix)] if variant == "imatrix" else []
            if not ref.is_file():
                run([str(bindir / "llama-quantize"), *im, str(f16), str(ref), preset, str(args.threads)], log)
            size = ref.stat().st_size
            plan, types, mine = work / f"plan-{tag}.json", work / f"types-{tag}.txt", work / f"bitalloc-{tag}.gguf"
            bitalloc("allocate", str(args.model), "--target", "llamacpp", "--budget", f"{size}B", "--scores",
                     str(scores[variant]), "-q", "-o", str(plan),
                     *(["--imatrix", str(ba_imatrix)] if variant == "imatrix" else []), log=log)
            out = bitalloc("export", str(plan), "--to", "llamacpp", "-o", str(types), "--input-gguf", str(f16),
                           "--output-gguf", str(mine),
                           *(["--imatrix", str(ba_imatrix)] if variant == "imatrix" else []), log=log)
            command = next(line for line in out.splitlines() if line.startswith("llama-quantize"))
            argv = shlex.split(command)
            run([str(bindir / argv[0]), *argv[1:], str(args.threads)], log)
            from bitalloc.plan import Plan

            predicted = Plan.load(plan).budget.file_bytes
            ppl_ref = perplexity(bindir, ref, heldout, args.chunks, args.threads, log)
            ppl_mine = perplexity(bindir, mine, heldout, args.chunks, args.threads, log)
            d = ppl_mine - ppl_ref
            rows.append({"variant": variant, "preset": preset, "preset_bytes": size, "bitalloc_bytes": mine.stat().st_size,
                         "predicted_bytes": predicted, "size_ratio": mine.stat().st_size / size,
                         "type_mismatches": check_types(plan, mine), "ppl_preset": math.exp(ppl_ref.mean()),
                         "ppl_bitalloc": math.exp(ppl_mine.mean()), "nll_diff": float(d.mean()),
                         "nll_diff_se": float(d.std(ddof=1) / math.sqrt(len(d))), "chunks": len(d),
                         "command": command})
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    print(f"total {time.time() - t0:.0f} s")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1) + "\n")


def table(rows: list[dict]) -> str:
    lines = ["| variant | preset | preset MB | bitalloc MB (predicted) | size ratio | ppl preset | ppl bitalloc | "
             "NLL diff +- SE (paired, per chunk) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["preset"] == "F16":
            lines.append(f"| - | F16 | {r['bytes'] / 1e6:.3f} | | | {r['ppl']:.4f} | | |")
            continue
        lines.append(f"| {r['variant']} | {r['preset']} | {r['preset_bytes'] / 1e6:.4f} | {r['bitalloc_bytes'] / 1e6:.4f} "
                     f"({r['predicted_bytes'] / 1e6:.4f}) | {r['size_ratio']:.4f} | {r['ppl_preset']:.4f} | "
                     f"{r['ppl_bitalloc']:.4f} | {r['nll_diff']:+.4f} +- {r['nll_diff_se']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
