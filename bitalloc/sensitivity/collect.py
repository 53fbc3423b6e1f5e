"""The calibration pass: one layer-by-layer sweep that feeds every score family.

Pipeline (memory: one decoder layer's weights in fp32 at a time, see ``memory.py``; layer inputs
checkpointed on disk and replayed, ``model.replay``): embed -> forward through each layer -> loss
and dL/dh at the top, one sequence at a time -> backward layer by layer in reverse,
re-materialising each layer and its inputs; each sequence's weight gradient is exact, taken for a
batch of sequences from one backward pass (``model.hooks.SampleGrads``; routed experts recomputed
from the routing). While a layer is materialised, forward hooks accumulate each unit's input
second moment H, and every sequence's gradient updates the unit's gradient statistics
(:class:`GradStats`). Then each unit's :class:`~.base.UnitContext` goes to every family in
``FAMILIES``, and the layer is released. MoE experts see only their routed tokens (counted); an
expert no calibration token reached gets the mean per-parameter error of its routed peers
(``_Results.fill_unrouted_experts``). Finally ``combined`` calibrates the families against a measured sample.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import CalibrationError, ScoresError
from ..model.checkpoint import Checkpoint
from ..model.inventory import Inventory, Unit
from ..model.hooks import InputStats, SampleGrads
from ..model import distributed
from ..model.layerwise import LayerwiseModel, iter_batches, unit_view
from ..model.replay import LayerInputs
from ..plan import Candidate, Role
from ..progress import SILENT, Tracker
from ..rounding.apply import quantize_runs
from ..rounding.config import RoundingConfig
from ..rounding.kquants import weight_error
from ..rounding.rtn import rtn_error
from .table import DEFAULT_SCORE, IN_SUM2, SLAB_WIDTH, ErrorTable
from . import combined, gradient, hessian, importance, spectral
from .base import UnitContext, slab_sums_torch
from .memory import sample_batch
from .resume import Checkpoints, Row, resume_key
from .truth import TruthRunner

FAMILIES = {"hessian": hessian, "spectral": spectral, "importance": importance, "gradient": gradient}
FORMULAS = {name: formula for fam in FAMILIES.values() for name, formula in fam.PREDICTORS.items()}
FORMULAS["combined"] = combined.FORMULA
SCORE_NAMES = tuple(FORMULAS)
FORWARD_BATCH = 8  # sequences per forward call; bounds activation memory inside a layer
STATS_BUDGET = 16 * 2**30  # bytes of per-unit gradient statistics held at once (see stat_groups)


class GradStats:
    """Per-sequence gradient statistics of one unit: Fisher diagonal, mean, dots with each dW, sketch.

    ``add`` takes one sequence, ``add_batch`` a few; nothing of size n_seq x numel is ever kept.
    """

    def __init__(self, w: torch.Tensor, dws: list[torch.Tensor], n_seq: int, seed: int):
        self.dws = dws
        self.fisher = torch.zeros_like(w)
        self.mean = torch.zeros_like(w)
        self.dots = torch.zeros(n_seq, len(dws), -(-w.shape[1] // SLAB_WIDTH), device=w.device)
        self.sketch_fn = gradient.Sketch(tuple(w.shape), seed, w.device)
        self.sketch = torch.zeros(n_seq, gradient.SKETCH_SIDE**2, device=w.device)

    def add(self, s: int, g: torch.Tensor) -> None:
        """One sequence's gradient (global sequence index ``s``)."""
        self.add_batch(torch.tensor([s], device=self.dots.device), g.float()[None])

    def add_batch(self, seqs: torch.Tensor, g: torch.Tensor) -> None:
        """Several sequences' gradients [batch, out, in] (``seqs``: their global indices).

        One temporary of ``g``'s size at a time.
        """
        self.mean += g.sum(0)
        self.dots[seqs] = torch.stack([slab_sums_torch((g * dw).sum(1)) for dw in self.dws], 1)
        self.sketch[seqs] = self.sketch_fn(g)
        self.fisher += g.square().sum(0)

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulators (what a resumed pass restores); ``dws`` are recomputed from the weight."""
        return {"fisher": self.fisher, "mean": self.mean, "dots": self.dots, "sketch": self.sketch}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.state().items():
            t.copy_(state[name])

    def reduce(self, group: distributed.Group) -> None:
        """Sum over the ranks of a distributed pass (each added its own sequences; the rows of
        ``dots`` and ``sketch`` of other ranks' sequences are zero here)."""
        for t in (self.fisher, self.mean, self.dots, self.sketch):
            group.sum_(t)

    def merge(self, other: "GradStats") -> None:
        """Add another use of the same weight (tied embedding + head): every term is linear in g except
        the Fisher diagonal, whose cross term E[2 g_1 g_2] is dropped."""
        self.fisher += other.fisher
        self.mean += other.mean
        self.dots += other.dots
        self.sketch += other.sketch


class _Results:
    """Family outputs gathered per unit row, assembled into an ErrorTable at the end."""

    def __init__(self, units: list[Unit], candidates: list[Candidate]):
        self.units, self.candidates = units, candidates
        self.rows = {u.tensor: i for i, u in enumerate(units)}
        self.errors: dict[str, list[Optional[np.ndarray]]] = defaultdict(lambda: [None] * len(units))
        self.stats: dict[str, np.ndarray] = defaultdict(lambda: np.full(len(units), np.nan))
        self.vectors: dict[str, list[np.ndarray]] = defaultdict(lambda: [np.zeros(0)] * len(units))
        self.tokens = np.zeros(len(units), dtype=np.int64)
        self.seconds: dict[str, float] = defaultdict(float)  # per family, reported in the table's timings

    def record(self, unit: Unit, ctx: UnitContext) -> None:
        r = self.rows[unit.tensor]
        self.tokens[r] = ctx.tokens
        if ctx.h is not None and any(c.ggml is not None for c in self.candidates):  # for `--imatrix FILE`
            self.vectors[IN_SUM2][r] = torch.diagonal(ctx.h).double().cpu().numpy()
        if ctx.w.is_cuda:  # the sweep's queued kernels finish here, not inside the first family's timing
            torch.cuda.synchronize(ctx.w.device)
        for name, fam in FAMILIES.items():
            t0 = time.perf_counter()
            out = fam.predict(ctx)
            self.seconds[name] += time.perf_counter() - t0
            for k, v in out.errors.items():
                self.errors[k][r] = v
            for k, v in out.stats.items():
                self.stats[k][r] = v
            for k, v in out.vectors.items():
                self.vectors[k][r] = v

    def rows_of(self, units: list[Unit], group: distributed.Group) -> dict[int, Row]:
        """What this rank recorded for ``units`` (the ones it owns), by row."""
        rows = [self.rows[u.tensor] for u in units]
        return {r: (self.tokens[r], {k: v[r] for k, v in self.errors.items() if v[r] is not None},
                    {k: v[r] for k, v in self.stats.items() if not np.isnan(v[r])},
                    {k: v[r] for k, v in self.vectors.items() if len(v[r])})
                for r in rows if group.owns(r)}

    def put(self, rows: dict[int, Row]) -> None:
        for r, (tokens, errors, stats, vectors) in rows.items():
            self.tokens[r] = tokens
            for k, v in errors.items():
                self.errors[k][r] = v
            for k, v in stats.items():
                self.stats[k][r] = v
            for k, v in vectors.items():
                self.vectors[k][r] = v

    def gather(self, group: distributed.Group) -> None:
        """Collect the rows other ranks computed (each rank records the units it owns)."""
        if group.active:
            for part in group.gather(self.rows_of(self.units, group)):
                self.put(part)

    def unit_errors(self) -> dict[str, np.ndarray]:
        return {k: np.stack([s.sum(0) for s in v]) for k, v in self.errors.items()}

    def fill_unrouted_experts(self) -> None:
        """Experts that received no calibration token get the mean error per parameter of routed peers.

        Peers are the routed experts of the same layer and role; when no expert of that layer got a
        token (possible with short calibration text and many experts), the routed experts of that role
        in every layer. Either way a warning names the expert: its error is an estimate, not a
        measurement. With no routed expert of the role anywhere, there is nothing to estimate from and
        the pass stops (a zero error would hand the expert the cheapest width for free).
        """
        same_layer: dict[tuple, list[int]] = defaultdict(list)
        same_role: dict[Role, list[int]] = defaultdict(list)
        for r, u in enumerate(self.units):
            if u.expert is not None and self.tokens[r] > 0:
                same_layer[(u.layer, u.role)].append(r)
                same_role[u.role].append(r)
        for r, u in enumerate(self.units):
            if u.expert is None or self.tokens[r] > 0:
                continue
            ref, where = same_layer.get((u.layer, u.role)), f"layer {u.layer}"
            if not ref:
                ref, where = same_role.get(u.role), f"all layers ({u.role.value})"
            if not ref:
                raise CalibrationError(f"no calibration token was routed to any {u.role.value} expert; "
                                       "give more calibration text (--calib-tokens)")
            warnings.warn(f"{u.tensor}: no calibration token was routed to this expert; using the mean error of "
                          f"the {len(ref)} routed experts of {where}", stacklevel=3)
            for arrays in self.errors.values():
                arrays[r] = np.mean([arrays[k] / self.units[k].numel for k in ref], axis=0) * u.numel

    def table(self, score: str, meta: dict) -> ErrorTable:
        offsets = np.cumsum([0] + [len(x) for x in self.errors["fisher"]]).astype(np.int64)
        scores = {k: np.concatenate(v) for k, v in self.errors.items()}
        vectors = {k: (np.concatenate(v), np.cumsum([0] + [len(x) for x in v]).astype(np.int64))
                   for k, v in self.vectors.items()}
        return ErrorTable([u.tensor for u in self.units], list(self.candidates), self.tokens, scores, offsets, score,
                          dict(self.stats), vectors, meta)


def measure_errors(ckpt: Checkpoint, inv: Inventory, ids: torch.Tensor, candidates: list[Candidate],
                   device: str = "auto", track: Tracker = SILENT, workdir: Optional[str] = None,
                   seed: int = 0, with_combined: bool = True, stats_budget: int = STATS_BUDGET,
                   rounding: Optional[RoundingConfig] = None, imatrix: bool = False,
                   resume: Optional[str] = None) -> ErrorTable:
    """Run the calibration pass and return the error table (every score) of every unlocked unit of ``inv``.

    ``with_combined=False`` skips the measured sample that ``combined`` needs (the table then has
    every score but that one). ``stats_budget`` caps the bytes of gradient statistics held at once
    (see :func:`stat_groups`). ``rounding`` makes the table rounding-aware: every decoder unit's weight
    error dW is the one GPTQ with these settings makes under the unit's H (what ``bitalloc quantize
    --method gptq`` will apply), instead of RTN's; H is then collected in a forward pre-pass over the
    layer, before the backward sweeps need dW. Units outside the decoder layers and MoE experts routed
    fewer than ``rounding.min_expert_tokens`` tokens keep RTN's error, as the rounding driver does.

    ggml candidates (llama.cpp plans) take their dW from llama.cpp's own quantizer of that type; with
    ``imatrix`` from its importance-matrix quantizer, given this pass's matrix (mean squared input per column,
    collected in the same forward pre-pass), as ``llama-quantize --imatrix`` will quantize. The table then
    keeps each unit's sum of squared inputs (vector ``in_sum2``), from which the imatrix file is written.

    Inside a process group (``model.distributed``, launched by torchrun) each rank runs its share of
    the sequences and computes the families of its share of the units; every rank returns the whole
    table. Progress is shown by rank 0 only. ``resume`` is a directory for per-layer checkpoints
    (``resume.py``): a pass interrupted after some layers continues from there when run again.
    """
    t_start = time.perf_counter()
    group = distributed.current()
    if not group.leader:
        track = SILENT
    lm = LayerwiseModel(ckpt, device)
    n_seq, seqlen = ids.shape
    n_pred = seqlen - 1
    ids = ids.to(lm.device)
    mine = group.shard(n_seq).tolist()  # global indices of this rank's sequences
    local_ids = ids[mine]
    units = inv.quantized
    by_layer: dict[Optional[int], list[Unit]] = defaultdict(list)
    for u in units:
        by_layer[u.layer].append(u)
    outer = {u.role: u for u in by_layer.pop(None, [])}  # embedding / lm_head when included
    res = _Results(units, candidates)
    timings: dict[str, float] = {}
    meta: dict = {"config_sha256": ckpt.config_sha256, "index_sha256": ckpt.index_sha256, "formulas": FORMULAS,
                  "calib_sequences": n_seq, "seqlen": seqlen}
    if rounding is not None:
        meta["rounding"] = "gptq"
    key = {"config": ckpt.config_sha256, "index": ckpt.index_sha256, "candidates": [c.id for c in candidates],
           "units": [u.tensor for u in units], "seed": seed, "rounding": rounding is not None,
           "stats_budget": stats_budget, "imatrix": imatrix, "world": group.world, "rank": group.rank}
    ckpts = Checkpoints(resume, resume_key(key, ids))
    if imatrix:
        meta["imatrix"] = True  # ggml errors are those of quantizing with this pass's importance matrix

    t0 = time.perf_counter()
    setup_s = t0 - t_start  # the model skeleton (importing transformers) and the device's start
    stream = LayerInputs(lm, local_ids, FORWARD_BATCH, workdir, track, _lim_sum)
    try:
        grad = torch.empty(len(mine), seqlen, lm.hidden_size, device=lm.device)  # dL/dh at the current layer
        timings["forward_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lims = [total / max(n, 1) for total, n in (group.sum_float(*ts) for ts in stream.lim_sums)]
        meta["lim"] = lims
        meta["disk_stores"] = stream.disk_stores

        def context(w: torch.Tensor, st: GradStats, h, rw, tokens: int, lim: float, zd: float) -> UnitContext:
            return UnitContext(w=w, candidates=candidates, dws=st.dws, h=h, row_weights=rw, tokens=tokens,
                               n_seq=n_seq, n_pred=n_pred, fisher=st.fisher / n_seq, grad_mean=st.mean / n_seq,
                               dots=st.dots, sketch=st.sketch, lim=lim, zd=zd)

        def record(u: Unit, st: GradStats, w: torch.Tensor, h, rw, tokens: int, lim: float, zd: float) -> None:
            st.reduce(group)
            if group.owns(res.rows[u.tensor]):
                res.record(u, context(w, st, h, rw, tokens, lim, zd))

        # ---- loss and dL/dh at the top (per sequence) ----------------------------------
        norm_w, head_w = lm.head_weights()
        head_unit = outer.get(Role.lm_head) or (outer.get(Role.embedding) if inv.tied_embeddings else None)
        head_w.requires_grad_(head_unit is not None)
        head_h = None
        if head_unit is not None:
            head_h = group.sum_(_head_inputs(lm, stream.top, norm_w)).float()
        head_stats = _grad_stats(head_w.detach(), candidates, n_seq, head_unit,
                                 importance=_mean_square(head_h, n_seq * seqlen) if imatrix else None) \
            if head_unit is not None else None
        top = ckpts.load_top()
        if top is None:
            loss_sum = 0.0
            for s, g in enumerate(mine):
                h = stream.top[s:s + 1].detach().requires_grad_(True)
                logits = lm.head_logits(h, norm_w, head_w)
                loss = nn.functional.cross_entropy(logits[0, :-1], local_ids[s, 1:])
                loss.backward()
                grad[s:s + 1] = h.grad
                if head_stats is not None:
                    head_stats.add(g, head_w.grad)
                    head_w.grad = None
                loss_sum += float(loss.detach())
            meta["calibration_loss"] = group.sum_float(loss_sum)[0] / n_seq
            saved = {"grad": grad, **({} if head_stats is None else head_stats.state())}
            ckpts.save_top({"calibration_loss": meta["calibration_loss"]}, saved)
        else:
            meta["calibration_loss"] = top[0]["calibration_loss"]
            grad.copy_(top[1]["grad"])
            if head_stats is not None:
                head_stats.restore(top[1])
        stream.drop_top()
        done = _agreed_progress(ckpts, group, lm.num_layers) if top is not None else lm.num_layers
        if done < lm.num_layers:
            grad.copy_(ckpts.load_grad())
            for j in range(done, lm.num_layers):
                res.put(ckpts.load_layer(j))

        # ---- backward, layer by layer ------------------------------------------------
        bwd = track.task("sensitivity (per layer)", lm.num_layers)
        cos, sin = lm.position_embeddings(seqlen, min(FORWARD_BATCH, len(mine)))
        bwd.advance(lm.num_layers - done)  # layers restored from checkpoints
        for i in reversed(range(done)):
            x_all = stream.input(i)  # this layer's inputs (replaying its segment loads the layers below first)
            layer = lm.load_layer(i)
            layer_units = by_layer.get(i, [])
            inputs = InputStats(layer, layer_units)
            if rounding is not None or imatrix:  # GPTQ's dW and the imatrix quantizers need H before the sweeps
                with torch.no_grad():
                    for b in iter_batches(len(mine), FORWARD_BATCH):
                        n = b.stop - b.start
                        lm.run_layer(layer, x_all[b], (cos[:n], sin[:n]))
                inputs.finish(group)
            for p in layer.parameters():
                p.requires_grad_(False)  # per-sequence weight gradients come from SampleGrads, not autograd
            zd = _layer_zd([unit_view(layer, u) for u in layer_units])
            groups = stat_groups(layer_units, len(candidates), stats_budget)
            for k, sweep in enumerate(groups):
                last = k == len(groups) - 1  # the sweep that also passes dL/dh to the layer below
                stats = {}
                for u in sweep:
                    h = gptq_hessian(inputs, u, rounding)
                    imp = _mean_square(inputs.hessian(u.tensor), inputs.tokens(u.tensor)) if imatrix else None
                    stats[u.tensor] = _grad_stats(unit_view(layer, u), candidates, n_seq, u, h, rounding, imp)
                _sweep(lm, layer, x_all, grad, mine, sweep, stats, last,
                       sample_batch(max((u.numel for u in sweep), default=0)), check_experts=k == 0)
                inputs.finish(group)  # H is complete after the first sweep
                for u in sweep:
                    st = stats.pop(u.tensor)
                    record(u, st, unit_view(layer, u).detach(), inputs.hessian(u.tensor), None,
                           inputs.tokens(u.tensor), lims[i], zd)
                del stats
            del inputs, x_all
            lm.release_layer(i)
            ckpts.save_layer(i, res.rows_of(layer_units, group), grad)
            bwd.advance()

        # ---- embedding / lm_head, when they are counted --------------------------------
        emb_unit = outer.get(Role.embedding)
        if emb_unit is not None or head_unit is not None:
            top_lim = max(lims) if lims else 0.0
            emb = lm.embedding_weight()
            emb_stats = _grad_stats(emb, candidates, n_seq, emb_unit) if emb_unit is not None else None
            if emb_stats is not None:
                for s, g in enumerate(mine):
                    emb_stats.add(g, torch.zeros_like(emb).index_add_(0, local_ids[s], grad[s]))
            counts = group.sum_(torch.bincount(local_ids.flatten(), minlength=emb.shape[0]).float())
            n_tok = n_seq * seqlen
            if inv.tied_embeddings:  # one tensor, two uses: the head's inputs define its H
                if emb_stats is not None:
                    head_stats.merge(emb_stats)
                record(head_unit, head_stats, emb, head_h, None, n_tok, top_lim, _layer_zd([emb]))
            else:
                if emb_stats is not None:
                    record(emb_unit, emb_stats, emb, None, counts, n_tok, top_lim, _layer_zd([emb]))
                if head_stats is not None:
                    hw = head_w.detach()
                    record(head_unit, head_stats, hw, head_h, None, n_tok, top_lim, _layer_zd([hw]))
        res.gather(group)
        timings["sensitivity_s"] = time.perf_counter() - t0
        res.fill_unrouted_experts()

        if with_combined:
            t0 = time.perf_counter()
            sample = sum(1 for g in mine if g < combined.SAMPLE_SEQS)  # this rank's part of the measured sample
            meta["combined"] = _add_combined(TruthRunner(lm, local_ids[:sample], group.sum_float), res, seed, track)
            timings["combined_s"] = time.perf_counter() - t0
    finally:
        stream.close()
    timings.update(setup_s=setup_s, total_s=time.perf_counter() - t_start)
    timings.update({f"family_{k}_s": v for k, v in res.seconds.items()})
    meta["timings"] = timings
    if lm.device.type == "cuda":  # per rank: what each GPU of the run needed
        meta["peak_device_gib"] = [round(g / 2**30, 2) for g in group.gather(torch.cuda.max_memory_allocated(lm.device))]
    table = _check_finite(res.table(DEFAULT_SCORE, meta))
    ckpts.finish()
    return table


def _sweep(lm: LayerwiseModel, layer: nn.Module, x_all: torch.Tensor, grad: torch.Tensor, mine: list[int],
           units: list[Unit], stats: dict[str, GradStats], last: bool, batch: int, check_experts: bool) -> None:
    """One backward sweep of a layer, ``batch`` sequences per backward pass.

    Each pass gives every swept unit's per-sequence gradients (``SampleGrads``) and, on the ``last``
    sweep, dL/dh of the layer's inputs (written into ``grad`` for the layer below). ``check_experts``:
    verify the experts' recomputation on the first pass.
    """
    seqlen = x_all.shape[1]
    cos, sin = lm.position_embeddings(seqlen, min(batch, len(mine)))
    index = torch.tensor(mine, device=grad.device)
    for b in iter_batches(len(mine), batch):
        n = b.stop - b.start
        x = x_all[b].detach().requires_grad_(True)  # a graph without parameter gradients
        grads = SampleGrads(layer, units, check_experts and b.start == 0)
        try:
            y = lm.run_layer(layer, x, (cos[:n], sin[:n]))
        finally:
            grads.close()  # the skeleton's modules outlive this pass: no hook may stay on them
        dx = grads.backward(y, x, grad[b], want_input=last)
        del y
        for u in units:
            stats[u.tensor].add_batch(index[b], grads.weight_grad(u.tensor))
        if last:  # only now: autograd hands dL/dy of the residual branch's last linear back as this very view
            grad[b] = dx


def _agreed_progress(ckpts: Checkpoints, group: distributed.Group, n_layers: int) -> int:
    """The first layer not yet done (counting down from the top), the same on every rank.

    Ranks save their checkpoints independently; if an interruption left them at different layers,
    no common state exists and the layers are redone from the top (with a warning).
    """
    mine = ckpts.done()
    everyone = group.gather(n_layers if mine is None else mine)
    if len(set(everyone)) > 1:
        warnings.warn(f"ranks stopped at different layers {everyone}; redoing the layers from the top", stacklevel=3)
        return n_layers
    return everyone[0]


def _check_finite(table: ErrorTable) -> ErrorTable:
    """The table, or :class:`ScoresError` naming the first score and tensor whose predicted error is NaN/Inf.

    Weights are checked when read, so this catches overflow inside the pass (huge activations, an fp32
    Fisher sum); a NaN error would otherwise make the solver's choice for that tensor arbitrary.
    """
    for name, values in sorted(table.scores.items()):
        bad = ~np.isfinite(values)
        if bad.any():
            slab, col = np.argwhere(bad)[0]
            unit = int(np.searchsorted(table.slab_offsets, slab, side="right")) - 1
            raise ScoresError(f"the calibration pass gave a non-finite {name} error ({values[slab, col]}) for "
                              f"{table.tensors[unit]} at {table.candidates[col].id}; the model's activations "
                              "overflow on this calibration text")
    return table


def _add_combined(runner: TruthRunner, res: _Results, seed: int, track: Tracker) -> dict:
    """Fit ``combined`` on a measured sample and add its errors, split over slabs like ``fisher``'s."""
    unit_errors = res.unit_errors()
    task = track.task("combined (measured sample)", 2 * combined.SAMPLE_UNITS)
    comb, info = combined.calibrate(runner.measure, res.units, res.candidates, unit_errors, seed, task.advance)
    fisher_units = unit_errors["fisher"]
    for r in range(len(res.units)):
        slabs = res.errors["fisher"][r]
        if np.all(fisher_units[r] > 0):
            share = slabs / fisher_units[r]
        else:
            share = np.full_like(slabs, 1.0 / len(slabs))
        res.errors["combined"][r] = share * comb[r]
    return info


def stat_groups(units: list[Unit], n_candidates: int, budget: int) -> list[list[Unit]]:
    """Split a layer's units so that each group's gradient statistics fit in ``budget`` bytes.

    A unit holds 4 * numel * (3 + C) bytes while its layer is swept (``GradStats`` plus its share of the weight
    gradient). Each group costs one backward sweep of the layer over all sequences, so a wide MoE
    layer (hundreds of experts) trades time for a bounded footprint; a unit larger than the budget
    gets a group of its own. Always at least one group (possibly empty: the sweep that carries
    dL/dh down).
    """
    groups: list[list[Unit]] = [[]]
    used = 0
    for u in units:
        need = 4 * u.numel * (3 + n_candidates)
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(u)
        used += need
    return groups


def _grad_stats(w: torch.Tensor, candidates: list[Candidate], n_seq: int, unit: Unit,
                h: Optional[torch.Tensor] = None, rounding: Optional[RoundingConfig] = None,
                importance: Optional[torch.Tensor] = None) -> GradStats:
    """Gradient statistics against each candidate's dW: llama.cpp's for ggml types (with the ``importance``
    matrix when given), GPTQ's under ``h`` when given, else RTN's."""
    w = w.detach()
    if candidates and candidates[0].ggml is not None:
        dws = [weight_error(w, c.ggml, importance) for c in candidates]
    elif h is None:
        dws = [rtn_error(w, c.bits, c.group_size, c.symmetric) for c in candidates]
    else:
        dws = [quantize_runs(w.float(), [(0, w.shape[1], c)], h, rounding).dequantize() - w.float() for c in candidates]
    return GradStats(w.float(), dws, n_seq, seed=_stable_seed(unit.tensor))


def _head_inputs(lm: LayerwiseModel, top: torch.Tensor, norm_w: torch.Tensor) -> torch.Tensor:
    """H = sum x^T x of the lm_head's inputs (the final norm of the top layer's outputs, [n_seq, seqlen, d]),
    summed in fp64 like every other H (``InputStats.add``), returned in fp32 once summed over ranks."""
    h = torch.zeros(norm_w.shape[0], norm_w.shape[0], device=lm.device, dtype=torch.float64)
    with torch.no_grad():
        for s in range(top.shape[0]):
            xn = lm.final_norm(top[s], norm_w)
            h += (xn.T @ xn).double()
    return h


def _mean_square(h: Optional[torch.Tensor], tokens: int) -> Optional[torch.Tensor]:
    """llama.cpp's importance of each input column: the mean squared input (all ones when no token reached
    the tensor, as llama-quantize reads a zero count)."""
    if h is None:
        return None
    if tokens == 0:
        return torch.ones(h.shape[0], device=h.device)
    return torch.diagonal(h) / tokens


def gptq_hessian(inputs: InputStats, unit: Unit, rounding: Optional[RoundingConfig]) -> Optional[torch.Tensor]:
    """The H GPTQ will use for ``unit`` in a rounding-aware pass; None where the driver uses RTN."""
    if rounding is None:
        return None
    if unit.expert is not None and inputs.tokens(unit.tensor) < rounding.min_expert_tokens:
        return None
    return inputs.hessian(unit.tensor)


def _stable_seed(name: str) -> int:
    """A sketch seed per tensor name that does not depend on Python's hash randomisation."""
    return zlib.crc32(name.encode())


def _lim_sum(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """(sum of 1 - cos, tokens) of one layer over all sequences, summed sequence by sequence."""
    total, n = 0.0, 0
    for s in range(h_in.shape[0]):
        t, k = importance.lim(h_in[s], h_out[s])
        total, n = total + t, n + k
    return total, n


def _layer_zd(weights: list[torch.Tensor]) -> float:
    counts = [importance.outlier_share(w) for w in weights]
    return sum(c for c, _ in counts) / max(1, sum(n for _, n in counts))
