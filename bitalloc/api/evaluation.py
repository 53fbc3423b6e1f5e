"""Held-out perplexity of a checkpoint after RTN fake-quantization (a plan, or uniform bits).

Fixed protocol, so numbers compare across runs and tools: the evaluation text is tokenized
without special tokens, its first ``tokens`` tokens (default 32768) are cut into consecutive
windows of ``seqlen`` (default 512), each window is scored independently (no context carried
over), and perplexity is exp(mean next-token cross-entropy over the seqlen - 1 predicted tokens
of every window). The model runs in fp32, one decoder layer at a time, so evaluation needs
no more weight memory than allocation does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..errors import CalibrationError, CheckpointError, PlanError
from ..model.calib import EVAL_SEQLEN, EVAL_TOKENS, eval_windows, tokenize
from ..model.checkpoint import Checkpoint
from ..model.inventory import Unit, build_inventory
from ..model.layerwise import EXPERT_ROLES, LayerwiseModel, resolve_device, unit_view
from ..plan import SLAB_WIDTH, Decomposition, DecomposedBlock, Plan, Role
from ..progress import SILENT, Tracker
from ..rounding.lowrank import apply_block
from ..rounding.rtn import Runs, fake_quantize
from .config import check_candidate, check_count, check_seqlen

EVAL_BATCH = 8
_NOT_QUANTIZABLE = (Role.norm, Role.bias, Role.router, Role.other)  # locked whatever the flags
_ASKED_FOR = (Role.lm_head, Role.embedding)  # quantized only when asked for (include flags, pins)


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    loss: float
    tokens: int
    seconds: float
    label: str


def checkpoint_units(ckpt: Checkpoint) -> dict[str, Unit]:
    """Every unit of ``ckpt`` by tensor name, lm_head and embedding unlocked (a plan may quantize them): the one
    inventory that a plan is checked against and applied with, built once per checkpoint."""
    return {u.tensor: u for u in build_inventory(ckpt, include_lm_head=True, include_embeddings=True).units}


def _quantized_by_default(units: Mapping[str, Unit]) -> list[Unit]:
    """What the default inventory quantizes (no include flags): every unlocked unit but lm_head and embedding."""
    return [u for u in units.values() if not u.locked and u.role not in _ASKED_FOR]


def quantization_map(units: Mapping[str, Unit], plan: Optional[Plan], bits: Optional[int],
                     group_size: int) -> dict[str, tuple[Unit, Runs]]:
    """Which units (:func:`checkpoint_units`) to fake-quantize with which candidate(s): from a plan (checked
    against them), uniformly, or none (fp)."""
    if plan is not None:
        return {e.tensor: (units[e.tensor], e.column_choices()) for e in plan.entries if not e.locked and not e.decomposed}
    if bits is None:
        return {}
    cand = check_candidate(bits, group_size)
    return {u.tensor: (u, [(0, u.shape[-1], cand)]) for u in _quantized_by_default(units)}


def check_plan_matches(plan: Plan, ckpt: Checkpoint, units: Mapping[str, Unit]) -> None:
    """Refuse a plan for another model, or one whose entries do not describe this checkpoint (its
    :func:`checkpoint_units`).

    The hashes match for a hand-edited plan too, so every entry is checked against the checkpoint: a
    missing tensor would silently stay unquantized, a wrong shape or role would quantize the wrong thing,
    and a group wider than the tensor makes RTN pad every row to the group (1e9 columns: 512 GB).
    """
    if plan.model.config_sha256 != ckpt.config_sha256 or plan.model.index_sha256 != ckpt.index_sha256:
        raise PlanError(f"the plan was made for a different model ({plan.model.path}, arch {plan.model.arch}); "
                        f"its config or weight index hash does not match {ckpt.path}")
    entries = plan.entry_map()
    missing = [u.tensor for u in _quantized_by_default(units) if u.tensor not in entries]
    if missing:
        raise PlanError(f"the plan has no entry for {missing[0]!r} ({len(missing)} quantizable tensor(s) missing); "
                        "make the plan again with `allocate` for this model")
    for e in plan.entries:
        u = units.get(e.tensor)
        if u is None:
            raise PlanError(f"the plan names tensor {e.tensor!r}, which {ckpt.path} does not have")
        if tuple(e.shape) != tuple(u.shape) or e.role != u.role:
            raise PlanError(f"the plan says {e.tensor} is {e.role.value} {e.shape}; the checkpoint has "
                            f"{u.role.value} {list(u.shape)}: the plan was edited or made for other weights")
        if e.locked:
            continue
        if e.decomposed:
            if u.role not in EXPERT_ROLES:
                raise PlanError(f"the plan decomposes {e.tensor}, a {u.role.value} tensor; only MoE experts are "
                                "decomposed")
            continue
        if u.role in _NOT_QUANTIZABLE:
            raise PlanError(f"the plan quantizes {e.tensor}, a {u.role.value} tensor that stays at 16 bit; "
                            "lock it (\"locked\": true) or make the plan again")
        too_wide = [c.group_size for _, _, c in e.column_choices() if c.group_size > max(u.shape[-1], SLAB_WIDTH)]
        if too_wide:
            raise PlanError(f"the plan gives {e.tensor} group_size {too_wide[0]}, wider than its {u.shape[-1]} "
                            f"input columns; use a group of at most {max(u.shape[-1], SLAB_WIDTH)}")


class Evaluator:
    """One checkpoint and one held-out text, tokenized once; :meth:`run` scores any plan or uniform width on it."""

    def __init__(self, ckpt: Checkpoint, text: str | Path, tokens: int = EVAL_TOKENS, seqlen: int = EVAL_SEQLEN,
                 device: str = "auto"):
        resolve_device(device)  # before any slow step
        check_count(seqlen, "--seqlen", "evaluation window length in tokens")
        check_count(tokens, "--tokens", "number of evaluation tokens")
        if tokens < seqlen:
            raise CalibrationError(f"--tokens {tokens} is less than one window of --seqlen {seqlen}; raise --tokens "
                                   "or lower --seqlen")
        check_seqlen(ckpt, seqlen)
        self.ckpt, self.device = ckpt, device
        self._text, self._tokens, self._seqlen = text, tokens, seqlen

    @cached_property
    def units(self) -> dict[str, Unit]:
        """The checkpoint's units, listed once for every plan this evaluator scores."""
        return checkpoint_units(self.ckpt)

    @cached_property
    def ids(self) -> torch.Tensor:
        """The evaluation windows; tokenized on first use, after the first plan has been checked."""
        return eval_windows(tokenize(self.ckpt.path, self._text, self._tokens), self._tokens, self._seqlen)

    def run(self, plan: Optional[Plan] = None, bits: Optional[int] = None, group_size: int = 128,
            track: Tracker = SILENT) -> EvalResult:
        t0 = time.perf_counter()
        if plan is not None:
            check_plan_matches(plan, self.ckpt, self.units)
        qmap = quantization_map(self.units, plan, bits, group_size)
        label = "plan" if plan is not None else (f"uniform {bits}-bit g{group_size}" if bits else "unquantized")
        decomposition = plan.decomposition if plan is not None else None
        loss = check_finite_loss(_mean_loss(LayerwiseModel(self.ckpt, self.device), self.ids, qmap, label, track,
                                            decomposition, self.units), f"{label} of {self.ckpt.path}")
        return EvalResult(math.exp(loss), loss, int(self.ids.numel()), time.perf_counter() - t0, label)


