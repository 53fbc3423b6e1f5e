"""The GPU path against the CPU path: same error table and perplexity, and how much faster.

    python benchmarks/gpu_check.py out/demo      # needs a CUDA device; builds the demo model if absent
    python benchmarks/gpu_check.py MODEL_DIR CALIB HELDOUT [TOKENS]

Builds the demo model (examples/build_demo_model.py) if needed, then runs the sensitivity pass and
the evaluation on CPU and on CUDA and prints one JSON line with the largest relative differences
(every score but ``combined``, whose fit may differ in the last digits), the timings per phase, the
peak GPU memory of the pass and the per-layer memory formula (``sensitivity.memory``) beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bitalloc.model.calib import calibration_windows, tokenize
from bitalloc.api.evaluation import evaluate
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import build_inventory
from bitalloc.plan import DEFAULT_CANDIDATES
from bitalloc.sensitivity.collect import measure_errors
from bitalloc.sensitivity.memory import pass_memory


def main() -> None:
    if len(sys.argv) >= 4:
        model, calib, heldout = (Path(a) for a in sys.argv[1:4])
        tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 32768
    else:
        out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
        if not (out / "model" / "model.safetensors").exists():
            subprocess.run([sys.executable, "examples/build_demo_model.py", str(out), "--steps", "60"], check=True)
        model, calib, heldout, tokens = out / "model", out / "data" / "calib.txt", out / "data" / "heldout.txt", 16384
    ckpt = Checkpoint(model)
    inv = build_inventory(ckpt)
    ids = calibration_windows(tokenize(model, calib), tokens, 512, seed=0)
    result = {"model": model.name, "tokens": int(ids.numel()), "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__}
    tables, ppl = {}, {}
    for dev in ("cpu", "cuda"):
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        tables[dev] = measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES), device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
            result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result[f"sensitivity_s_{dev}"] = round(time.perf_counter() - t0, 2)
        result[f"phases_{dev}"] = {k: round(v, 2) for k, v in tables[dev].meta["timings"].items()}
        t0 = time.perf_counter()
        ppl[dev] = evaluate(ckpt, heldout, bits=3, device=dev).perplexity
        result[f"eval_s_{dev}"] = round(time.perf_counter() - t0, 2)
    est = pass_memory(json.loads((Path(model) / "config.json").read_text()), *ids.shape, len(DEFAULT_CANDIDATES))
    result["formula_device_mib"] = round(est.device / 2**20, 1)
    for name in tables["cpu"].scores:
        if name != "combined":
            a, b = tables["cpu"].unit_errors(name), tables["cuda"].unit_errors(name)
            result[f"max_rel_diff_{name}"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
    result["ppl_cpu"], result["ppl_cuda"] = ppl["cpu"], ppl["cuda"]
    result["tokens_per_s_cuda"] = round(ids.numel() / result["sensitivity_s_cuda"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
