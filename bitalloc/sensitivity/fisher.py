"""Predicted loss increase per (unit, candidate) from one layer-by-layer calibration pass.

Why not the layer-local error alone: tr(dW H dW^T) (H = X^T X of the unit's inputs) measures
a unit's output error in that layer's own units, and a unit's output matters to the loss by
very different amounts across layers; ranking units by it loses to uniform allocation.
So the prediction is put in the units of the loss with a second-order expansion of the
calibration loss L around the fp weights, using the Fisher (squared-gradient) diagonal:

    e_i(c) = (n_pred / 2) * sum_jk  F_jk * dW_c,jk^2,      F_jk = mean_s (d l_s / d W_jk)^2

where l_s is the mean next-token loss of calibration sequence s, n_pred = seqlen - 1 its
number of predicted tokens (the factor turns per-sequence gradient variance into per-token
Fisher information), and dW_c the RTN error of candidate c. It is the OBD / SqueezeLLM
sensitivity; the first-order term is dropped because the gradient of a trained model
averages to ~0 over the calibration set. The local error tr(dW H dW^T) / tokens is kept
in the table for diagnostics.

Pipeline (memory: one decoder layer's weights in fp32 at a time; activations in a
memory-mapped store): embed -> forward through each layer, saving every layer's input
-> loss and dL/dh at the top -> backward layer by layer in reverse, re-materialising
each layer, one sequence at a time so that each sequence's weight gradient is exact.
MoE experts see only their routed tokens (counted); an expert no calibration token
reached gets the mean per-parameter error of the experts of the same layer and role.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..model.checkpoint import Checkpoint
from ..model.inventory import Inventory, Unit
from ..model.layerwise import (EXPERT_ROLES, ActivationStore, LayerwiseModel, expert_slice, unit_param, unit_slice,
                               unit_view)
from ..plan import Candidate, Role
from ..progress import SILENT, Tracker
from ..rounding.rtn import rtn_error
from ..scores import SLAB_WIDTH, ErrorTable

PREDICTOR = "fisher_diag"
FORMULA = "e_i(c) = (seqlen-1)/2 * sum F * dW_c^2, F = mean over sequences of squared per-sequence loss gradient"
FORWARD_BATCH = 8  # sequences per forward call; bounds activation memory inside a layer


class _UnitStats:
    """Accumulators for one decoder layer: Fisher diagonals per parameter, H and token counts per unit."""

    def __init__(self, layer: nn.Module, units: list[Unit]):
        self.units = units
        self.fisher: dict[str, torch.Tensor] = {}
        params = dict(layer.named_parameters())
        for u in units:
            p, name = unit_param(layer, u)
            if name not in self.fisher:
                self.fisher[name] = torch.zeros_like(p, dtype=torch.float32)
                p.requires_grad_(True)
        self.hessian: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = defaultdict(int)
        self.hooks = []
        linear_units: dict[str, list[Unit]] = defaultdict(list)
        expert_units: list[Unit] = []
        for u in units:
            if u.role in EXPERT_ROLES and u.local not in params:
                expert_units.append(u)
            else:
                linear_units[u.module.split(f".{u.layer}.", 1)[1]].append(u)
        for local_module, us in linear_units.items():
            self.hooks.append(layer.get_submodule(local_module).register_forward_hook(self._linear_hook(us)))
        if expert_units:
            experts = layer.get_submodule("mlp.experts")
            self.hooks.append(experts.register_forward_hook(self._experts_hook(experts, expert_units)))

    def _add(self, unit: Unit, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        h = x.T @ x
        if unit.tensor in self.hessian:
            self.hessian[unit.tensor] += h
        else:
            self.hessian[unit.tensor] = h
        self.tokens[unit.tensor] += x.shape[0]

    def _linear_hook(self, units: list[Unit]):
        def hook(_mod, inputs, _out):
            for u in units:
                self._add(u, inputs[0])
        return hook

    def _experts_hook(self, experts: nn.Module, units: list[Unit]):
        """Routed inputs per expert for transformers' fused experts (hidden, top_k_index, top_k_weights)."""
        by_expert: dict[int, list[Unit]] = defaultdict(list)
        for u in units:
            by_expert[u.expert].append(u)

        def hook(_mod, inputs, _out):
            hidden, index = inputs[0].detach(), inputs[1]
            with torch.no_grad():
                for e, us in by_expert.items():
                    rows = (index == e).any(-1).nonzero().flatten()
                    x = hidden[rows]
                    role = {u.role: u for u in us}
                    for r in (Role.expert_gate, Role.expert_up):
                        if r in role:
                            self._add(role[r], x)
                    if Role.expert_down in role:
                        gate = expert_slice(experts.gate_up_proj.data, experts, Role.expert_gate, e)
                        up = expert_slice(experts.gate_up_proj.data, experts, Role.expert_up, e)
                        inter = experts.act_fn(x @ gate.T) * (x @ up.T)
                        self._add(role[Role.expert_down], inter)
        return hook

    def accumulate_grads(self, layer: nn.Module) -> None:
        params = dict(layer.named_parameters())
        for name, acc in self.fisher.items():
            g = params[name].grad
            if g is not None:
                acc += g.float().pow(2)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _unit_errors(w: torch.Tensor, fisher: torch.Tensor, hessian: Optional[torch.Tensor], tokens: int,
                 candidates: list[Candidate], n_pred: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted error per column slab of ``SLAB_WIDTH`` inputs [S, C], and the local error per candidate [C].

    The Fisher-diagonal error is a sum over weights, so a slab's share is exact; a tensor's error
    is the sum of its slabs'.
    """
    cols = w.shape[1]
    n_slabs = -(-cols // SLAB_WIDTH)
    slabs, local = np.zeros((n_slabs, len(candidates))), np.zeros(len(candidates))
    pad = n_slabs * SLAB_WIDTH - cols
    for j, c in enumerate(candidates):
        dw = rtn_error(w, c.bits, c.group_size, c.symmetric)
        per_col = (fisher * dw.pow(2)).sum(0)
        per_col = torch.nn.functional.pad(per_col, (0, pad))
        slabs[:, j] = (0.5 * n_pred * per_col.view(n_slabs, SLAB_WIDTH).sum(1)).double().cpu().numpy()
        if hessian is not None and tokens:
            local[j] = float(((dw @ hessian) * dw).sum()) / tokens
    return slabs, local


def measure_errors(ckpt: Checkpoint, inv: Inventory, ids: torch.Tensor, candidates: list[Candidate],
                   device: str = "auto", track: Tracker = SILENT, workdir: Optional[str] = None) -> ErrorTable:
    """Run the calibration pass and return the error table of every unlocked unit of ``inv``."""
    lm = LayerwiseModel(ckpt, device)
    n_seq, seqlen = ids.shape
    n_pred = seqlen - 1
    ids = ids.to(lm.device)
    units = inv.quantized
    by_layer: dict[Optional[int], list[Unit]] = defaultdict(list)
    for u in units:
        by_layer[u.layer].append(u)
    outer = {u.role: u for u in by_layer.pop(None, [])}  # embedding / lm_head when included
    rows = {u.tensor: i for i, u in enumerate(units)}
    slab_errors: list[np.ndarray] = [np.zeros((0, len(candidates)))] * len(units)
    local = np.zeros((len(units), len(candidates)))
    tokens = np.zeros(len(units), dtype=np.int64)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    stores = lm.forward_stores(ids, FORWARD_BATCH, workdir, track)
    grad = ActivationStore(n_seq, seqlen, lm.hidden_size, workdir)
    try:
        timings["forward_s"] = time.perf_counter() - t0
        emb = lm.embedding_weight() if outer else None

        # ---- loss and dL/dh at the top (per sequence) ----------------------------------
        t0 = time.perf_counter()
        norm_w, head_w = lm.head_weights()
        head_unit = outer.get(Role.lm_head) or (outer.get(Role.embedding) if inv.tied_embeddings else None)
        head_fisher = torch.zeros_like(head_w) if head_unit is not None else None
        head_w.requires_grad_(head_unit is not None)
        losses = []
        for s in range(n_seq):
            h = stores[-1].tensor[s:s + 1].to(lm.device).requires_grad_(True)
            logits = lm.head_logits(h, norm_w, head_w)
            loss = nn.functional.cross_entropy(logits[0, :-1], ids[s, 1:])
            loss.backward()
            grad.tensor[s:s + 1] = h.grad.cpu()
            if head_fisher is not None:
                head_fisher += head_w.grad.pow(2)
                head_w.grad = None
            losses.append(loss.item())
        calib_loss = float(np.mean(losses))

        # ---- backward, layer by layer ------------------------------------------------
        bwd = track.task("sensitivity (per layer)", lm.num_layers)
        pos1 = lm.position_embeddings(seqlen, 1)
        for i in reversed(range(lm.num_layers)):
            layer = lm.load_layer(i)
            stats = _UnitStats(layer, by_layer.get(i, []))
            for s in range(n_seq):
                x = stores[i].tensor[s:s + 1].to(lm.device).requires_grad_(True)
                y = lm.run_layer(layer, x, pos1)
                layer.zero_grad(set_to_none=True)
                y.backward(grad.tensor[s:s + 1].to(lm.device))
                grad.tensor[s:s + 1] = x.grad.cpu()
                stats.accumulate_grads(layer)
            stats.close()
            for u in stats.units:
                f = unit_slice(stats.fisher[unit_param(layer, u)[1]], layer, u) / n_seq
                r = rows[u.tensor]
                tokens[r] = stats.tokens[u.tensor]
                slab_errors[r], local[r] = _unit_errors(unit_view(layer, u), f, stats.hessian.get(u.tensor),
                                                        tokens[r], candidates, n_pred)
            del stats
            lm.release_layer(i)
            bwd.advance()

        # ---- embedding / lm_head, when they are counted --------------------------------
        emb_unit = outer.get(Role.embedding)
        if emb_unit is not None or head_unit is not None:
            emb_fisher = torch.zeros_like(emb)
            if emb_unit is not None:
                for s in range(n_seq):
                    g = torch.zeros_like(emb).index_add_(0, ids[s], grad.tensor[s].to(lm.device))
                    emb_fisher += g.pow(2)
            for u, w, fisher in _outer_terms(inv, emb_unit, head_unit, emb, head_w.detach(), emb_fisher, head_fisher):
                r = rows[u.tensor]
                tokens[r] = n_seq * seqlen
                slab_errors[r], local[r] = _unit_errors(w, fisher / n_seq, None, 0, candidates, n_pred)
        timings["sensitivity_s"] = time.perf_counter() - t0
    finally:
        for st in stores + [grad]:
            st.close()

    _fill_unrouted_experts(units, slab_errors, local, tokens)
    meta = {"config_sha256": ckpt.config_sha256, "index_sha256": ckpt.index_sha256, "predictor": PREDICTOR,
            "formula": FORMULA, "calibration_loss": calib_loss, "calib_sequences": n_seq, "seqlen": seqlen,
            "timings": timings}
    offsets = np.cumsum([0] + [len(x) for x in slab_errors]).astype(np.int64)
    slabs = np.concatenate(slab_errors) if units else np.zeros((0, len(candidates)))
    return ErrorTable([u.tensor for u in units], list(candidates), local, tokens, slabs, offsets, meta)


def _outer_terms(inv: Inventory, emb_unit, head_unit, emb, head_w, emb_fisher, head_fisher):
    """(unit, weight, Fisher) for counted embedding / lm_head tensors.

    With tied embeddings both uses share one tensor; its Fisher is approximated by the sum
    of the two uses' Fisher diagonals (the cross term is dropped).
    """
    if inv.tied_embeddings:
        u = emb_unit or head_unit
        f = emb_fisher + (head_fisher if head_fisher is not None else 0)
        return [(u, emb, f)]
    out = []
    if emb_unit is not None:
        out.append((emb_unit, emb, emb_fisher))
    if head_unit is not None:
        out.append((head_unit, head_w, head_fisher))
    return out


def _fill_unrouted_experts(units: list[Unit], slab_errors: list[np.ndarray], local: np.ndarray,
                           tokens: np.ndarray) -> None:
    """Experts that received no calibration token get their layer-and-role mean error per parameter."""
    peers: dict[tuple, list[int]] = defaultdict(list)
    for r, u in enumerate(units):
        if u.expert is not None and tokens[r] > 0:
            peers[(u.layer, u.role)].append(r)
    for r, u in enumerate(units):
        if u.expert is None or tokens[r] > 0:
            continue
        ref = peers.get((u.layer, u.role))
        if not ref:
            continue
        warnings.warn(f"{u.tensor}: no calibration token was routed to this expert; using the mean error of "
                      f"the {len(ref)} routed experts of layer {u.layer}", stacklevel=2)
        slab_errors[r] = np.mean([slab_errors[k] / units[k].numel for k in ref], axis=0) * u.numel
        local[r] = np.mean([local[k] / units[k].numel for k in ref], axis=0) * u.numel