def check_finite_loss(loss: float, what: str) -> float:
    """``loss``, or :class:`CheckpointError` when it is NaN or Inf.

    Weights are checked for NaN/Inf when read, but finite weights can still overflow (fp32 activations,
    fp16 scales of a quantized checkpoint); a perplexity of nan must never leave with exit 0.
    """
    if not math.isfinite(loss):
        raise CheckpointError(f"evaluating {what} gave a non-finite loss ({loss}); its weights overflow in "
                              "fp32 (or hold NaN): check the checkpoint")
    return loss


def _mean_loss(lm: LayerwiseModel, ids: torch.Tensor, qmap: dict[str, tuple[Unit, Runs]], label: str,
               track: Tracker, decomposition: Optional[Decomposition], units: Mapping[str, Unit]) -> float:
    """Mean next-token cross-entropy of ``ids`` with the units of ``qmap`` fake-quantized and the experts of
    ``decomposition`` (found in ``units``) replaced by their reconstruction (quantized factors times the
    16-bit basis), one layer at a time."""
    ids = ids.to(lm.device)
    blocks: dict[int, list[DecomposedBlock]] = {}
    for blk in decomposition.blocks if decomposition is not None else []:
        blocks.setdefault(blk.layer, []).append(blk)
    by_layer: dict[Optional[int], list[tuple[Unit, Runs]]] = {}
    for u, c in qmap.values():
        by_layer.setdefault(u.layer, []).append((u, c))
    outer = {u.role: c for u, c in by_layer.get(None, [])}
    task = track.task(f"eval ({label})", lm.num_layers + 1)
    with torch.no_grad():
        emb = lm.embedding_weight()
        norm_w, head_w = lm.head_weights()
        tied = "lm_head.weight" not in lm.ckpt.tensors
        if Role.embedding in outer:
            emb = fake_quantize(emb, outer[Role.embedding])
            if tied:  # one stored tensor serves both uses
                head_w = emb
        if Role.lm_head in outer:
            head_w = fake_quantize(head_w, outer[Role.lm_head])
        h = emb[ids]
        del emb
        for i in range(lm.num_layers):
            layer = lm.load_layer(i)
            for u, runs in by_layer.get(i, []):
                view = unit_view(layer, u)
                view.copy_(fake_quantize(view, runs))
            for blk in blocks.get(i, []):
                views = [unit_view(layer, units[t]) for t in blk.experts]
                for view, w in zip(views, apply_block(views, blk, decomposition)):
                    view.copy_(w)
            lm.run_layer_batched(layer, h, h, EVAL_BATCH)
            lm.release_layer(i)
            task.advance()
        total, n_pred = lm.total_loss(h, ids, norm_w, head_w)
        task.advance()
    return total / n_pred


def evaluate(model: str | Path | Checkpoint, text: str | Path, plan: Optional[Plan | str | Path] = None, bits: Optional[int] = None,
             group_size: int = 128, tokens: int = EVAL_TOKENS, seqlen: int = EVAL_SEQLEN, device: str = "auto",
             track: Tracker = SILENT) -> EvalResult:
    """Held-out perplexity after RTN fake-quantization by ``plan`` or uniform ``bits`` (neither: unquantized)."""
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
    return Evaluator(ckpt, text, tokens, seqlen, device).run(plan, bits, group_size, track)
