"""``quantize`` a checkpoint by a plan into a pack-quantized model directory; ``load_quantized`` and
``evaluate_quantized`` read one back.

``quantize`` is glue: the plan is checked against the checkpoint and OUT is checked (and the plan's
expressibility in the format) *before* calibration, so a run that cannot be written never starts;
then the calibration text is tokenized and windowed exactly as the sensitivity pass does, the rounding
driver (:func:`bitalloc.rounding.apply.quantize_layers`) produces the codes, and the writer writes them.

``evaluate_quantized`` follows the evaluation protocol of :mod:`.evaluation` (same windows, fp32,
next-token cross-entropy per window) on the model ``load_quantized`` returns. It runs the whole
model at once: weight memory is the packed codes plus the 16-bit tensors, and logits are formed one
sequence at a time, as the layer-by-layer evaluator does.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import BitallocError, CalibrationError, PlanError
from ..model.calib import (
    EVAL_SEQLEN,
    EVAL_TOKENS,
    eval_windows,
    tokenize,
)
from ..model.checkpoint import Checkpoint
from ..model.layerwise import resolve_device, run_workdir, window_loss
from ..plan import Plan
from ..progress import SILENT, Tracker
from ..rounding.apply import METHODS, quantize_layers
from .allocate import calibration_ids
from ..rounding.config import DEFAULT, RoundingConfig
from ..rounding.decomposed import decompose_checkpoint
from ..rounding.loader import load_quantized_model
from ..rounding.writer import preflight, write_quantized
from .config import CalibrationConfig
from .evaluation import EVAL_BATCH, EvalResult, check_finite_loss, check_plan_matches, checkpoint_units
from .outputs import Inputs, check_output_dir


def quantize(model: str | Path | Checkpoint, plan: Plan | str | Path, method: str, calib: str | Path, *,
             out: str | Path, calibration: CalibrationConfig | None = None,
             rounding: RoundingConfig = DEFAULT, overwrite: bool = False, track: Tracker = SILENT) -> Path:
    """Quantize ``model`` as ``plan`` says with ``method`` (rtn | gptq | gsq | discquant) and write OUT.

    ``calibration`` gives the windows (tokens, seqlen, seed) and the device; ``rounding`` the
    methods' settings. Returns OUT. Refusals (an OUT that would replace an input, plan for another
    model, segments, existing OUT, unknown method) happen before any calibration work. A plan with a
    BitsMoE decomposition is written with ``rtn`` only: its experts as shared bases plus RTN factor
    slabs, exactly as ``bitalloc eval --plan`` reconstructs them (docs/checkpoint.md).
    """
    calibration = calibration or CalibrationConfig()
    # OUT is replaced as a whole (overwrite): no input may live anywhere inside it, whatever else is wrong
    check_output_dir(out, Inputs.of({"the --plan file": None if isinstance(plan, Plan) else plan,
                                     "the --calib text": calib},
                                    models=[model.path if isinstance(model, Checkpoint) else model]), ("*",))
    if method not in METHODS:
        raise BitallocError(f"unknown rounding method {method!r}; choose one of {', '.join(METHODS)}")
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    if plan.decomposition is not None and method != "rtn":
        raise PlanError(f"--method {method}: this plan stores MoE experts as BitsMoE factors, which are quantized "
                        "with RTN as `eval --plan` measured them, and the other methods would calibrate later layers "
                        "on experts that are not; use --method rtn")
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
    check_plan_matches(plan, ckpt, checkpoint_units(ckpt))
    preflight(ckpt, plan, out, overwrite)  # segments, partial groups, an existing OUT: refused before calibrating
    device = resolve_device(calibration.device)

    t0 = time.perf_counter()
    # every activation store of the rounding methods goes in this run's work directory (removed at the end)
    with run_workdir(calibration.workdir):
        tokens, windows = calibration_ids(ckpt, calib, calibration)
        t1 = time.perf_counter()
        choices = {e.tensor: e.column_choices() for e in plan.entries if not e.locked and not e.decomposed}
        weights = quantize_layers(ckpt, choices, method, windows, rounding, calibration.device, track)
    t2 = time.perf_counter()
    blocks = decompose_checkpoint(ckpt, plan.decomposition, track) if plan.decomposition else {}
    provenance: dict[str, Any] = {
        "method": method,
        "calibration": {"file": str(calib), "sha256": tokens.sha256, "tokens": int(windows.numel()),
                        "seqlen": calibration.seqlen, "seed": calibration.seed},
        "rounding": asdict(rounding),
        "device": str(device),
        "timings": {"calibration_s": round(t1 - t0, 3), "rounding_s": round(t2 - t1, 3),
                    **({"decomposition_s": round(time.perf_counter() - t2, 3)} if blocks else {})},
    }
    return write_quantized(ckpt, plan, weights, out, provenance, overwrite=overwrite, track=track, blocks=blocks)


def load_quantized(out: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model of a pack-quantized checkpoint, its quantized linears ``bitalloc.kernels.QuantLinear``.

    ``dtype`` is that of the unquantized tensors and of the activations (scales stay fp16, exactly as
    stored); the Triton path on CUDA wants ``torch.float16``.
    """
    return load_quantized_model(out, resolve_device(device), dtype)


def is_quantized_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a model directory whose config.json carries a ``quantization_config`` (what
    ``bitalloc eval`` checks to choose :func:`evaluate_quantized` over RTN fake-quantization)."""
    import json

    cfg = Path(path) / "config.json"
    try:
        return "quantization_config" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def evaluate_quantized(out: str | Path, text: str | Path, tokens: int = EVAL_TOKENS, seqlen: int = EVAL_SEQLEN,
                       device: str = "auto", track: Tracker = SILENT) -> EvalResult:
    """Held-out perplexity of a quantized checkpoint directory under the protocol of :func:`bitalloc.evaluate`."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    lm = load_quantized_model(out, dev, torch.float32)
    ids = eval_windows(tokenize(out, text), tokens, seqlen)
    total = _total_loss(lm, ids.to(dev), track)
    n_pred = ids.shape[0] * (ids.shape[1] - 1)
    if n_pred == 0:
        raise CalibrationError(f"evaluation windows of {seqlen} tokens predict nothing; use seqlen >= 2")
    loss = check_finite_loss(total / n_pred, f"the quantized checkpoint {out}")
    return EvalResult(math.exp(loss), loss, int(ids.numel()), time.perf_counter() - t0,
                      f"quantized checkpoint {Path(out).name}")


def _total_loss(lm: torch.nn.Module, ids: torch.Tensor, track: Tracker) -> float:
    """Sum of next-token cross-entropies; ``EVAL_BATCH`` windows per forward, logits one window at a time."""
    task = track.task("eval (quantized checkpoint)", -(-len(ids) // EVAL_BATCH))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), EVAL_BATCH):
            batch = ids[start:start + EVAL_BATCH]
            hidden = lm.model(input_ids=batch, use_cache=False).last_hidden_state
            for h, seq in zip(hidden, batch):
                total += window_loss(lm.lm_head(h).float(), seq)
            task.advance()
    return total
